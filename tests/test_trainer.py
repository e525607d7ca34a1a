"""The trainer on a tiny classifier: schedule, accumulation, frozen weights, exact resume, errors."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from capstone_lib.checkpoint import CheckpointError, list_checkpoints
from capstone_lib.history import plot_history, read_history
from capstone_lib.trainer import TrainConfig, Trainer, default_batches
from capstone_lib.validation import DataError

ROOT = Path(__file__).resolve().parent.parent


class TinyNet(nn.Module):
    """A frozen-able input layer and a trainable head; returns ``.loss`` like an HF model."""

    def __init__(self, dropout: float = 0.0, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(6, 16)
        self.head = nn.Sequential(nn.GELU(), nn.Dropout(dropout), nn.Linear(16, 3))
        self.forwards = 0

    def forward(self, x, labels=None):
        self.forwards += 1
        logits = self.head(self.embed(x))
        loss = None if labels is None else F.cross_entropy(logits, labels, ignore_index=-100)
        return SimpleNamespace(loss=loss, logits=logits)


def make_data(n: int = 24, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def collate(samples: list[dict]) -> dict:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def make_trainer(out, model=None, data=None, groups=None, eval_fn=None, **cfg) -> Trainer:
    model = model or TinyNet()
    base = dict(lr=0.05, warmup_ratio=0.1, epochs=4, micro_batch_size=4, grad_accum=2, log_every=0)
    base.update(cfg)
    groups = groups or [{"params": list(model.parameters())}]
    return Trainer(model, groups, data or make_data(), collate, TrainConfig(**base), out, eval_fn=eval_fn)


def rng_eval(model, step):
    """A validation that uses the torch RNG, as sampled generation would."""
    return {"val_noise": float(torch.rand(())), "samples": [{"generated": "a", "reference": "b"}]}


def test_schedule_is_linear_warmup_then_cosine_for_every_group(tmp_path):
    model = TinyNet()
    groups = [{"params": list(model.embed.parameters()), "lr": 0.01},
              {"params": list(model.head.parameters()), "lr": 0.002, "name": "head"}]
    res = make_trainer(tmp_path, model, groups=groups, max_steps=20, warmup_ratio=0.2, micro_batch_size=2,
                       grad_accum=1).fit()
    lrs, head = [r["lr"] for r in res.history], [r["lr_head"] for r in res.history]
    warm = math.ceil(0.2 * 20)
    assert len(lrs) == 20 and lrs[0] == 0.0
    assert all(a < b for a, b in zip(lrs[:warm], lrs[1:warm + 1]))            # linear warmup up to the peak
    assert lrs[warm] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))            # then decreasing
    for k in range(warm, 20):                                                 # along a half cosine
        assert lrs[k] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * (k - warm) / (20 - warm))))
    assert lrs[-1] < 0.02 * 0.01
    assert all(h == pytest.approx(0.2 * lr) for h, lr in zip(head, lrs))         # each group scaled alike


def test_accumulation_matches_a_bigger_micro_batch(tmp_path):
    a, b = TinyNet(), TinyNet()
    ra = make_trainer(tmp_path / "a", a, micro_batch_size=2, grad_accum=2, epochs=2).fit()
    rb = make_trainer(tmp_path / "b", b, micro_batch_size=4, grad_accum=1, epochs=2).fit()
    assert ra.step == rb.step == 12
    assert [r["loss"] for r in ra.history] == pytest.approx([r["loss"] for r in rb.history], rel=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    assert not torch.equal(a.head[2].weight, TinyNet().head[2].weight)        # it did train


def test_frozen_weights_stay_out_of_optimizer_and_checkpoint(tmp_path, capsys):
    model = TinyNet()
    model.embed.requires_grad_(False)
    before = model.embed.weight.clone()
    trainer = make_trainer(tmp_path, model, groups=[{"params": list(model.parameters())}], max_steps=4)
    assert "2 frozen parameter tensor(s) in param_groups left out of the optimizer" in capsys.readouterr().out
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.head.parameters()}
    res = trainer.fit()
    saved = load_file(str(res.checkpoint / "model.safetensors"))
    assert set(saved) == {"head.2.weight", "head.2.bias"}
    assert torch.equal(model.embed.weight, before)
    assert torch.equal(saved["head.2.weight"], model.head[2].weight)


def test_trainable_parameter_outside_every_group_is_an_error(tmp_path):
    model = TinyNet()
    with pytest.raises(ValueError, match="in no param group"):
        make_trainer(tmp_path, model, groups=[{"params": list(model.head.parameters())}])
    model.embed.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_trainer(tmp_path, model, groups=[{"params": list(model.embed.parameters())}])


def _final(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(out)[-1] / "model.safetensors"))


def test_resume_is_bit_for_bit_across_epochs_and_validation(tmp_path):
    cfg = dict(epochs=3, save_every=2, eval_every=3, keep_last=2)
    ref = make_trainer(tmp_path / "ref", TinyNet(dropout=0.3), eval_fn=rng_eval, **cfg).fit()
    out = tmp_path / "run"
    for stop in (2, 5, 7):                     # stops between checkpoints, mid-epoch and at an epoch end
        init = 0 if stop == 2 else stop        # a resumed run's init is overwritten by the checkpoint
        make_trainer(out, TinyNet(dropout=0.3, seed=init), eval_fn=rng_eval, **cfg).fit(stop_at_step=stop)
    model = TinyNet(dropout=0.3, seed=99)      # a different init: everything must come from the checkpoint
    res = make_trainer(out, model, eval_fn=rng_eval, **cfg).fit()
    assert res.resumed_from.name == "step-000007" and res.step == ref.step == 9
    assert res.history == ref.history
    ref_w, w = _final(tmp_path / "ref"), _final(out)
    assert all(torch.equal(ref_w[k], w[k]) for k in ref_w)
    assert read_history(out) == ref.history                   # metrics.jsonl rewritten on resume
    assert [p.name for p in list_checkpoints(out)] == ["step-000008", "step-000009"]   # keep_last=2


def test_finished_run_loads_weights_and_does_nothing(tmp_path):
    first = TinyNet()
    make_trainer(tmp_path, first, max_steps=3).fit()
    again = TinyNet(seed=5)
    res = make_trainer(tmp_path, again, max_steps=3).fit()
    assert res.step == 3 and again.forwards == 0
    assert torch.equal(again.head[2].weight, first.head[2].weight)


def test_corrupt_latest_checkpoint_falls_back_with_a_message(tmp_path, capsys):
    ref = make_trainer(tmp_path / "ref", TinyNet(dropout=0.2), max_steps=6, save_every=2, keep_last=3).fit()
    out = tmp_path / "run"
    make_trainer(out, TinyNet(dropout=0.2), max_steps=6, save_every=2, keep_last=3).fit(stop_at_step=5)
    newest = out / "step-000005" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-3] ^= 0xFF                           # one flipped byte in a tensor
    newest.write_bytes(bytes(data))
    (out / "step-000004" / "state.pt").write_bytes(b"")     # and a truncated file in the one before
    capsys.readouterr()
    res = make_trainer(out, TinyNet(dropout=0.2, seed=3), max_steps=6, save_every=2, keep_last=3).fit()
    text = capsys.readouterr()
    text = text.out + text.err
    assert "step-000005 is corrupt" in text and "sha256" in text
    assert "step-000004 is corrupt" in text and "size 0 bytes" in text
    assert res.resumed_from.name == "step-000002"
    assert (out / "step-000005.corrupt").is_dir()
    assert res.history == ref.history
    assert all(torch.equal(v, _final(out)[k]) for k, v in _final(tmp_path / "ref").items())


def test_resume_modes(tmp_path):
    with pytest.raises(CheckpointError, match="no loadable checkpoint"):
        make_trainer(tmp_path, max_steps=2).fit(resume=True)
    make_trainer(tmp_path, max_steps=4, save_every=1, keep_last=5).fit()
    res = make_trainer(tmp_path, max_steps=4, save_every=1).fit(resume=tmp_path / "step-000002")
    assert res.resumed_from.name == "step-000002" and res.step == 4
    fresh = make_trainer(tmp_path, max_steps=4).fit(resume=False)
    assert fresh.resumed_from is None and [p.name for p in list_checkpoints(tmp_path)] == ["step-000004"]
    other = TinyNet()
    other.embed.requires_grad_(False)
    with pytest.raises(CheckpointError, match="different trainable tensors"):
        make_trainer(tmp_path, other, max_steps=8, groups=[{"params": list(other.head.parameters())}]).fit()


def test_batch_without_any_supervised_label_is_an_error(tmp_path):
    data = make_data(8)
    for s in data[4:]:
        s["labels"] = torch.tensor(-100)
    batches = lambda epoch: [[0, 1, 2, 3], [4, 5, 6, 7]]   # noqa: E731
    model = TinyNet()
    trainer = Trainer(model, [{"params": list(model.parameters())}], data, collate,
                      TrainConfig(lr=0.01, micro_batch_size=4, log_every=0), tmp_path, batches_for_epoch=batches)
    with pytest.raises(DataError, match=r"record \[4, 5, 6, 7\]: .*no supervised label"):
        trainer.fit()


def test_non_finite_loss_and_bad_batches_are_errors(tmp_path):
    data = make_data(8)
    data[5]["x"] = torch.full((6,), float("nan"))
    with pytest.raises(FloatingPointError, match="loss is nan at step"):
        make_trainer(tmp_path / "nan", data=data, micro_batch_size=8, grad_accum=1).fit()
    model = TinyNet()
    with pytest.raises(DataError, match="outside 0..7"):
        Trainer(model, [{"params": list(model.parameters())}], make_data(8), collate,
                TrainConfig(lr=0.01), tmp_path / "idx", batches_for_epoch=lambda e: [[0, 1], [8]]).fit()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_on_cpu(tmp_path, precision):
    res = make_trainer(tmp_path, precision=precision, max_steps=3).fit()
    assert all(math.isfinite(r["loss"]) for r in res.history)
    assert ("loss_scale" in res.history[-1]) == (precision == "fp16")


def test_default_batches_are_a_seeded_shuffle():
    a = default_batches(10, 4, seed=3, epoch=1)
    assert a == default_batches(10, 4, seed=3, epoch=1) != default_batches(10, 4, seed=3, epoch=2)
    assert [len(b) for b in a] == [4, 4, 2] and sorted(sum(a, [])) == list(range(10))


def test_plot_history_draws_loss_lr_and_eval(tmp_path):
    make_trainer(tmp_path, max_steps=6, eval_every=3, eval_fn=rng_eval).fit()
    fig = plot_history(tmp_path)
    assert len(fig.axes) == 3
    assert [line.get_label() for line in fig.axes[0].lines] == ["train loss"]
    assert fig.axes[2].lines[0].get_label() == "val_noise" and len(fig.axes[2].lines[0].get_xdata()) == 2


# --------------------------------------------------------------------------------------------------
# Unwritable and full output directories, in one child process: a read-only directory needs a
# process without CAP_DAC_OVERRIDE (root drops it with setpriv), and a full disk is simulated with
# RLIMIT_FSIZE, which the child sets on itself (a too-large write then fails with EFBIG).
# --------------------------------------------------------------------------------------------------
_CHILD = textwrap.dedent("""
    import sys, torch
    sys.path[:0] = [{tests!r}, {root!r}]
    from test_trainer import TinyNet, make_trainer
    from capstone_lib.checkpoint import CheckpointError

    def attempt(tag, out):
        model = TinyNet()
        try:
            make_trainer(out, model, max_steps=4, save_every=2).fit()
        except CheckpointError as err:
            print(tag, "CHECKPOINT_ERROR", err, "FORWARDS", model.forwards)
        else:
            print(tag, "NO_ERROR")

    attempt("READ_ONLY", {read_only!r})
    import resource, signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))
    attempt("DISK_FULL", {full!r})
