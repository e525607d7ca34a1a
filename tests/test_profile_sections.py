"""Typed profile sections: a misspelled or mistyped setting fails when the profile is built or read."""
from __future__ import annotations

import dataclasses

import pytest

from capstone_lib.profile_sections import SECTIONS, SettingsError
from capstone_lib.profiles import PROFILE_NAMES, _RAW, get_profile


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_every_profile_builds_typed_sections(name):
    p = get_profile(name)
    for section, cls in SECTIONS.items():
        assert isinstance(getattr(p, section), cls)
    assert p.lm.name == _RAW[name]["lm"]["name"]


def test_a_misspelled_override_lists_the_valid_settings():
    with pytest.raises(SettingsError, match=r"no setting 'max_step'; did you mean 'max_steps'\?.*Valid: .*lora_r"):
        get_profile("smoke", stage2={"max_step": 10})
    with pytest.raises(SettingsError, match=r"no section 'stage3'; did you mean 'stage[12]'"):
        get_profile("smoke", stage3={"lr": 1.0})


def test_a_misspelled_read_names_the_section_and_the_fix():
    p = get_profile("smoke")
    with pytest.raises(AttributeError, match=r"'stage2' has no setting 'lora_rank'.*Valid:"):
        p.stage2.lora_rank
    assert getattr(p.data, "download_dir", "default") is None       # optional settings exist, as None
    assert getattr(p.data, "not_a_setting", "default") == "default"


@pytest.mark.parametrize("override, message", [
    ({"stage2": {"max_steps": "10"}}, r"stage2.max_steps must be int or None, got '10'"),
    ({"stage1": {"lr": "fast"}}, r"stage1.lr must be float"),
    ({"runtime": {"allow_skips": 1}}, r"runtime.allow_skips must be bool"),
    ({"eval": {"n_questions": True}}, r"eval.n_questions must be int"),
])
def test_a_wrong_type_is_refused_at_build(override, message):
    with pytest.raises(SettingsError, match=message):
        get_profile("smoke", **override)


def test_sections_are_read_only():
    p = get_profile("smoke")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.stage1.lr = 1.0


def test_seed_from_the_environment(monkeypatch):
    monkeypatch.setenv("CAPSTONE_SEED", "1236")
    assert get_profile("cpu").runtime.seed == 1236
    monkeypatch.setenv("CAPSTONE_SEED", "one")
    with pytest.raises(ValueError, match="CAPSTONE_SEED must be an integer"):
        get_profile("cpu")


def test_make_seeds_judges_each_seed_by_the_course_bar():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import seeds

    good = {"seconds_total": 640.0, "eval": {"vqa_accuracy": 0.95, "caption_accuracy": 0.9,
                                            "vqa_by_type": {"exists": 0.9}}}
    assert seeds.seed_row(1234, good, course_ok=True)["meets_bar"]
    assert not seeds.seed_row(1235, good, course_ok=False)["meets_bar"]           # the notebook failed
    low = {"eval": {"vqa_accuracy": 0.95, "caption_accuracy": 0.79}}
    assert not seeds.seed_row(1236, low, course_ok=True)["meets_bar"]
    assert not seeds.seed_row(1236, {}, course_ok=True)["meets_bar"]             # no report at all
    assert seeds.BAR == {"vqa_accuracy": 0.90, "caption_accuracy": 0.80}


def test_both_stages_build_their_train_config_from_their_section():
    from capstone_lib.trainer import TrainConfig

    p = get_profile("smoke", runtime={"seed": 7}, stage2={"max_steps": 11, "grad_accum": 3})
    cfg = TrainConfig.from_stage({**vars(p.stage2), "eval_every": None}, p.runtime)
    assert (cfg.max_steps, cfg.grad_accum, cfg.eval_every, cfg.seed, cfg.precision) == (11, 3, None, 7, "fp32")
    assert TrainConfig.from_stage(vars(p.stage1), p.runtime).micro_batch_size == p.stage1.micro_batch_size
