"""The seed-bug lessons: rerun a slice of stage 2 with one defect of the earlier write-ups on.

Each defect is a switch in ``stage1.SeedBugs`` (default off). ``run_lessons`` trains the
same short slice with the defect on, evaluates it with the same held-out evaluation as
the course, and returns one row per defect next to the correct recipe.
"""
from __future__ import annotations

from typing import Any

from .profiles import Profile
from .stage1 import SeedBugs, ensure_projector, load_projector

DEFECTS: dict[str, SeedBugs] = {
    "correct recipe": SeedBugs(),
    "labels not masked": SeedBugs(unmasked_labels=True),
    "no teacher forcing": SeedBugs(no_teacher_forcing=True),
}


def evaluate_model(profile: Profile, vlm, tokenizer, n_questions: int, n_captions: int) -> dict[str, Any]:
    """The course's held-out evaluation for one model (ShapesWorld questions, or COCO captions + POPE)."""
    from .evaluate import evaluate_course
    from .feature_cache import ensure_feature_cache
    from .real_data import dataset_paths

    return evaluate_course(profile, vlm, tokenizer, ensure_feature_cache(profile, "val"),
                           dataset_paths(profile), n_questions, n_captions)


def without_adapter(profile: Profile):
    """The earlier demo's bug: the trained projector, but the LM's LoRA never loaded."""
    from .chat import IMAGE_TOKEN
    from .mm_model import VisionLanguageModel
    from .pretrain import load_language_model
    from .stage2 import stage2_dir

    from .trainer import resolve_device

    lm, tokenizer = load_language_model(profile)
    projector, _ = load_projector(stage2_dir(profile) / "projector")
    vlm = VisionLanguageModel(lm, projector, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    return vlm.to(resolve_device(profile.runtime.device)), tokenizer


def run_lessons(profile: Profile, steps: int, n_questions: int = 100, n_captions: int = 40,
                defects: dict[str, SeedBugs] | None = None) -> dict[str, dict[str, Any]]:
    """Train ``steps`` stage-2 steps per defect from the stage-1 projector; evaluate each."""
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
