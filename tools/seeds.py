"""`make seeds`: the whole `cpu` course from three runtime seeds; every seed must meet the bar.

Each seed runs ``python -m capstone_lib.course --profile cpu`` with ``CAPSTONE_SEED`` set and its
own runs folder (``runs/seeds/seed-<n>/cpu``), so nothing is reused between seeds: pretraining,
the tiny CLIP, both stages and the evaluation all start from that seed. The ShapesWorld data
(its own seed, ``data.shapesworld.seed``) is the same for all. Writes ``runs/seeds/seeds.json``
(per seed: VQA, captions, per-type accuracy, seconds) and exits 1 when a seed misses the bar.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEEDS = (1234, 1235, 1236)
BAR = {"vqa_accuracy": 0.90, "caption_accuracy": 0.80}      # notebook 04's assertions on cpu


def run_seed(seed: int, out: Path) -> dict:
    """Run the course for one seed; return its figures (and whether the run itself passed)."""
    runs = out / f"seed-{seed}"
    env = {**os.environ, "CAPSTONE_SEED": str(seed), "CAPSTONE_RUNS": str(runs), "CAPSTONE_PROFILE": "cpu"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "capstone_lib.course", "--profile", "cpu"], cwd=ROOT, env=env)
    report_file = runs / "cpu" / "report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    row = seed_row(seed, report, proc.returncode == 0)
    row.update(wall_seconds=round(time.perf_counter() - t0, 1), report=str(report_file))
    return row


def seed_row(seed: int, report: dict, course_ok: bool) -> dict:
    """One seed's figures from its report; ``meets_bar`` only when the course ran and both bars hold."""
    ev = report.get("eval", {})
    row = {"seed": seed, "course_ok": course_ok, "seconds_total": report.get("seconds_total"),
           "stages": report.get("stages", {}), "vqa_accuracy": ev.get("vqa_accuracy"),
           "caption_accuracy": ev.get("caption_accuracy"), "vqa_by_type": ev.get("vqa_by_type", {})}
    row["meets_bar"] = course_ok and all(isinstance(row[k], (int, float)) and row[k] >= v for k, v in BAR.items())
    return row


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS))
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "seeds")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        print(f"==> seed {seed}", flush=True)
        rows.append(run_seed(seed, args.out))
        (args.out / "seeds.json").write_text(json.dumps({"bar": BAR, "seeds": rows}, indent=2))
    print(f"\n{'seed':>6} {'VQA':>6} {'captions':>9} {'stages s':>9}  by type")
    for r in rows:
        fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else "  -  "      # noqa: E731
        types = " ".join(f"{t} {a:.2f}" for t, a in sorted(r["vqa_by_type"].items()))
        print(f"{r['seed']:>6} {fmt(r['vqa_accuracy']):>6} {fmt(r['caption_accuracy']):>9} "
              f"{r['seconds_total'] or 0:>9.0f}  {types}{'' if r['meets_bar'] else '  BELOW THE BAR'}")
    print(f"written: {args.out / 'seeds.json'}")
    return 0 if all(r["meets_bar"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
