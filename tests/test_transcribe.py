"""The transcriber on the bundled Whisper tiny.en: real speech in, the right words out."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from capstone_lib import get_profile
from capstone_lib.evaluate import normalize_answer
from capstone_lib.audio import AudioError, decode_audio, resample, save_audio
from capstone_lib.transcribe import BUNDLED, Transcriber, Transcript, bundled_model_path

CLIPS = Path(__file__).resolve().parent.parent / "data" / "audio"
SPOKEN = json.loads((CLIPS / "clips.json").read_text())


@pytest.fixture(scope="module")
def transcriber():
    return Transcriber(BUNDLED, device="cpu", compute_type="int8", max_seconds=60)


def test_bundled_model_is_on_disk():
    path = bundled_model_path()
    assert (path / "model.bin").is_file() and (path / "config.json").is_file()


@pytest.mark.parametrize("clip", sorted(SPOKEN))
def test_shipped_clips_word_for_word(transcriber, clip):
    result = transcriber.transcribe(CLIPS / clip)
    assert isinstance(result, Transcript)
    assert result.text == SPOKEN[clip]
    assert result.language == "en"
    assert result.duration == pytest.approx(len(decode_audio(CLIPS / clip)) / 16000)
    assert result.seconds > 0


def test_loaded_once_and_shared(transcriber):
    transcriber.transcribe(CLIPS / "how_many_shapes_are_there.wav")
    other = Transcriber.from_profile(get_profile("smoke"))
    assert other.key == transcriber.key and other.loaded
    assert other.load() is transcriber.load()
    other.transcribe(CLIPS / "how_many_shapes_are_there.wav")
    assert other.load() is transcriber.load()     # still the same loaded model: no reload


def test_stereo_48k_mp3_and_arrays(transcriber, tmp_path):
    speech = decode_audio(CLIPS / "what_color_is_the_circle.wav")
    up = resample(speech, 16_000, 48_000)                          # band-limited, like a microphone
    stereo = np.stack([up, 0.8 * up], axis=1)                      # 48 kHz stereo
    assert transcriber.transcribe(stereo, sample_rate=48_000).text == "What color is the circle?"
    mp3 = save_audio(tmp_path / "q.mp3", stereo, 48_000)
    assert transcriber.transcribe(mp3).text == "What color is the circle?"
    webm = save_audio(tmp_path / "q.webm", speech)                   # what a browser records
    assert transcriber.transcribe(webm.read_bytes()).text == "What color is the circle?"


def test_joins_all_segments_past_30_seconds(transcriber):
    """Whisper reads 30 s windows: a question after 40 s of silence must not be lost."""
    a = decode_audio(CLIPS / "what_color_is_the_circle.wav")
    b = decode_audio(CLIPS / "how_many_shapes_are_there.wav")
    long = np.concatenate([a, np.zeros(16000 * 3, np.float32), b, np.zeros(16000 * 40, np.float32), a])
    said = "What color is the circle? How many shapes are there? What color is the circle?"
    result = transcriber.transcribe(long)          # VAD cuts the silences out first
    assert normalize_answer(result.text) == normalize_answer(said)   # punctuation may vary
    assert result.duration > 45
    plain = Transcriber(BUNDLED, vad_filter=False).transcribe(long)  # three windowed segments
    assert len(plain.segments) == 3 and plain.segments[-1][0] >= 30
    assert normalize_answer(plain.text) == normalize_answer(said)


def test_no_speech(transcriber, tmp_path):
    with pytest.raises(AudioError, match="silent"):
        transcriber.transcribe(np.zeros(32000, np.float32))
    silent = save_audio(tmp_path / "silence.wav", np.zeros(32000, np.float32))
    with pytest.raises(AudioError, match="silent"):
        transcriber.transcribe(silent)
    noise = np.random.default_rng(0).normal(0, 0.05, 48000).astype(np.float32)
    with pytest.raises(AudioError, match="no speech"):
        transcriber.transcribe(noise)


def test_limits_and_settings(tmp_path):
    short = Transcriber(BUNDLED, max_seconds=1.0)
    with pytest.raises(AudioError, match="limit is 1 s"):
        short.transcribe(CLIPS / "what_color_is_the_circle.wav")
    with pytest.raises(ValueError, match="unknown speech backend"):
        Transcriber(BUNDLED, backend="sphinx")
    broken = tmp_path / "q.wav"
    broken.write_text("not audio at all")
    with pytest.raises(AudioError, match="q.wav"):
        short.transcribe(broken)
    gpu = Transcriber.from_profile(get_profile("t4"))
    assert gpu.model_name == "base" and gpu.backend == "faster-whisper"


def test_whisperx_backend_is_optional():
    """Selecting whisperx without the package fails with a message, not an ImportError trace."""
    pytest.importorskip("faster_whisper")
    try:
        import whisperx  # noqa: F401
        pytest.skip("whisperx is installed here")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="whisperx"):
        Transcriber("tiny", backend="whisperx").load()
