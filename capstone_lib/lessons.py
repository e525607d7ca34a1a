"""The seed-bug lessons: rerun a slice of stage 2 with one defect of the earlier write-ups on.

Each defect is a switch in ``SeedBugs`` (default off), applied to the encoded samples by the
stage datasets through ``apply_seed_bugs``. ``run_lessons`` trains the
same short slice with the defect on, evaluates it with the same held-out evaluation as
the course, and returns one row per defect next to the correct recipe.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .chat import IGNORE_INDEX
from .profiles import Profile
from .projector import load_projector


@dataclass
class SeedBugs:
    """Defects of the earlier write-ups, switched on only for the lesson in notebook 04."""

    unmasked_labels: bool = False     # supervise image and prompt positions too
    no_teacher_forcing: bool = False  # never feed the answer as input

    def any(self) -> bool:
        """True when any defect is on."""
        return self.unmasked_labels or self.no_teacher_forcing


def apply_seed_bugs(input_ids: list[int], labels: list[int], bugs: SeedBugs | None
                    ) -> tuple[list[int], list[int]]:
    """Re-create a defect of the earlier write-ups on one encoded sample (lesson only).

    The third defect, "adapter not loaded", is a model, not a sample: ``without_adapter``.
    """
    if bugs is None or not bugs.any():
        return input_ids, labels
    if bugs.unmasked_labels:
        labels = list(input_ids)
    if bugs.no_teacher_forcing:
        # The answer never enters the input: the prompt positions are trained to emit it.
        prompt = [t for t, lab in zip(input_ids, labels) if lab == IGNORE_INDEX]
        answer = [lab for lab in labels if lab != IGNORE_INDEX]
        k = min(len(answer), len(prompt))
        input_ids = prompt
        labels = [IGNORE_INDEX] * (len(prompt) - k) + answer[:k]
        # HF shifts labels by one inside the loss; undo that so position i predicts answer[i].
        labels = labels[1:] + [IGNORE_INDEX]
    return input_ids, labels


DEFECTS: dict[str, SeedBugs] = {
    "correct recipe": SeedBugs(),
    "labels not masked": SeedBugs(unmasked_labels=True),
    "no teacher forcing": SeedBugs(no_teacher_forcing=True),
}


def evaluate_model(profile: Profile, vlm, tokenizer, n_questions: int, n_captions: int) -> dict[str, Any]:
    """The course's held-out evaluation for one model (ShapesWorld questions, or COCO captions + POPE)."""
    from .evaluate import evaluate_course
    from .feature_cache import ensure_feature_cache
    from .data_sources import dataset_paths

    return evaluate_course(profile, vlm, tokenizer, ensure_feature_cache(profile, "val"),
                           dataset_paths(profile), n_questions, n_captions)


def without_adapter(profile: Profile):
    """The earlier demo's bug: the trained projector, but the LM's LoRA never loaded."""
    from .chat import IMAGE_TOKEN
    from .mm_model import VisionLanguageModel
    from .language_model import load_language_model
    from .stage2 import stage2_dir

    from .distributed import resolve_device

    lm, tokenizer = load_language_model(profile)
    projector, _ = load_projector(stage2_dir(profile) / "projector")
    vlm = VisionLanguageModel(lm, projector, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    return vlm.to(resolve_device(profile.runtime.device)), tokenizer


def run_lessons(profile: Profile, steps: int, n_questions: int = 100, n_captions: int = 40,
                defects: dict[str, SeedBugs] | None = None) -> dict[str, dict[str, Any]]:
    """Train ``steps`` stage-2 steps per defect from the stage-1 projector; evaluate each."""
    from .stage1 import ensure_projector
    from .stage2 import train_stage2

    rows: dict[str, dict[str, Any]] = {}
    for name, bugs in (defects or DEFECTS).items():
        projector, _ = load_projector(ensure_projector(profile))
        out = profile.run_dir / "lessons" / name.replace(" ", "_")
        res = train_stage2(profile, bugs=bugs, out_dir=out, projector=projector, max_steps=steps,
                           eval_every=None, save_every=None)
        rows[name] = evaluate_model(profile, res["model"], res["tokenizer"], n_questions, n_captions)
        rows[name]["train_loss"] = res["history"][-1].get("loss")
    vlm, tokenizer = without_adapter(profile)
    rows["adapter not loaded"] = evaluate_model(profile, vlm, tokenizer, n_questions, n_captions)
    return rows
