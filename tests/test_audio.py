"""decode_audio: every container and layout ends as 16 kHz mono float32; bad input -> AudioError."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from capstone_lib.audio import (SAMPLE_RATE, AudioError, decode_audio, duration, is_silent,
                                resample, save_audio, to_mono)

CLIPS = Path(__file__).resolve().parent.parent / "data" / "audio"


def tone(freq: float = 440.0, seconds: float = 1.0, rate: int = SAMPLE_RATE, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_hz(x: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def test_shipped_clips_are_16k_mono_and_small():
    clips = sorted(CLIPS.glob("*.wav"))
    assert len(clips) >= 2
    for clip in clips:
        assert clip.stat().st_size < 200_000
        x = decode_audio(clip)
        assert x.dtype == np.float32 and x.ndim == 1
        assert 1.0 < duration(x) < 5.0 and 0.1 < np.abs(x).max() <= 1.0


@pytest.mark.parametrize("ext", [".wav", ".flac", ".mp3", ".ogg", ".webm", ".m4a"])
def test_containers_stereo_48k(tmp_path, ext):
    """A 48 kHz stereo 440 Hz tone in each format decodes to 2 s of 440 Hz at 16 kHz mono."""
    left = tone(440, 2.0, 48_000)
    path = save_audio(tmp_path / f"tone{ext}", np.stack([left, left], axis=1), 48_000)
    x = decode_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(duration(x) - 2.0) < 0.08             # codecs add a few ms of padding
    assert abs(dominant_hz(x) - 440) < 5
    assert 0.3 < np.sqrt(np.mean(x ** 2)) < 0.4      # a 0.5 sine has RMS 0.354; mono = average


def test_bytes_equal_file(tmp_path):
    path = save_audio(tmp_path / "t.wav", tone())
    np.testing.assert_array_equal(decode_audio(path.read_bytes()), decode_audio(path))


def test_array_paths():
    x48 = tone(1000, 1.0, 48_000)
    out = decode_audio(x48, sample_rate=48_000)
    assert len(out) == SAMPLE_RATE and abs(dominant_hz(out) - 1000) < 5
    stereo = np.stack([x48, np.zeros_like(x48)], axis=1)            # (n, 2)
    np.testing.assert_allclose(decode_audio(stereo, 48_000), out / 2, atol=1e-4)
    np.testing.assert_allclose(decode_audio(stereo.T.copy(), 48_000), out / 2, atol=1e-4)  # (2, n)
    pcm = (tone() * 32767).astype(np.int16)                         # gr.Audio(type="numpy") style
    np.testing.assert_allclose(decode_audio(pcm), tone(), atol=1e-4)
    assert np.array_equal(decode_audio(tone()), tone())             # 16 kHz float: unchanged
    assert len(decode_audio(tone(300, 1.0, 8000), 8000)) == SAMPLE_RATE   # upsampling


def test_resample_and_mono_helpers():
    assert len(resample(tone(440, 0.5, 44_100), 44_100)) == 8000
    up = resample(tone(440, 0.5), 16_000, 48_000)
    assert len(up) == 24_000 and abs(dominant_hz(up, 48_000) - 440) < 5
    assert to_mono(np.ones((10, 2))).shape == (10,)
    assert is_silent(np.zeros(100, np.float32)) and not is_silent(tone())


def test_bad_files(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp3"
    text.write_text("hello, I am not audio " * 20)
    image = tmp_path / "picture.wav"
    from PIL import Image
    Image.new("RGB", (16, 16), "red").save(image, format="PNG")
    cases = {empty: "empty", text: "not an audio file", image: "no audio stream",
             tmp_path / "missing.wav": "no such file"}
    for path, message in cases.items():
        with pytest.raises(AudioError, match=message) as err:
            decode_audio(path)
        assert path.name in str(err.value)                      # the message names the file
    with pytest.raises(AudioError, match="empty"):
        decode_audio(b"")
    with pytest.raises(AudioError, match="not an audio file"):
        decode_audio(b"\x00\x01garbage" * 10)


def test_corrupt_file(tmp_path):
    good = save_audio(tmp_path / "good.mp3", tone(seconds=2.0))
    data = good.read_bytes()
    head = tmp_path / "head.mp3"
    head.write_bytes(data[:100])
    with pytest.raises(AudioError):
        decode_audio(head)
    half = tmp_path / "half.mp3"                           # a cut download keeps its first half
    half.write_bytes(data[: len(data) // 2])
    assert 0.5 < duration(decode_audio(half)) < 1.5
    scrambled = bytearray(data)
    rng = np.random.default_rng(0)
    idx = rng.integers(400, len(data), 300)
    for i in idx:
        scrambled[i] = int(rng.integers(256))
    try:                                                   # decodes partly, or a clear error
        assert decode_audio(bytes(scrambled)).dtype == np.float32
    except AudioError:
        pass


def test_too_long(tmp_path):
    long = save_audio(tmp_path / "long.wav", tone(seconds=3.0))
    assert duration(decode_audio(long, max_seconds=5)) == pytest.approx(3.0, abs=0.01)
    with pytest.raises(AudioError, match="limit is 2 s"):
        decode_audio(long, max_seconds=2)
    with pytest.raises(AudioError, match="limit is 2 s"):
        decode_audio(tone(seconds=3.0), max_seconds=2)


def test_bad_arrays():
    with pytest.raises(AudioError, match="empty"):
        decode_audio(np.zeros(0, np.float32))
    with pytest.raises(AudioError, match="NaN"):
        decode_audio(np.array([0.1, np.nan, 0.2], np.float32))
    with pytest.raises(AudioError, match="shape"):
        decode_audio(np.zeros((2, 2, 100), np.float32))
    with pytest.raises(AudioError, match="dtype"):
        decode_audio(np.array(["a", "b"]))
    with pytest.raises(AudioError, match="sample rate"):
        decode_audio(tone(), sample_rate=10)
    with pytest.raises(AudioError, match="cannot read audio"):
        decode_audio(12345)