""")


@pytest.fixture(scope="module")
def unwritable(tmp_path_factory):
    """Run the child once; returns its lines keyed by scenario, and the two directories."""
    base = tmp_path_factory.mktemp("unwritable")
    ro, full = base / "ro", base / "full"
    ro.mkdir()
    make_trainer(full, TinyNet(), max_steps=4, save_every=2).fit(stop_at_step=2)
    limit = (full / "step-000002" / "state.pt").stat().st_size // 2
    prefix: tuple = ()
    if os.geteuid() == 0:                      # root ignores permissions unless it drops the capability
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: cannot make a directory read-only for the test")
        prefix = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--")
    code = _CHILD.format(tests=str(ROOT / "tests"), root=str(ROOT), read_only=str(ro / "ckpts"),
                         full=str(full), limit=limit)
    ro.chmod(0o555)
    try:
        proc = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=180)
    finally:
        ro.chmod(0o755)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(("READ_ONLY", "DISK")))
    return lines, ro, full


def test_read_only_output_dir_fails_before_training(unwritable):
    lines, ro, _ = unwritable
    out = lines["READ_ONLY"]
    assert out.startswith("CHECKPOINT_ERROR"), out
    assert "is not writable" in out and str(ro / "ckpts") in out
    assert out.endswith("FORWARDS 0")                         # nothing was trained
    assert not (ro / "ckpts").exists()


def test_full_disk_at_checkpoint_write_keeps_previous_checkpoint(unwritable):
    lines, _, full = unwritable
    out = lines["DISK_FULL"]
    assert out.startswith("CHECKPOINT_ERROR could not write checkpoint step 4"), out
    assert "disk full" in out and str(full / "step-000004.tmp") in out
    assert "earlier checkpoints" in out and "intact" in out
    assert [p.name for p in full.iterdir() if p.name.startswith("step-")] == ["step-000002"]
    res = make_trainer(full, TinyNet(), max_steps=4, save_every=2).fit()   # space is back: resumes
    assert res.resumed_from.name == "step-000002" and res.step == 4
    assert json.loads((full / "step-000004" / "meta.json").read_text())["step"] == 4


def test_nan_weights_after_resume_are_named_not_blamed_on_the_learning_rate(tmp_path):
    """A checkpoint whose weights are NaN (written after divergence) is refused on resume with what
    is wrong; weights that turn NaN in memory make the loss error say so too."""
    from capstone_lib.checkpoint import load_checkpoint, save_checkpoint

    out = tmp_path / "run"
    make_trainer(out, max_steps=4, save_every=2).fit(stop_at_step=2)
    ckpt = load_checkpoint(out / "step-000002")
    poisoned = {k: torch.full_like(v, float("nan")) if k.startswith("head.") else v
                for k, v in ckpt.tensors.items()}
    save_checkpoint(out, 2, poisoned, ckpt.state, ckpt.meta, keep_last=None)    # a valid manifest
    with pytest.raises(CheckpointError, match=r"not finite \(NaN/inf in 2 tensor\(s\).*resume=False"):
        make_trainer(out, max_steps=4, save_every=2).fit()

    model = TinyNet()
    with torch.no_grad():
        model.head[2].weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="trainable weights themselves are not finite"):
        make_trainer(tmp_path / "fresh", model, max_steps=2).fit(resume=False)
