"""Spoken-question accuracy: the same held-out questions typed and spoken, clean and in noise.

For each :class:`~capstone_lib.spoken_set.SpokenQuestion` the assistant answers the typed
question once and the transcript of each noise condition once; both are scored against the
scene's answer with ``answers_match`` (the typed VQA's scorer). A recording the transcriber
refuses (``AudioError``: no speech, another language) counts as wrong and is reported.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

from .assistant import AssistantError
from .audio import AudioError, decode_audio
from .evaluate import answers_match, normalize_answer
from .spoken_set import CONDITIONS, SpokenQuestion, mix_noise


def evaluate_spoken(assistant, items: Sequence[SpokenQuestion], clip_dir: str | Path, image_root: str | Path,
                    conditions: dict[str, float | None] = CONDITIONS, seed: int = 0,
                    max_new_tokens: int = 32, progress: Callable | None = None) -> dict[str, Any]:
    """Typed and spoken accuracy (per noise condition and type), transcript match, refusals, latency."""
    clip_dir, image_root = Path(clip_dir), Path(image_root)
    typed: list[bool] = []
    by_type: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    exact, refused, seconds = defaultdict(int), defaultdict(list), defaultdict(list)
    examples: list[dict[str, Any]] = []
    features: dict[int, Any] = {}
    steps = progress(items) if progress else items
    for i, item in enumerate(steps):
        if item.image_id not in features:
            features[item.image_id] = assistant.image_features(image_root / item.image)

        def answer(question: str) -> str:
            return "".join(assistant.stream_features(features[item.image_id], assistant.question(question), [],
                                                     max_new_tokens=max_new_tokens)).strip()

        typed.append(answers_match(answer(item.question), item.answer))
        clean = decode_audio(clip_dir / item.clip)
        for cond, snr in conditions.items():
            try:
                heard = assistant.transcribe(mix_noise(clean, snr, seed + i))
                pred = answer(heard.text)
            except (AudioError, AssistantError) as err:
                refused[cond].append(f"{item.clip}: {err}")
                ok, text, pred = False, None, None
            else:
                seconds[cond].append(heard.seconds)
                text = heard.text
                exact[cond] += normalize_answer(text) == normalize_answer(item.question)
                ok = answers_match(pred, item.answer)
            by_type[cond][item.type].append(ok)
            if not ok and len(examples) < 12:
                examples.append({"condition": cond, "voice": item.voice, "speed": item.speed,
                                 "question": item.question, "heard": text, "answer": pred, "truth": item.answer})
    n = max(len(items), 1)
    return {
        "n": len(items),
        "typed_accuracy": sum(typed) / n,
        "conditions": {cond: {"accuracy": sum(sum(v) for v in by_type[cond].values()) / n,
                              "by_type": {t: sum(v) / len(v) for t, v in sorted(by_type[cond].items())},
                              "transcript_exact": exact[cond] / n, "refused": len(refused[cond]),
                              "mean_transcribe_seconds": sum(seconds[cond]) / max(len(seconds[cond]), 1)}
                       for cond in conditions},
        "refusals": {cond: msgs[:5] for cond, msgs in refused.items()},
        "wrong_examples": examples,
    }


def format_spoken(result: dict[str, Any]) -> str:
    """A small table: typed accuracy, then spoken accuracy, exact transcripts and latency per condition."""
    lines = [f"{result['n']} held-out questions; typed accuracy {result['typed_accuracy']:.3f}",
             f"{'condition':<10} {'spoken acc':>10} {'exact transcript':>17} {'refused':>8} {'s / clip':>9}"]
    for cond, row in result["conditions"].items():
        lines.append(f"{cond:<10} {row['accuracy']:>10.3f} {row['transcript_exact']:>17.3f} "
                     f"{row['refused']:>8d} {row['mean_transcribe_seconds']:>9.2f}")
    return "\n".join(lines)
