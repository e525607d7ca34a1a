"""The GPU profiles' own plumbing, run on CPU: plans and device checks, budgets, the T4 fp16 path, mirrors."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from capstone_lib.lm_spec import lm_preset
from capstone_lib.plan import PlanError, find_device, plan_training
from capstone_lib.profiles import get_profile, pick_gpu_profile
from capstone_lib.validation import sample_subset


def _fake_gpu(monkeypatch, name: str, memory_gib: float, bf16: bool):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(name=name, total_memory=int(memory_gib * 2**30)))


def _llama_config(hidden, layers, vocab=49153):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=int(hidden * 4),
                       num_attention_heads=max(1, hidden // 64), vocab_size=vocab, tie_word_embeddings=True)


def test_a_profile_the_card_cannot_run_stops_with_advice(monkeypatch):
    with pytest.raises(PlanError, match="no GPU is visible"):
        find_device(get_profile("a100"))
    _fake_gpu(monkeypatch, "Tesla T4", 15.0, bf16=False)
    with pytest.raises(PlanError, match="bf16, which the Tesla T4 does not have: use CAPSTONE_PROFILE=t4"):
        find_device(get_profile("a100"))
    assert find_device(get_profile("t4")).peak_tflops == 65.0


def test_stage2_plan_estimates_time_and_refuses_what_does_not_fit(monkeypatch):
    _fake_gpu(monkeypatch, "NVIDIA A100-SXM4-40GB", 39.4, bf16=True)
    a100 = get_profile("a100")
    s2 = a100.stage2
    smol17 = _llama_config(2048, 24)           # SmolLM2-1.7B's shape
    plan = plan_training(a100, "stage2", 20_000, 600, smol17, s2.micro_batch_size,
                         s2.micro_batch_size * s2.grad_accum, s2.max_len, 157, trainable_params=40_000_000,
                         quantize_4bit=True, checkpointing=True).check()
    assert 600 < plan.seconds < 6 * 3600 and 3 < plan.peak_gib < 39.4 * 0.92
    assert "~" in str(plan) and "GiB of 39 GiB" in str(plan)
    # the same settings without checkpointing and at 4x the micro-batch do not fit 40 GB
    big = plan_training(a100, "stage2", 20_000, 600, smol17, 4 * s2.micro_batch_size, 512, s2.max_len, 40,
                        quantize_4bit=True, checkpointing=False)
    with pytest.raises(PlanError, match="lower micro_batch_size or max_len"):
        big.check()


def test_l4_and_other_small_cards_get_the_t4_profile():
    assert pick_gpu_profile(8, 22.0) == "t4"          # L4: bf16, but 24 GB
    assert pick_gpu_profile(8, 39.4) == "a100" and pick_gpu_profile(9, 79.0) == "a100"
    assert pick_gpu_profile(7, 15.0) == "t4"


def test_gpu_budgets():
    """Each GPU stage checkpoints within minutes; the lessons cost about one stage 2, not ten."""
    for name in ("t4", "a100"):
        p = get_profile(name)
        assert p.stage1.save_every <= 50 and p.stage2.save_every <= 50
        assert p.stage1.save_every_minutes and p.stage2.save_every_minutes <= 15
        assert p.eval.lesson_steps * 4 <= 200
    assert get_profile("t4").pretrain.max_tokens <= 10_000_000        # fp32 on a T4: ~1 h


def test_subset_is_a_seeded_random_sample_not_the_head():
    records = list(range(1000))
    a, b = sample_subset(records, 100, seed=1), sample_subset(records, 100, seed=1)
    assert a == b and a == sorted(a) and len(set(a)) == 100
    assert a != records[:100] and max(a) > 500
    assert sample_subset(records, None, 0) == records and sample_subset(records, 5000, 0) == records


def test_checkpoint_by_wall_clock(tmp_path):
    """``save_every_minutes``: a checkpoint whenever that much time has passed, whatever the step count."""
    from capstone_lib.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = model

        def forward(self, x, y):
            return SimpleNamespace(loss=((self.lin(x) - y) ** 2).mean())

    net = Wrapped()
    data = [{"x": torch.randn(4), "y": torch.randn(1)} for _ in range(12)]

    def collate(samples):
        return {"x": torch.stack([s["x"] for s in samples]), "y": torch.stack([s["y"] for s in samples])}

    cfg = TrainConfig(lr=1e-2, max_steps=6, micro_batch_size=2, save_every=None, save_every_minutes=1e-9,
                      keep_last=10)
    trainer = Trainer(net, [{"name": "all", "params": list(net.parameters()), "lr": 1e-2}], data, collate, cfg,
                      tmp_path / "ckpt")
    trainer.fit(resume=False)
    assert len(list((tmp_path / "ckpt").glob("step-*"))) == 6       # one per step: the clock was always due
    cfg.save_every_minutes = None
    trainer2 = Trainer(Wrapped(), [{"name": "all", "params": list(net.parameters()), "lr": 1e-2}], data, collate,
                       cfg, tmp_path / "ckpt2")
    trainer2.fit(resume=False)
    assert len(list((tmp_path / "ckpt2").glob("step-*"))) == 1       # only the last step


@pytest.mark.slow
def test_t4_path_fp16_autocast_with_gradient_scaler_runs_real_steps(monkeypatch, tmp_path):
    """The T4's precision (fp16 autocast + GradScaler) through the real stage 2, on CPU."""
    from capstone_lib.stage2 import train_stage2

    monkeypatch.setenv("CAPSTONE_RUNS", str(tmp_path))
    profile = get_profile("smoke", runtime={"precision": "fp16"},
                          stage2={"max_steps": 3, "save_every": 2, "eval_every": None})
    history = train_stage2(profile)["history"]
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    assert all(r["loss_scale"] > 1 for r in history)              # the scaler is on
    ckpts = sorted((tmp_path / "smoke" / "stage2" / "checkpoints").glob("step-*"))
    assert ckpts, "a checkpoint holds the scaler state"
    again = train_stage2(profile, resume=True)                    # resumes: nothing left to do
    assert len(again["history"]) == 3


