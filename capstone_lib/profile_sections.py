"""The typed sections of a profile: one frozen dataclass per stage, checked when the profile is built.

``profiles.py`` holds the values; this file says which settings exist and their types. A
misspelled setting fails when the profile is built (an override) or when it is read
(``profile.stage2.max_step``), with the valid names listed, never deep inside a stage.
Settings defaulting to ``None`` here are optional: the code that reads them picks the value.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from typing import Any


class SettingsError(ValueError):
    """A profile setting that does not exist or has the wrong type."""


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    return (f"; did you mean {close[0]!r}?" if close else "") + f" Valid: {', '.join(valid)}"


@dataclass(frozen=True)
class Section:
    """Base of every section: attribute errors name the valid settings."""

    def __getattr__(self, name: str) -> Any:          # called only for a name that is not a field
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"profile section {self.section_name()!r} has no setting {name!r}"
                             + _suggest(name, self.field_names()))

    @classmethod
    def section_name(cls) -> str:
        """``stage2`` for ``Stage2``."""
        return cls.__name__.lower()

    @classmethod
    def field_names(cls) -> list[str]:
        """The settings this section has."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def build(cls, values: dict[str, Any], profile: str) -> "Section":
        """The section from a dict: unknown names and wrong types raise ``SettingsError``."""
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise SettingsError(f"profile {profile!r}: section {cls.section_name()!r} has no setting "
                                f"{unknown[0]!r}" + _suggest(unknown[0], cls.field_names()))
        hints = typing.get_type_hints(cls)
        for key, value in values.items():
            if not _type_ok(value, hints[key]):
                raise SettingsError(f"profile {profile!r}: {cls.section_name()}.{key} must be "
                                    f"{_type_name(hints[key])}, got {value!r}")
        try:
            return cls(**values)
        except TypeError as err:        # a required setting missing
            raise SettingsError(f"profile {profile!r}: section {cls.section_name()!r}: {err}") from None


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits ``hint`` (int | None, float, tuple, dict ...); a float accepts an int."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return True
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if option is tuple and isinstance(value, (tuple, list)):
            return True
        if option in (str, bool, dict) and isinstance(value, option):
            return True
    return False


_UnionType = type(int | None)


def _type_name(hint: Any) -> str:
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UnionType) else (hint,)
    return " or ".join("None" if o is type(None) else o.__name__ for o in options)


@dataclass(frozen=True)
class Runtime(Section):
    """Where and how everything runs."""

    device: str                       # cpu | cuda
    precision: str                    # fp32 | bf16 | fp16 (``auto`` resolved by get_profile)
    num_workers: int                  # data-loader worker processes
    seed: int                         # the runtime seed (CAPSTONE_SEED overrides it)
    drive_dir: str | None             # checkpoints also go here (Google Drive on Colab)
    keep_checkpoints: int             # checkpoints kept per stage
    allow_skips: bool                 # count unusable records instead of stopping
    rehearsal: bool                   # stand-ins at the real names: skip quality checks
    precision_reason: str = "set in the profile"
    precision_setting: str | None = None


@dataclass(frozen=True)
class Data(Section):
    """The data sets: ShapesWorld (generated) or the real COCO / LLaVA / RedPajama files."""

    source: str                       # shapesworld | real
    shapesworld: dict                 # the generator's settings
    coco_root: str | None
    llava_json: str | None
    llava_images: str | None
    redpajama_dir: str | None
    subset: int | None                # training records used (None: all)
    val_subset: int | None = None     # held-out images (None: chosen from subset)
    llava_val_images: int | None = None
    download_workers: int | None = None
    download_dir: str | None = None
    image_download: str | None = None
    keep_zips: bool | None = None


@dataclass(frozen=True)
class Pretrain(Section):
    """Notebook 01: LitGPT pretraining."""

    model_name: str
    model_config: dict | None
    tokenizer: str
    vocab_size: int
    max_tokens: int
    micro_batch_size: int
    global_batch_size: int
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    precision: str                    # LitGPT's --precision (``auto``: the runtime's choice)
    save_interval: int
    eval_interval: int
    log_interval: int
    devices: int
    num_nodes: int
    strategy: str
    eval_iters: int
    corpus_max_tokens: int | None
    redpajama_repo: str
    redpajama_files: tuple


@dataclass(frozen=True)
class Vision(Section):
    """Notebook 02: the CLIP encoder (tiny CLIP trained here, or a hub CLIP) and the feature cache."""

    encoder: str
    tiny_config: dict
    clip_train_steps: int
    clip_batch_size: int
    clip_lr: float
    clip_hard_negatives: tuple
    position_init_std: float | None
    feature_layer: int
    drop_cls: bool
    cache_batch_size: int
    cache_dtype: str


@dataclass(frozen=True)
class _Stage(Section):
    """Settings both training stages share."""

    lr: float
    weight_decay: float
    warmup_ratio: float
    epochs: int
    max_steps: int | None             # None: ``epochs`` over the data
    micro_batch_size: int
    grad_accum: int
    max_len: int
    grad_clip: float
    eval_every: int | None
    save_every: int | None
    save_every_minutes: float | None  # also checkpoint after this many minutes


@dataclass(frozen=True)
class Stage1(_Stage):
    """Notebook 03: the projector on captions."""

    projector: str                    # the projector's architecture (projector.build_projector)
    n_eval_captions: int


@dataclass(frozen=True)
class Stage2(_Stage):
    """Notebook 04: (Q)LoRA + projector on conversations."""

    quantize_4bit: bool               # the frozen base in 4-bit NF4 (QLoRA)
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    projector_lr: float
    gradient_checkpointing: bool


@dataclass(frozen=True)
class Audio(Section):
    """Notebook 05: speech to text."""

    whisper_model: str
    device: str
    compute_type: str
    max_seconds: float
    backend: str
    beam_size: int
    vad_filter: bool
    language: str | None
    cpu_threads: int
    initial_prompt: str | None
    hotwords: str | None
    expected_language: str | None
    min_language_probability: float
    language_id_model: str | None
    reduce_noise: bool
    spoken_questions: int


@dataclass(frozen=True)
class Eval(Section):
    """Held-out evaluation and the seed-bug lessons."""

    n_questions: int
    n_captions: int
    max_new_tokens: int
    lesson_steps: int
    lesson_questions: int


@dataclass(frozen=True)
class Demo(Section):
    """The app."""

    host: str
    port: int
    max_upload_mb: float
    max_question_chars: int
    max_history_exchanges: int
    max_new_tokens: int
    temperature: float
    top_p: float


SECTIONS: dict[str, type[Section]] = {
    "runtime": Runtime, "data": Data, "pretrain": Pretrain, "vision": Vision, "stage1": Stage1,
    "stage2": Stage2, "audio": Audio, "eval": Eval, "demo": Demo,
}


def check_overrides(profile: str, overrides: dict[str, Any], sections: list[str]) -> None:
    """Refuse an override naming a section or setting that does not exist, listing the valid ones."""
    for section, values in overrides.items():
        if section not in sections:
            raise SettingsError(f"profile {profile!r} has no section {section!r}" + _suggest(section, sections))
        if not isinstance(values, dict):
            raise SettingsError(f"override {section}= must be a dict of settings, got {values!r}")
        cls = SECTIONS.get(section)
        if cls is None:                   # lm: checked by lm_spec.spec_from_section
            continue
        for key in values:
            if key not in cls.field_names():
                raise SettingsError(f"profile {profile!r}: section {section!r} has no setting {key!r}"
                                    + _suggest(key, cls.field_names()))
