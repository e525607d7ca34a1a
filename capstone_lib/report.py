"""The course report: ``runs/<profile>/report.json``, one section per stage plus ``eval``."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from .profiles import Profile
from .fileio import write_json_atomic


def report_path(profile: Profile) -> Path:
    """Path of the profile's report file."""
    return profile.run_dir / "report.json"


def load_report(profile: Profile) -> dict[str, Any]:
    """The report so far (an empty skeleton if none was written yet)."""
    path = report_path(profile)
    if path.exists():
        return json.loads(path.read_text())
    return {"profile": profile.name, "stages": {}, "eval": {}, "metrics": {}}


def _write(profile: Profile, report: dict[str, Any]) -> None:
    path = report_path(profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    report["seconds_total"] = round(sum(report["stages"].values()), 1)
    report["machine"] = {"platform": platform.platform(), "processor": platform.processor(),
                         "cpus": os.cpu_count()}
    write_json_atomic(path, report, indent=2, sort_keys=True)


def record_stage(profile: Profile, stage: str, seconds: float,
                 metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Store a stage's wall-clock seconds and metrics in the report; returns the report."""
    report = load_report(profile)
    report["stages"][stage] = round(float(seconds), 1)
    if metrics:
        report["metrics"][stage] = metrics
    _write(profile, report)
    return report


def record_eval(profile: Profile, key: str, results: dict[str, Any]) -> dict[str, Any]:
    """Store evaluation results: ``key`` is ``final`` (merged into ``eval``) or a phase name."""
    report = load_report(profile)
    if key == "final":
        report["eval"].update(results)
    else:
        report["eval"].setdefault("phases", {})[key] = results
    _write(profile, report)
    return report


class StageTimer:
    """Context manager timing one stage and writing it to the report on exit."""

    def __init__(self, profile: Profile, stage: str):
        self.profile, self.stage, self.metrics = profile, stage, {}

    def __enter__(self) -> "StageTimer":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            record_stage(self.profile, self.stage, time.perf_counter() - self.t0, self.metrics)
