"""Spoken-question accuracy of several transcriber settings, on the validation or the report voices.

Choose settings on ``--set validation`` (questions of held-out images 61-120, ``VALIDATION_VOICES``);
``--set report`` gives the figures on the voices notebook 05 reports (images 1-60, ``REPORT_VOICES``).
Uses the `cpu` course's exported assistant (``make course`` first) and prints, per setting, typed
accuracy and spoken accuracy, exact transcripts, refusals and seconds per clip at each noise level.
Writes ``runs/bench/voice-<set>.json``. docs/EXPERIMENTS.md has the figures of 2026-12-05.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from capstone_lib.assistant import Assistant  # noqa: E402
from capstone_lib.data_sources import dataset_paths  # noqa: E402
from capstone_lib.profiles import get_profile  # noqa: E402
from capstone_lib.shapesworld_scenes import POSITIONS, vocabulary_prompt  # noqa: E402
from capstone_lib.spoken_set import REPORT_VOICES, VALIDATION_VOICES, balanced_questions, build_spoken_set  # noqa: E402
from capstone_lib.transcribe import BUNDLED, Transcriber  # noqa: E402
from capstone_lib.voice_eval import evaluate_spoken, format_spoken  # noqa: E402

PROMPT = vocabulary_prompt()
SETTINGS = {
    "tiny.en": dict(model=BUNDLED),
    "tiny.en+prompt": dict(model=BUNDLED, initial_prompt=PROMPT),
    "tiny.en+prompt+positions": dict(model=BUNDLED, initial_prompt=PROMPT + " Positions: " + ", ".join(POSITIONS) + "."),
    "tiny.en+prompt+hotwords": dict(model=BUNDLED, initial_prompt=PROMPT,
                                    hotwords="circle square triangle red green blue yellow purple white"),
    "tiny.en+prompt+beam1": dict(model=BUNDLED, initial_prompt=PROMPT, beam_size=1),
    "base+prompt": dict(model="bundled-base", initial_prompt=PROMPT),
    "tiny.en+prompt+denoise": dict(model=BUNDLED, initial_prompt=PROMPT, reduce_noise=True),
    "cpu profile": None,                     # the profile's own audio settings
}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=("validation", "report"), default="validation")
    ap.add_argument("--n", type=int, default=None, help="questions (default: 40 validation, 50 report)")
    ap.add_argument("--settings", default="tiny.en,tiny.en+prompt,tiny.en+prompt+denoise,cpu profile",
                    help=f"comma-separated, of: {', '.join(SETTINGS)}")
    args = ap.parse_args(argv)
    profile = get_profile("cpu")
    paths = dataset_paths(profile)
    validation = args.set == "validation"
    n = args.n or (40 if validation else 50)
    questions = balanced_questions(json.loads(paths.eval_questions.read_text()), n, start=300 if validation else 0)
    clips = profile.run_dir / "bench" / f"spoken-{args.set}"
    # The seeds of docs/EXPERIMENTS.md: voices/speeds drawn with 1 and noise from 1000 (validation);
    # both from the runtime seed on the report set, as notebook 05 does.
    seed, noise_seed = (1, 1000) if validation else (profile.runtime.seed, profile.runtime.seed)
    items = build_spoken_set(questions, clips, VALIDATION_VOICES if validation else REPORT_VOICES, seed=seed)
    assistant = Assistant.from_profile(profile, transcriber=False)
    results = {}
    for name in args.settings.split(","):
        settings = SETTINGS[name]
        assistant.transcriber = Transcriber.from_profile(profile) if settings is None else Transcriber(**settings)
        t0 = time.perf_counter()
        results[name] = evaluate_spoken(assistant, items, clips, paths.root, seed=noise_seed,
                                        max_new_tokens=profile.eval.max_new_tokens)
        print(f"== {name} ({time.perf_counter() - t0:.0f} s)\n{format_spoken(results[name])}", flush=True)
    out = ROOT / "runs" / "bench" / f"voice-{args.set}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
