"""Named run profiles: one code path, several scales.

A profile is data (model names, sizes, steps, batch, learning rates, paths), never a
branch in the code. ``get_profile()`` reads ``CAPSTONE_PROFILE`` (default ``auto``).
Each stage reads only its own section (``profile.pretrain``, ``profile.stage1`` ...).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .lm_spec import lm_preset, spec_from_section
from .profile_sections import SECTIONS, SettingsError, check_overrides
from .shapesworld_scenes import vocabulary_prompt

REPO_ROOT = Path(__file__).resolve().parent.parent
PROFILE_NAMES = ("smoke", "cpu", "t4", "a100", "a100x8", "a100x16", "t4-rehearsal", "a100-rehearsal")

# ---------------------------------------------------------------------------------
# Section defaults shared by the small profiles. Every number here is a setting a
# learner may change; the comments say what it is for.
# ---------------------------------------------------------------------------------
_SHAPES_SMOKE = dict(
    seed=0, image_size=64, n_train=48, n_val=16, max_objects=3,
    captions_per_image=3, questions_per_image=3, corpus_docs=400,
)
_SHAPES_CPU = dict(
    seed=0, image_size=64, n_train=10000, n_val=300, max_objects=3,
    # 4-5 exchanges per training conversation (the eval keeps 5 questions per held-out image).
    captions_per_image=4, questions_per_image=5, corpus_docs=20000,
    # The pretraining corpus: captions, chats that state a scene and then talk about it (2-5
    # exchanges), and sentences, in these proportions (docs/EXPERIMENTS.md compares mixes).
    corpus_mix={"captions": 4, "chat": 4, "text": 2}, corpus_chat_turns=5,
    # Share of training conversations that ask for a description (the rest only ask questions).
    describe_fraction=0.6,
    # Yes/no ("exists") answers state their evidence first: "Is there a red square?" -> "The square
    # is blue, so no." The comparison then happens in text, after a lookup the model already makes
    # for colour questions; the evaluation reads the verdict after the closing "so". Without it
    # "exists" can stay at chance (docs/EXPERIMENTS.md).
    explain_exists=True,
)

_BASE: dict[str, dict[str, Any]] = {
    # precision: fp32 | bf16 | fp16 | auto (bf16 autocast where the hardware has native bf16 units,
    # fp32 on other CPUs, fp16 on older GPUs; capstone_lib.precision).
    "runtime": dict(device="cpu", precision="fp32", num_workers=0, seed=1234,
                    drive_dir=None, keep_checkpoints=2, allow_skips=False,
                    # True only for the rehearsal profiles: random-weight stand-ins at the real
                    # names, so quality checks that need the real weights are skipped.
                    rehearsal=False),
    "data": dict(source="shapesworld", shapesworld=_SHAPES_SMOKE, coco_root=None,
                 llava_json=None, llava_images=None, redpajama_dir=None, subset=None),
    "pretrain": dict(
        # LitGPT model config: a named config (``pythia-160m``) or a dict for a custom one.
        model_name="pythia-capstone-smoke",
        model_config=dict(block_size=128, n_layer=2, n_head=2, n_embd=32,
                          intermediate_size=128, rotary_percentage=0.25,
                          parallel_residual=True, bias=True),
        tokenizer="train",           # "train" (local BPE) or a hub id such as EleutherAI/pythia-160m
        vocab_size=512,
        max_tokens=40_000, micro_batch_size=8, global_batch_size=8,
        lr=3e-3, min_lr=3e-4, warmup_steps=5, weight_decay=0.1,
        precision="32-true", save_interval=10, eval_interval=10, log_interval=1,
        devices=1, num_nodes=1, strategy="auto",
        eval_iters=4,                # validation batches per evaluation
        corpus_max_tokens=None,      # read at most this many corpus tokens (None: all)
        # GPU profiles: RedPajama sample files downloaded when data.redpajama_dir is not set.
        redpajama_repo="togethercomputer/RedPajama-Data-1T-Sample",
        redpajama_files=("c4_sample.jsonl", "wikipedia_sample.jsonl", "stackexchange_sample.jsonl"),
    ),
    "vision": dict(
        # "tiny-clip": a small CLIP trained contrastively on ShapesWorld in notebook 02;
        # otherwise a hub id such as openai/clip-vit-base-patch32.
        encoder="tiny-clip",
        # 72 px / patch 24 = a 3 x 3 grid of patch tokens, aligned with ShapesWorld's 3 x 3 layout
        # (its 64 px images are resized to 72): each token sees one whole object (notebook 02).
        tiny_config=dict(image_size=72, patch_size=24, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, projection_dim=32,
                         text_hidden_size=32, text_layers=2, text_max_len=40),
        clip_train_steps=5, clip_batch_size=16, clip_lr=2e-3,
        # Each image must also reject copies of its caption with one shape / position changed.
        clip_hard_negatives=("shape", "position"),
        # The tiny CLIP's position embeddings start at the patch embeddings' scale (CLIP: 0.02),
        # so each patch token still says which cell it is (notebook 02 probes it); hub CLIPs ignore it.
        position_init_std=1.0,
        # LLaVA's choice: hidden_states[-2] (second to last layer), patch tokens only (CLS dropped).
        feature_layer=-2, drop_cls=True, cache_batch_size=64, cache_dtype="float32",
    ),
    "stage1": dict(
        projector="mlp2x_gelu", lr=1e-3, weight_decay=0.0, warmup_ratio=0.03,
        epochs=1, max_steps=4, micro_batch_size=4, grad_accum=2, max_len=96,
        grad_clip=1.0, eval_every=2, save_every=2, n_eval_captions=4,
        save_every_minutes=None,     # also checkpoint after this many minutes (a Colab disconnect)
    ),
    "stage2": dict(
        quantize_4bit=True, lora_r=8, lora_alpha=16, lora_dropout=0.0,
        lr=2e-3, projector_lr=2e-4, weight_decay=0.0, warmup_ratio=0.03,
        epochs=1, max_steps=4, micro_batch_size=4, grad_accum=2, max_len=128,
        grad_clip=1.0, gradient_checkpointing=False, eval_every=2, save_every=2,
        save_every_minutes=None,
    ),
    "audio": dict(whisper_model="bundled-tiny.en", device="cpu", compute_type="int8",
                  max_seconds=60.0, backend="faster-whisper",
                  beam_size=5, vad_filter=True, language=None, cpu_threads=0,
                  # Text Whisper reads before the audio: the words the questions use (or None).
                  initial_prompt=None, hotwords=None,
                  # A multilingual Whisper refuses speech whose detected probability of this
                  # language is below the bar, and shows what it heard (None: any language).
                  expected_language="en", min_language_probability=0.3,
                  # A multilingual Whisper that tells the language when ``whisper_model`` is
                  # English-only (``bundled-base``), else None: the model itself, if multilingual.
                  language_id_model=None,
                  # Subtract steady background noise (hiss, fan) before Whisper listens.
                  reduce_noise=False,
                  # Held-out questions spoken by espeak-ng voices in notebook 05 (0: none).
                  spoken_questions=0),
    # Seed-bug lessons (notebook 04b): stage-2 steps per defect and held-out questions per row.
    "eval": dict(n_questions=32, n_captions=16, max_new_tokens=32, lesson_steps=2, lesson_questions=8),
    # The language model's identity (capstone_lib.lm_spec): weights, chat format, EOS, LoRA targets.
    "lm": lm_preset("course-pythia"),
    # max_history_exchanges: the most earlier exchanges a chat keeps (older ones are dropped first).
    "demo": dict(host="127.0.0.1", port=7860, max_upload_mb=10, max_question_chars=500, max_history_exchanges=16,
                 max_new_tokens=48, temperature=0.0, top_p=1.0),
}


def _merge(base: dict, override: dict) -> dict:
    """Recursively merge ``override`` into a deep copy of ``base``."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


