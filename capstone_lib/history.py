"""A training run's history: ``metrics.jsonl`` (one record per optimizer step, eval results merged in), read and plotted."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def read_history(source: str | Path) -> list[dict[str, Any]]:
    """The per-step records of a run: ``metrics.jsonl`` in ``source`` (a dir) or the file itself."""
    path = Path(source)
    path = path / METRICS_FILE if path.is_dir() else path
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_history(history: list[dict[str, Any]] | str | Path, title: str | None = None):
    """A matplotlib Figure: training loss (and eval losses) by step, learning rate, other eval metrics."""
    from matplotlib.figure import Figure

    records = history if isinstance(history, list) else read_history(history)
    skip = {"step", "epoch", "loss", "grad_norm", "loss_scale"}
    numeric = sorted({k for r in records for k, v in r.items() if k not in skip and not k.startswith("lr")
                      and isinstance(v, (int, float)) and not isinstance(v, bool)})
    losses = [k for k in numeric if "loss" in k]
    others = [k for k in numeric if k not in losses]
    fig = Figure(figsize=(5 * (2 + bool(others)), 3.6), layout="constrained")
    axes = fig.subplots(1, 2 + bool(others), squeeze=False)[0]
    steps = [r["step"] for r in records]
    axes[0].plot(steps, [r.get("loss") for r in records], label="train loss", lw=1)
    for k in losses:
        pts = [(r["step"], r[k]) for r in records if k in r]
        axes[0].plot(*zip(*pts), "o-", label=k)
    axes[0].set(xlabel="optimizer step", ylabel="loss", title=title or "loss")
    axes[0].legend()
    for k in sorted({k for r in records for k in r if k.startswith("lr")}):
        axes[1].plot(steps, [r.get(k) for r in records], label=k)
    axes[1].set(xlabel="optimizer step", ylabel="learning rate", title="schedule")
    axes[1].legend()
    if others:
        for k in others:
            pts = [(r["step"], r[k]) for r in records if k in r]
            axes[2].plot(*zip(*pts), "o-", label=k)
        axes[2].set(xlabel="optimizer step", title="validation")
        axes[2].legend()
    return fig
