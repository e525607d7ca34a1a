"""A spoken-question test set: held-out ShapesWorld questions read by espeak-ng voices, with noise.

Each question is spoken by one of several ``espeak-ng`` voices at one of several speeds (drawn
with a seeded RNG), resampled by ``sox`` to 16 kHz mono 16-bit, and kept as a clean clip.
Noise is mixed in when the set is used (:func:`mix_noise`): white noise at a fixed seed per
clip, scaled so that the signal-to-noise ratio is exactly the one asked for (clean, 15 dB, 5 dB).

Two disjoint sets of voices: decoding settings are chosen on ``VALIDATION_VOICES`` (questions
of other held-out images; ``tools/bench_voice.py``) and reported on ``REPORT_VOICES`` (notebook 05). Debian/Colab:
``apt-get install espeak-ng sox``; without them :func:`build_spoken_set` says so.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .fileio import write_json_atomic

# espeak-ng voices (accents) and variants (+f3: a female variant); mbrola voices need extra packages.
VALIDATION_VOICES = ("en", "en-us", "en-gb-x-rp", "en+f3")
REPORT_VOICES = ("en-gb-scotland", "en-029", "en-us-nyc", "en-us+f2", "en-gb-x-gbclan", "en+m4")
SPEEDS = (125, 150, 175)                  # words per minute (espeak-ng's default is 175)
CONDITIONS: dict[str, float | None] = {"clean": None, "snr15": 15.0, "snr5": 5.0}
MANIFEST = "spoken_set.json"
TOOLS = ("espeak-ng", "sox")


class SpeechToolError(RuntimeError):
    """espeak-ng or sox is missing or failed."""


@dataclass(frozen=True)
class SpokenQuestion:
    """One question as text and as a clean clip, with its held-out image and right answer."""

    question: str
    answer: str
    type: str
    image_id: int
    image: str            # relative to the data set's root, as in ``eval_questions.json``
    voice: str
    speed: int
    clip: str             # file name inside the set's folder


def missing_tools() -> list[str]:
    """The speech tools (espeak-ng, sox) not found on PATH."""
    return [t for t in TOOLS if shutil.which(t) is None]


def synthesize(text: str, voice: str, speed: int, path: str | Path) -> Path:
    """Speak ``text`` with espeak-ng and write it as 16 kHz mono 16-bit wav (via sox)."""
    missing = missing_tools()
    if missing:
        raise SpeechToolError(f"{' and '.join(missing)} not found: install them (Debian/Colab: "
                              "apt-get install espeak-ng sox) to build the spoken-question set")
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        raw, out = Path(tmp) / "raw.wav", Path(tmp) / "16k.wav"
        for cmd in (["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), "--", text],
                    ["sox", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(out)]):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0 or (cmd[0] == "espeak-ng" and not raw.is_file()):
                raise SpeechToolError(f"{cmd[0]} failed for {text!r} (voice {voice}): "
                                      f"{done.stderr.strip() or done.returncode}")
        shutil.move(str(out), str(path.with_name(path.name + ".tmp")))
    os.replace(path.with_name(path.name + ".tmp"), path)       # never a half-written clip
    return path


def mix_noise(samples: np.ndarray, snr_db: float | None, seed: int) -> np.ndarray:
    """``samples`` plus white noise at ``snr_db`` dB signal-to-noise (``None``: unchanged), seeded."""
    if snr_db is None:
        return samples.astype(np.float32)
    signal_power = float(np.mean(np.square(samples, dtype=np.float64)))
    if signal_power == 0.0:
        raise ValueError("cannot mix noise at an SNR into silence (the signal has no power)")
    noise = np.random.default_rng(seed).standard_normal(samples.shape)
    noise *= np.sqrt(signal_power / 10 ** (snr_db / 10) / np.mean(np.square(noise)))   # exactly snr_db
    return np.clip(samples + noise, -1.0, 1.0).astype(np.float32)


def snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    """Measured signal-to-noise ratio of ``noisy`` against ``clean`` (dB; ``inf`` when they are equal)."""
    noise_power = float(np.mean(np.square(noisy.astype(np.float64) - clean)))
    signal_power = float(np.mean(np.square(clean, dtype=np.float64)))
    if signal_power == 0.0:
        raise ValueError("the clean signal has no power: its SNR is undefined")
    return float("inf") if noise_power == 0.0 else float(10 * np.log10(signal_power / noise_power))


def balanced_questions(questions: Sequence[dict], n: int, start: int = 0) -> list[dict]:
    """``n // types`` questions of each type from ``questions[start:]``, interleaved by type (in order)."""
    types = sorted({q["type"] for q in questions})
    per_type = {t: [q for q in questions[start:] if q["type"] == t] for t in types}
    k = n // max(len(types), 1)
    if k == 0:
        raise ValueError(f"asked for {n} questions: fewer than one of each of the {len(types)} types")
    short = [t for t in types if len(per_type[t]) < k]
    if short:
        raise ValueError(f"only {min(len(per_type[t]) for t in short)} questions of type {short[0]!r} "
                         f"after index {start}; asked for {k} of each type")
    return [q for i in range(k) for t in types for q in per_type[t][i:i + 1]]


def build_spoken_set(questions: Sequence[dict], out_dir: str | Path, voices: Sequence[str],
                     speeds: Sequence[int] = SPEEDS, seed: int = 0) -> list[SpokenQuestion]:
    """Speak each question with a seeded choice of voice and speed; reuse clips made before.

    ``out_dir/spoken_set.json`` lists the clips; a clip whose question, voice and speed are
    already listed there (and whose file exists) is not made again.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST
    made: dict[str, dict] = {}
    if manifest.is_file():
        try:
            made = {row["clip"]: row for row in json.loads(manifest.read_text())["questions"]}
        except (ValueError, KeyError, TypeError):
            made = {}                     # a damaged list: every clip is checked again below
    r = random.Random(seed)
    items = []
    for i, q in enumerate(questions):
        voice, speed = r.choice(list(voices)), r.choice(list(speeds))
        item = SpokenQuestion(q["question"], q["answer"], q["type"], int(q["image_id"]), q["image"],
                              voice, speed, clip=f"{i:04d}.wav")
        if made.get(item.clip) != asdict(item) or not (out / item.clip).is_file():
            synthesize(item.question, voice, speed, out / item.clip)
        items.append(item)
    write_json_atomic(manifest, {"seed": seed, "voices": list(voices), "speeds": list(speeds),
                                 "questions": [asdict(it) for it in items]})
    return items