_CPU = _merge(_BASE, {
    # bf16 autocast on a CPU with native bf16 units, else fp32 (docs/PERFORMANCE.md has the figures).
    "runtime": dict(precision="auto"),
    "data": dict(shapesworld=_SHAPES_CPU),
    "pretrain": dict(
        model_name="pythia-capstone-cpu",
        # ~1.1M parameters; a 128-token context covers a ShapesWorld document and, in stages
        # 1-2, 9 image patches + the conversation (keep their max_len <= block_size).
        model_config=dict(block_size=128, n_layer=4, n_head=4, n_embd=128,
                          intermediate_size=512, rotary_percentage=0.25,
                          parallel_residual=True, bias=True),
        # 600k tokens: ~290 steps, about half of the 20k-document corpus (longer pretraining
        # ended stage 2 lower; docs/EXPERIMENTS.md).
        vocab_size=1024, max_tokens=600_000, micro_batch_size=16, global_batch_size=16, precision="auto",
        lr=3e-3, min_lr=3e-4, warmup_steps=50, save_interval=100, eval_interval=50,
        log_interval=10, eval_iters=8,
    ),
    "vision": dict(tiny_config=dict(image_size=72, patch_size=24, hidden_size=64,
                                    intermediate_size=256, num_hidden_layers=4,
                                    num_attention_heads=4, projection_dim=64,
                                    text_hidden_size=64, text_layers=2, text_max_len=40),
                   # Long enough that a linear probe reads the shape under one patch token (~0.98):
                   # a blurrier CLIP confuses circles and squares in the captions.
                   clip_train_steps=2000, clip_batch_size=64, clip_lr=1e-3),
    # 9 image tokens + prompt + caption fit in the 128-token context of the notebook-01 LM.
    "stage1": dict(max_steps=400, max_len=128, micro_batch_size=32, grad_accum=1, eval_every=200,
                   save_every=200, n_eval_captions=64),
    # Stage 2 steps: not yet enough to meet the bar on every runtime seed with this recipe
    # (`make seeds`; docs/EXPERIMENTS.md has the per-seed figures).
    # A ~1M-parameter base needs no 4-bit: full precision is ~1.2x faster per step (make bench).
    "stage2": dict(max_steps=4500, lr=3e-3, projector_lr=1e-3, micro_batch_size=16, quantize_4bit=False,
                   grad_accum=1, lora_r=16, lora_alpha=32, eval_every=1000, save_every=1000),
    # Spoken questions: Whisper tiny.en reads the course's words first and hears the question
    # with steady noise subtracted; the multilingual Whisper base only tells the language, so
    # speech in another language is refused (docs/EXPERIMENTS.md has the measurements).
    "audio": dict(initial_prompt=vocabulary_prompt(), reduce_noise=True, language_id_model="bundled-base",
                  spoken_questions=50),
    # Lesson steps per seed bug: enough that each defect shows its cost (notebook 04b).
    # Captions on all 300 held-out images (on 100, one run's accuracy swings by +-0.04).
    "eval": dict(n_questions=300, n_captions=300, lesson_steps=150, lesson_questions=100),
})

