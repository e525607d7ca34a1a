"""The language model's identity in one place: a profile's ``lm`` section is an :class:`LMSpec`.

Everything that depends on which LM the course trains reads it from here: where the weights
come from, the chat format (and so the prompt, the label mask and the exported template),
the token that ends an answer, the modules LoRA adapts, the image placeholder, and how the
finished assistant is saved. Swapping the LM is one entry::

    get_profile("a100", lm=lm_preset("phi-2"))

The checks here run before any training step: a LoRA target that names no module of the
model, an end-of-answer token the tokenizer lacks, or a template whose pieces tokenize
differently from the whole text is an error, not a silently smaller or different run.
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from .chat import IMAGE_TOKEN, ChatFormat, TemplateError, encode_conversation, get_format

EXPORT_KINDS = ("llava", "course")


class LMSpecError(ValueError):
    """The LM spec does not fit the model or tokenizer it is used with."""


@dataclass(frozen=True)
class LMSpec:
    """Which LM, and everything that follows from it (see the module docstring)."""

    name: str                        # a short key, e.g. "smollm2-360m"
    hub_id: str | None               # hub id or local dir; None: the LM you pretrain in notebook 01
    chat_format: str                 # a key of chat.CHAT_FORMATS ("instruct", "chatml")
    eos_token: str                   # ends every answer; generation stops at it
    lora_targets: tuple[str, ...]    # module names (suffixes) LoRA adapts in stage 2
    image_token: str = IMAGE_TOKEN   # the placeholder stage 1 replaces with image patches
    # "llava": a standard transformers Llava checkpoint; "course": the course's own safetensors
    # folder (for an LM whose output head has a bias, which Llava's lm_head cannot hold).
    export: str = "llava"
    why: str = ""                    # one line for the notebooks: why this LM

    def __post_init__(self) -> None:
        if self.image_token != IMAGE_TOKEN:
            raise LMSpecError(f"lm.image_token must be {IMAGE_TOKEN!r} (the course's placeholder), "
                              f"got {self.image_token!r}")
        if self.export not in EXPORT_KINDS:
            raise LMSpecError(f"lm.export must be one of {EXPORT_KINDS}, got {self.export!r}")
        if not self.lora_targets or isinstance(self.lora_targets, str):
            raise LMSpecError(f"lm.lora_targets must be a non-empty list of module names, got {self.lora_targets!r}")
        fmt = get_format(self.chat_format)
        if fmt.end_of_turn != self.eos_token:
            raise LMSpecError(f"lm {self.name!r}: the {fmt.name!r} format ends answers with "
                              f"{fmt.end_of_turn!r} but lm.eos_token is {self.eos_token!r}")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

    @property
    def format(self) -> ChatFormat:
        """The chat format this LM is trained and asked in."""
        return get_format(self.chat_format)

    def to_dict(self) -> dict[str, Any]:
        """The spec as a profile section (plain data)."""
        return asdict(self)


_SMOL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_SMOL_WHY = ("Llama architecture with a bias-free tied output head (exports to a standard Llava "
             "checkpoint), one tokenizer and chat template from 135M to 1.7B; nanoVLM and SmolVLM build on it")

LM_PRESETS: dict[str, LMSpec] = {p.name: p for p in (
    LMSpec("course-pythia", None, "instruct", "<|endoftext|>",
           ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
           why="the GPT-NeoX (Pythia) model you pretrain in notebook 01, in Phi-2's instruct format"),
    LMSpec("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "chatml", "<|im_end|>", _SMOL_TARGETS,
           why=_SMOL_WHY),
    LMSpec("smollm2-360m", "HuggingFaceTB/SmolLM2-360M-Instruct", "chatml", "<|im_end|>", _SMOL_TARGETS,
           why=_SMOL_WHY),
    LMSpec("smollm2-1.7b", "HuggingFaceTB/SmolLM2-1.7B-Instruct", "chatml", "<|im_end|>", _SMOL_TARGETS,
           why=_SMOL_WHY),
    LMSpec("phi-2", "microsoft/phi-2", "instruct", "<|endoftext|>",
           ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"), export="course",
           why="the earlier write-ups' LM (2.7B); its output head has a bias, so its assistant is saved "
               "in the course's own format instead of a standard Llava checkpoint"),
)}


def lm_preset(name: str) -> dict[str, Any]:
    """A preset spec as a profile ``lm`` section, e.g. ``get_profile("a100", lm=lm_preset("phi-2"))``."""
    if name not in LM_PRESETS:
        raise LMSpecError(f"unknown LM preset {name!r}; choose one of {sorted(LM_PRESETS)}")
    return LM_PRESETS[name].to_dict()


def spec_from_section(section: dict[str, Any]) -> LMSpec:
    """Build (and so validate) an :class:`LMSpec` from a profile's ``lm`` dict; unknown keys are errors."""
    known = {f.name for f in fields(LMSpec)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise LMSpecError(f"unknown lm setting(s) {unknown}; valid: {sorted(known)}")
    missing = sorted(f.name for f in fields(LMSpec) if f.name not in section and f.default is MISSING)
    if missing:
        raise LMSpecError(f"lm section lacks {missing}")
    return LMSpec(**section)


def lm_spec(profile: Any) -> LMSpec:
    """The profile's LM spec."""
    return spec_from_section(dict(profile.raw["lm"]))


# ----------------------------------------------------------------------------- checks
def check_tokenizer(spec: LMSpec, tokenizer) -> None:
    """The tokenizer has the spec's end-of-answer and image tokens, and the template tokenizes cleanly.

    Raises ``LMSpecError`` when a token is missing or not a single id, or when rendering the
    format piece by piece (how training labels are made) gives other ids than the whole text.
    """
    where = f"lm {spec.name!r} ({spec.hub_id or 'the notebook-01 LM'})"
    if tokenizer.eos_token != spec.eos_token:
        raise LMSpecError(f"{where}: the tokenizer's eos_token is {tokenizer.eos_token!r}, the spec says "
                          f"{spec.eos_token!r}; answers would never stop")
    for token in (spec.eos_token, spec.image_token):
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise LMSpecError(f"{where}: {token!r} tokenizes to {len(ids)} ids {ids[:5]}; it must be one "
                              "special token of the tokenizer")
    conversation = [{"from": "human", "value": f"{IMAGE_TOKEN}\nWhat colour is the circle?"},
                    {"from": "gpt", "value": "It is red."},
                    {"from": "human", "value": "And the square?"}, {"from": "gpt", "value": "Blue."}]
    try:
        encode_conversation(tokenizer, conversation, n_image_tokens=2, max_len=10**6, check=True)
    except TemplateError as err:
        raise LMSpecError(f"{where}: the {spec.chat_format!r} template does not fit this tokenizer: {err}") from None


def linear_module_names(model) -> list[str]:
    """The distinct last-name parts of the model's linear layers (what LoRA can target)."""
    names = set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name and weight is not None and getattr(weight, "dim", lambda: 0)() == 2 \
                and type(module).__name__ not in ("Embedding",):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def check_lora_targets(model, targets: tuple[str, ...] | list[str]) -> dict[str, int]:
    """How many modules each LoRA target matches; ``LMSpecError`` if any matches none.

    peft matches a target by the end of a module's name and silently trains fewer modules when
    a name does not exist, so a misspelt or wrong-family target is refused here.
    """
    counts = {t: 0 for t in targets}
    for name, _ in model.named_modules():
        for t in targets:
            if name == t or name.endswith("." + t):
                counts[t] += 1
    missing = [t for t, n in counts.items() if n == 0]
    if missing:
        raise LMSpecError(f"LoRA target(s) {missing} match no module of {type(model).__name__}; its linear "
                          f"layers are named {linear_module_names(model)} (set lm.lora_targets)")
    return counts
