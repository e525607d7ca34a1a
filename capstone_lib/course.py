"""Run the whole course: every notebook in order on one profile, then print the report.

``python -m capstone_lib.course --profile cpu`` (what ``make course`` runs) executes
``notebooks/0*.ipynb`` with nbclient, writes the executed copies to
``runs/<profile>/notebooks/`` and ends with the report (``runs/<profile>/report.json``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .profiles import REPO_ROOT, get_profile
from .fileio import write_json_atomic
from .report import load_report, report_path


def notebooks(root: Path = REPO_ROOT / "notebooks") -> list[Path]:
    """The course notebooks in order (``01_...`` to ``05_...``)."""
    return sorted(p for p in root.glob("[0-9][0-9]*_*.ipynb"))


def run_notebook(path: Path, out_dir: Path, timeout: int = 3600) -> float:
    """Execute one notebook (kernel cwd = notebooks/), save the executed copy; return seconds."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    finally:
        out_dir.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out_dir / path.name)
    return time.perf_counter() - t0


def summary(report: dict) -> str:
    """A short human-readable version of the report."""
    lines = [f"profile {report.get('profile')}: {report.get('seconds_total', 0):.0f} s in stages"]
    for stage, sec in report.get("stages", {}).items():
        lines.append(f"  {stage:<14}{sec:>8.1f} s")
    ev = report.get("eval", {})
    for phase, r in ev.get("phases", {}).items():
        if "vqa_accuracy" in r:            # ShapesWorld
            lines.append(f"  eval {phase:<22} VQA {r['vqa_accuracy']:.3f}  "
                         f"caption {r.get('caption_accuracy', float('nan')):.3f}")
        elif "pope_accuracy" in r:         # COCO (GPU profiles and their rehearsals)
            lines.append(f"  eval {phase:<22} POPE accuracy {r['pope_accuracy']:.3f}  "
                         f"CIDEr {100 * r.get('cider', float('nan')):.1f}")
    if "vqa_accuracy" in ev:
        lines.append(f"  FINAL: VQA {ev['vqa_accuracy']:.3f} on {ev.get('n_questions')} held-out questions, "
                     f"caption accuracy {ev.get('caption_accuracy', float('nan')):.3f}")
        for t, acc in sorted(ev.get("vqa_by_type", {}).items()):
            lines.append(f"    {t:<10}{acc:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profile", default=os.environ.get("CAPSTONE_PROFILE", "cpu"))
    ap.add_argument("--only", nargs="*", help="notebook name prefixes to run, e.g. 03 04")
    args = ap.parse_args(argv)
    profile = get_profile(args.profile)
    os.environ["CAPSTONE_PROFILE"] = profile.name
    out_dir = profile.run_dir / "notebooks"
    t0 = time.perf_counter()
    for nb in notebooks():
        if args.only and not any(nb.name.startswith(p) for p in args.only):
            continue
        print(f"==> {nb.name} (profile {profile.name})", flush=True)
        try:
            sec = run_notebook(nb, out_dir)
        except Exception as exc:  # nbclient raises CellExecutionError with the cell's traceback
            print(f"FAILED in {nb.name}; executed copy with the error: {out_dir / nb.name}\n{exc}",
                  file=sys.stderr)
            return 1
        print(f"    done in {sec:.0f} s", flush=True)
    report = load_report(profile)
    report["course_wall_seconds"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(report_path(profile), report, indent=2, sort_keys=True)
    print(summary(report))
    print(f"report: {report_path(profile)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