_GPU_COMMON = {
    # Real COCO/LLaVA files are known to hold a few unusable records: count and report them.
    "runtime": dict(allow_skips=True),
    "data": dict(source="real", subset=20_000),
    # Pretraining a Pythia-160M from scratch is the exercise of notebook 01; stages 1-2 then use the
    # pretrained instruct LM of the `lm` section (a 160M model trained for an hour cannot follow
    # instructions). c4_sample.jsonl is one 866 MB hub file (hub files download whole); the corpus
    # reader stops at corpus_max_tokens.
    "pretrain": dict(model_name="pythia-160m", model_config=None,
                     tokenizer="EleutherAI/pythia-160m", max_tokens=50_000_000,
                     micro_batch_size=4, global_batch_size=32, lr=6e-4, min_lr=6e-5,
                     warmup_steps=40, save_interval=200, eval_interval=100, log_interval=10,
                     eval_iters=20, corpus_max_tokens=60_000_000),   # 65k tokens/step, ~760 steps
    "vision": dict(encoder="openai/clip-vit-base-patch32", cache_batch_size=256,
                   cache_dtype="float16"),
    # A stage is ~150-400 optimizer steps here: checkpoint every 50 steps and every 10 minutes,
    # so a Colab disconnect costs minutes, not the stage (rerun the cell: it resumes).
    "stage1": dict(lr=1e-3, max_steps=None, max_len=128, eval_every=100, save_every=50,
                   save_every_minutes=10, n_eval_captions=16),
    "stage2": dict(lora_r=128, lora_alpha=256, lora_dropout=0.05,
                   lr=2e-4, projector_lr=2e-5, max_len=2048, gradient_checkpointing=True,
                   max_steps=None, eval_every=50, save_every=50, save_every_minutes=10),
    "audio": dict(whisper_model="small", device="cuda", compute_type="float16"),
    # 30 lesson steps per defect (4 runs): together about one stage 2 (157 steps on a100).
    "eval": dict(n_questions=300, n_captions=200, max_new_tokens=64, lesson_steps=30, lesson_questions=100),
}

