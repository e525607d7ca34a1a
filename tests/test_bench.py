"""The benchmark at its smallest shape (so that it cannot rot), and its FLOP and memory accounting."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import bench_stages as bench  # noqa: E402


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_runs_at_the_smallest_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSTONE_RUNS", str(tmp_path / "runs"))
    out = tmp_path / "bench" / "bench.json"
    res = bench.run_bench("tiny", "cpu", out=out, log=lambda msg: None)

    saved = json.loads(out.read_text())
    assert saved["shape"] == res["shape"] == bench.SHAPES["tiny"].name
    from capstone_lib.lm_tuning import lm_tuning_levers
    assert saved["lm_tuning"] == list(lm_tuning_levers())      # the levers the course's LM gets
    assert "Phi d=64" in saved["shape_detail"] and "CLIP 32px/16" in saved["shape_detail"]
    assert _positive(saved["peak_flops"]["fp32"])

    s1 = saved["stage1"]
    for key in ("samples_per_s", "tokens_per_s", "mfu", "peak_flops", "cache_speedup",
                "cache_speedup_with_decode", "in_loop_samples_per_s"):
        assert _positive(s1[key]), key
    assert s1["mfu"] < 1.5
    assert s1["tokens_per_s"] == pytest.approx(s1["samples_per_s"] * s1["seq_len"])
    assert len(s1["times_s"]) == bench.SHAPES["tiny"].reps
    assert 0 < s1["profile"]["matmul_share"] <= 1 and s1["profile"]["top_ops"]

    for key in ("checkpointing_off", "checkpointing_on"):
        s2 = saved["stage2"][key]
        assert s2["gradient_checkpointing"] is (key == "checkpointing_on")
        for k in ("samples_per_s", "tokens_per_s", "mfu"):
            assert _positive(s2[k]), (key, k)
        mem = s2["memory"]
        assert _positive(mem["step_gib"]) and _positive(mem["resident_gib"])
        assert mem["peak_gib"] == pytest.approx(mem["step_gib"] + mem["resident_gib"])
    # model FLOPs do not count recomputation: the same count with checkpointing on and off
    assert saved["stage2"]["checkpointing_on"]["flops_per_step"] == saved["stage2"]["checkpointing_off"]["flops_per_step"]

    gen = saved["generate"]
    for k in ("ttft_s", "tokens_per_s", "kv_speedup"):
        assert _positive(gen[k]), k
    assert gen["new_tokens"] == bench.SHAPES["tiny"].new_tokens
    assert saved["course_seconds"] is None          # no cpu course report under this CAPSTONE_RUNS
    assert saved["goals"] == []                     # the goals are for the cpu/gpu shapes

    table = bench.format_table(res)
    for word in ("LM tuning", "peak_flops", "stage1", "mfu", "cache_speedup", "stage2", "peak memory",
                 "time to first token", "kv_speedup", "course_seconds", "matmul kernels take"):
        assert word in table, word


def test_course_seconds_reads_the_cpu_report(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSTONE_RUNS", str(tmp_path))
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "report.json").write_text(json.dumps(
        {"stages": {"01_pretrain": 120.5, "03_stage1": 60.0}, "seconds_total": 180.5}))
    assert bench.course_seconds() == {"01_pretrain": 120.5, "03_stage1": 60.0, "total": 180.5}


def test_stage1_flop_count_follows_the_documented_formula(tmp_path):
    """Frozen LM: 4 k n per token (no weight gradient); projector: 4 k n (layer 1), 6 k n (layer 2)."""
    from capstone_lib.batching import collate_padded
    from capstone_lib.mm_model import VisionLanguageModel
    from capstone_lib.projector import build_projector

    shape = bench.SHAPES["tiny"]
    lm = bench.random_phi(shape, torch.float32, torch.device("cpu"))
    for p in lm.parameters():
        p.requires_grad_(False)
    vdim, d = shape.vision["hidden_size"], lm.config.hidden_size
    n_img, B, text = bench.n_patches(shape.vision), 3, 7
    projector = build_projector("mlp2x_gelu", vdim, d)
    image_id = lm.config.vocab_size - 1
    data = bench.synthetic_samples(B, n_img, text, image_id, image_id)
    feats = torch.randn(B, n_img, vdim)
    model = VisionLanguageModel(lm, projector, image_id)
    trainer = bench._trainer(model, [{"params": list(projector.parameters())}], data,
                             lambda s: collate_padded(s, 0, lambda ids: feats[ids]), "fp32",
                             torch.device("cpu"), tmp_path)
    batch = trainer.collate(data)
    T = batch["input_ids"].shape[1]
    assert T == n_img + text

    lm_weights = sum(m.in_features * m.out_features for m in lm.modules() if isinstance(m, nn.Linear))
    expected = (4 * lm_weights * B * T + 4 * vdim * d * B * n_img + 6 * d * d * B * n_img
                + bench.attention_flops(lm.config.num_hidden_layers, T, d, B, backward=True))
    assert bench.step_flops(trainer, batch, lm.config.num_hidden_layers, d) == expected
    # one real step works and the projector learns (its weights change)
    before = projector.linear_2.weight.detach().clone()
    assert math.isfinite(bench.train_step(trainer, batch))
    assert not torch.equal(before, projector.linear_2.weight)


def test_encoder_flops_match_the_linear_hooks():
    """The analytic count of a CLIP tower's forward agrees with the hooks on a real forward."""
    vision = bench.SHAPES["tiny"].vision
    tower = bench.random_clip_vision(vision, torch.float32, torch.device("cpu"))
    images, size, patch, d = 3, vision["image_size"], vision["patch_size"], vision["hidden_size"]
    with bench.count_linear_flops(tower) as totals, torch.no_grad():
        tower(torch.randn(images, 3, size, size), output_hidden_states=True)
    assert totals["backward"] == 0                    # frozen tower, no grad: forward only
    tokens = (size // patch) ** 2 + 1
    conv = 2 * images * (tokens - 1) * 3 * patch * patch * d
    attention = bench.attention_flops(vision["num_hidden_layers"], tokens, d, images, backward=False)
    assert bench.encoder_flops(tower, images) == totals["forward"] + conv + attention


def test_step_peak_bytes_sees_what_a_step_allocates():
    def step():
        block = torch.ones(16, 1024, 1024)          # 64 MiB, freed before the step ends
        del block
        return torch.ones(1024, 1024)               # 4 MiB

    peak = bench.step_peak_bytes(step)
    assert 64 * 2**20 <= peak < 72 * 2**20, peak / 2**20


def test_goals_say_by_how_much_they_are_missed():
    res = {"stage1": {"mfu": 0.2}, "stage1_vit_b32": {"cache_speedup": 4.5},
           "generate": {"kv_speedup": 2.5}, "stage2": {"checkpointing_on": {"memory": {"peak_gib": 1.0}}},
           "machine": {"name": "cpu"}}
    goals = {g["goal"]: g for g in bench.check_goals(res, "cpu", torch.device("cpu"))}
    mfu = goals["stage1 mfu (CPU bench shape)"]
    assert not mfu["met"] and mfu["missed_by"] == "50%" and mfu["target"] == 0.40
    assert goals["cache_speedup (ViT-B/32)"]["met"] and goals["cache_speedup (ViT-B/32)"]["missed_by"] is None
    assert goals["kv_speedup (128 new tokens)"]["missed_by"] == "50%"
    assert not any("T4" in name for name in goals)       # the memory goal is for the GPU shape only