def test_real_sources_from_a_mirror_file(monkeypatch, tmp_path):
    from capstone_lib.real_data import RealDataSources
    from capstone_lib.validation import DataError

    monkeypatch.delenv("CAPSTONE_REAL_SOURCES", raising=False)
    assert RealDataSources.from_env() == RealDataSources()
    f = tmp_path / "sources.json"
    f.write_text(json.dumps({"annotations": {"url": "http://127.0.0.1:1/a.zip", "md5": "0" * 32, "size": 3},
                             "image_base_url": "http://127.0.0.1:1"}))
    monkeypatch.setenv("CAPSTONE_REAL_SOURCES", str(f))
    src = RealDataSources.from_env()
    assert src.annotations.url == "http://127.0.0.1:1/a.zip" and src.image_base_url == "http://127.0.0.1:1"
    assert src.train_zip == RealDataSources().train_zip
    f.write_text(json.dumps({"annotation": {}}))
    with pytest.raises(DataError, match="keys from"):
        RealDataSources.from_env()


def test_redpajama_files_are_fetched_by_name_without_listing(monkeypatch, tmp_path):
    import huggingface_hub

    from capstone_lib.pretrain import download_redpajama_sample

    calls = []
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda *a, **k: pytest.fail("listed the repo"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, name, repo_type, local_dir: calls.append(name) or
                        (tmp_path / name).write_text("{}\n"))
    download_redpajama_sample(tmp_path, files=("c4_sample.jsonl", "wikipedia_sample.jsonl"))
    assert calls == ["c4_sample.jsonl", "wikipedia_sample.jsonl"]


def test_phi2_stays_selectable_on_gpu_profiles():
    p = get_profile("t4", lm=lm_preset("phi-2"))
    assert p.lm.hub_id == "microsoft/phi-2" and p.lm.export == "course"


def test_pretraining_plan_uses_the_fp32_peak_on_a_t4(monkeypatch):
    """The T4 pretrains in fp32 (LitGPT's 32-true): no tensor cores, ~8 TFLOP/s, not 65."""
    from capstone_lib.plan import plan_pretraining

    _fake_gpu(monkeypatch, "Tesla T4", 15.0, bf16=False)
    t4 = plan_pretraining(get_profile("t4"), 162_000_000, 10_000_000)
    _fake_gpu(monkeypatch, "NVIDIA A100-SXM4-40GB", 39.4, bf16=True)
    a100 = plan_pretraining(get_profile("a100"), 162_000_000, 10_000_000)
    assert 30 * 60 < t4.seconds < 3 * 3600 and t4.seconds > 20 * a100.seconds