_A100 = _merge(_BASE, _merge(_GPU_COMMON, {
    "runtime": dict(device="cuda", precision="bf16", num_workers=4),
    "lm": lm_preset("smollm2-1.7b"),
    "pretrain": dict(precision="bf16-mixed"),
    "stage1": dict(micro_batch_size=32, grad_accum=8),      # effective batch 256 (LLaVA-1.5)
    "stage2": dict(micro_batch_size=8, grad_accum=16),      # effective batch 128
}))
_T4 = _merge(_BASE, _merge(_GPU_COMMON, {
    "runtime": dict(device="cuda", precision="fp16", num_workers=2),   # no bf16 on a T4
    "lm": lm_preset("smollm2-360m"),
    # litgpt pretrain accepts bf16-*/32-true only; fp32 on a T4 runs ~4x slower than bf16 on an
    # A100, so the T4 pretrains on 10M tokens (~1 h) instead of 50M.
    "pretrain": dict(precision="32-true", max_tokens=10_000_000, corpus_max_tokens=12_000_000),
    "stage1": dict(micro_batch_size=16, grad_accum=16),     # effective batch 256
    "stage2": dict(micro_batch_size=4, grad_accum=32, max_len=512),
    "audio": dict(whisper_model="base"),
}))
# Several GPUs: the per-device batch x accumulation x ranks equals the one-GPU recipe's
# effective batch (stage 1: 256, stage 2: 128, pretraining: 32 sequences). Launch commands:
# docs/MULTI_GPU.md (torchrun for stages 1-2; pretraining once, LitGPT starts its processes).
_A100X8 = _merge(_A100, {   # one node, 8 GPUs
    "pretrain": dict(devices=8),                            # 8 devices x 4 = 32, no accumulation
    "stage1": dict(micro_batch_size=32, grad_accum=1),      # 8 ranks x 32 = 256
    "stage2": dict(micro_batch_size=8, grad_accum=2),       # 8 ranks x 8 x 2 = 128
})
_A100X16 = _merge(_A100, {  # two nodes x 8 GPUs
    "pretrain": dict(devices=8, num_nodes=2, micro_batch_size=2),   # 16 devices x 2 = 32
    "stage1": dict(micro_batch_size=16, grad_accum=1),      # 16 ranks x 16 = 256
    "stage2": dict(micro_batch_size=8, grad_accum=1),       # 16 ranks x 8 = 128
})



def _rehearsal(gpu: dict[str, Any]) -> dict[str, Any]:
    """A GPU profile's code path and settings with only the sizes shrunk and the device set to CPU.

    `make rehearsal` runs every notebook on it against stand-ins at the real names (a local
    Hugging Face cache and a COCO mirror on 127.0.0.1, built by ``tools/rehearsal.py``).
    """
    return _merge(gpu, {
        "runtime": dict(device="cpu", num_workers=0, rehearsal=True),
        "data": dict(subset=24, val_subset=10, llava_val_images=4, download_workers=4),
        "pretrain": dict(model_config=dict(block_size=64, n_layer=2, n_head=2, n_embd=32, intermediate_size=64,
                                           rotary_percentage=0.25, parallel_residual=True, bias=True,
                                           vocab_size=50254, padded_vocab_size=50304),
                         max_tokens=4096, micro_batch_size=2, global_batch_size=4, warmup_steps=2,
                         save_interval=8, eval_interval=8, log_interval=4, eval_iters=2,
                         corpus_max_tokens=20_000, devices=1, num_nodes=1),
        "vision": dict(cache_batch_size=8),
        "stage1": dict(max_steps=3, micro_batch_size=4, grad_accum=2, eval_every=3, save_every=2,
                       n_eval_captions=4),
        "stage2": dict(max_steps=3, micro_batch_size=2, grad_accum=2, max_len=256, eval_every=3, save_every=2,
                       lora_r=4, lora_alpha=8),
        "audio": dict(device="cpu", compute_type="int8"),
        "eval": dict(n_questions=8, n_captions=6, max_new_tokens=8, lesson_steps=2, lesson_questions=6),
    })


_RAW: dict[str, dict[str, Any]] = {
    "smoke": _BASE,
    "cpu": _CPU,
    "t4": _T4,
    "a100": _A100,
    "a100x8": _A100X8,
    "a100x16": _A100X16,
    "t4-rehearsal": _rehearsal(_T4),
    "a100-rehearsal": _rehearsal(_A100),
}


@dataclass(frozen=True)
class Profile:
    """A named, read-only bundle of settings; ``profile.stage1.lr`` and friends.

    Each section is a frozen dataclass (``profile_sections``), built and type-checked here;
    ``profile.lm`` is the ``LMSpec``.
    """

    name: str
    raw: dict[str, Any] = field(repr=False)

    def __post_init__(self) -> None:
        sections: dict[str, Any] = {"lm": spec_from_section(self.raw["lm"])}
        for key, values in self.raw.items():
            if key != "lm":
                if key not in SECTIONS:
                    raise SettingsError(f"profile {self.name!r}: unknown section {key!r}")
                sections[key] = SECTIONS[key].build(values, self.name)
        object.__setattr__(self, "_sections", sections)

    def __getattr__(self, section: str) -> Any:
        sections = self.__dict__.get("_sections", {})
        if section in sections:
            return sections[section]
        raise AttributeError(f"profile {self.name!r} has no section {section!r} (sections: {', '.join(sections)})")

    @property
    def run_dir(self) -> Path:
        """Where this profile's artifacts go: ``runs/<profile>/`` (or ``$CAPSTONE_RUNS/<profile>``).

        With an LM other than the profile's own (``lm=lm_preset("phi-2")``): ``runs/<profile>-<lm>/``,
        so the projectors, adapters and exports of two LMs never mix.
        """
        root = Path(os.environ.get("CAPSTONE_RUNS", REPO_ROOT / "runs"))
        lm = self.raw["lm"]["name"]
        return root / (self.name if lm == _RAW[self.name]["lm"]["name"] else f"{self.name}-{lm}")

    def to_dict(self) -> dict[str, Any]:
        """A deep copy of the settings, e.g. to write next to a checkpoint."""
        return copy.deepcopy(self.raw)


A100_MIN_GIB = 38.0    # the a100 profile's stage 2 (micro-batch 8 x 2048 tokens) needs an A100-40GB class card


def pick_gpu_profile(capability_major: int, memory_gib: float) -> str:
    """``a100`` for a bf16 card with A100-class memory (A100, H100); ``t4`` otherwise (T4, L4, V100)."""
    return "a100" if capability_major >= 8 and memory_gib >= A100_MIN_GIB else "t4"


def detect_auto() -> str:
    """Pick ``a100``/``t4`` from the GPU present (see ``pick_gpu_profile``), else ``cpu``."""
    try:
        import torch
        if torch.cuda.is_available():
            major, _ = torch.cuda.get_device_capability(0)
            memory = torch.cuda.get_device_properties(0).total_memory / 2**30
            return pick_gpu_profile(major, memory)
    except Exception:  # pragma: no cover - torch missing or broken driver
        pass
    return "cpu"


def get_profile(name: str | None = None, **overrides: dict[str, Any]) -> Profile:
    """Return the profile ``name`` (default ``$CAPSTONE_PROFILE`` or ``auto``).

    ``overrides`` maps a section to the keys to change, e.g.
    ``get_profile("cpu", stage1={"max_steps": 10})``.
    """
    name = name or os.environ.get("CAPSTONE_PROFILE", "auto")
    if name == "auto":
        name = detect_auto()
    if name not in _RAW:
        raise ValueError(f"unknown profile {name!r}; choose one of {PROFILE_NAMES + ('auto',)}")
    check_overrides(name, overrides, list(_RAW[name]))
    raw = _merge(_RAW[name], overrides) if overrides else copy.deepcopy(_RAW[name])
    if os.environ.get("CAPSTONE_SEED"):          # `make seeds`: the same course from another seed
        raw["runtime"]["seed"] = _seed_from_env(os.environ["CAPSTONE_SEED"])
    raw["lm"] = spec_from_section(raw["lm"]).to_dict()     # validated: a bad lm section fails here
    _resolve_precision(raw)
    return Profile(name=name, raw=raw)


def _seed_from_env(value: str) -> int:
    """``CAPSTONE_SEED`` as an int, or a ValueError that names the variable."""
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"CAPSTONE_SEED must be an integer, got {value!r}") from None


def _resolve_precision(raw: dict[str, Any]) -> None:
    """Turn ``runtime.precision: auto`` into the machine's choice (``capstone_lib.precision``).

    The setting is kept as ``runtime.precision_setting`` and the reason as ``runtime.precision_reason``;
    LitGPT pretraining's ``precision: auto`` follows the runtime's choice.
    """
    from .precision import LITGPT_PRECISION, resolve

    runtime = raw["runtime"]
    setting = runtime["precision"]
    runtime["precision"], runtime["precision_reason"] = resolve(setting, runtime["device"])
    runtime["precision_setting"] = setting
    if raw["pretrain"].get("precision") == "auto":
        raw["pretrain"]["precision"] = LITGPT_PRECISION[runtime["precision"]]
