"""Audio in, 16 kHz mono float32 out: PyAV decoding and resampling (no ffmpeg binary needed).

Whisper listens at 16 kHz, mono, with samples in [-1, 1]. A question reaches the assistant
as a file in any common format (wav, mp3, m4a, ogg, webm from a browser microphone), as raw
bytes, or as a numpy array with its sample rate (what a notebook or ``gr.Audio(type="numpy")``
holds). :func:`decode_audio` turns each of them into that one format, and refuses empty,
corrupt, non-audio and over-long input with an :class:`AudioError` that names the source.
"""
from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

SAMPLE_RATE = 16_000
SILENCE_RMS = 3e-4          # about -70 dBFS: quieter than any real microphone's noise floor


class AudioError(ValueError):
    """Audio that cannot be used: empty, silent, corrupt, not audio, or too long."""

    def __init__(self, message: str, source: str | None = None):
        self.source = source
        super().__init__(f"{source}: {message}" if source else message)


def _name(source) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    return "<array>"


def _too_long(seconds: float, max_seconds: float, name: str) -> AudioError:
    return AudioError(f"the recording is {seconds:.1f} s or longer; the limit is {max_seconds:g} s "
                      "(setting audio.max_seconds)", name)


def _decode_container(file, name: str, max_seconds: float | None) -> np.ndarray:
    """Decode the first audio stream of a file or file-like object, resample, then downmix."""
    try:
        container = av.open(file, mode="r", metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise AudioError(f"not an audio file, or corrupt (FFmpeg: {why})", name) from None
    with container:
        if not container.streams.audio:
            kinds = sorted({s.type for s in container.streams}) or ["nothing"]
            raise AudioError(f"contains no audio stream (found {', '.join(kinds)}); "
                             "upload a wav, mp3, m4a, ogg or webm recording", name)
        if max_seconds is not None and container.duration and container.duration / 1e6 > max_seconds:
            raise _too_long(container.duration / 1e6, max_seconds, name)
        resampler, chunks, seconds, bad_frames = None, [], 0.0, 0
        try:
            for frame in container.decode(audio=0):
                seconds += frame.samples / frame.sample_rate
                if max_seconds is not None and seconds > max_seconds:
                    raise _too_long(seconds, max_seconds, name)
                if resampler is None:      # keep the channels; they are averaged below
                    resampler = av.AudioResampler(format="fltp", layout=frame.layout.name,
                                                  rate=SAMPLE_RATE)
                frame.pts = None           # ignore broken timestamps
                chunks += [f.to_ndarray() for f in resampler.resample(frame)]
        except av.error.InvalidDataError:
            bad_frames += 1                # a damaged tail: keep what decoded before it
        except av.FFmpegError as exc:
            raise AudioError(f"corrupt audio (FFmpeg: {getattr(exc, 'strerror', None) or exc})",
                             name) from None
        if resampler is not None:
            chunks += [f.to_ndarray() for f in resampler.resample(None)]
    if not chunks:
        why = "corrupt: no audio frame could be decoded" if bad_frames else "the recording is empty"
        raise AudioError(why, name)
    audio = np.concatenate(chunks, axis=1).mean(axis=0).astype(np.float32)
    if audio.size == 0:
        raise AudioError("the recording is empty", name)
    return audio


def _as_float(array: np.ndarray, name: str) -> np.ndarray:
    """Integer PCM to [-1, 1] floats; floats checked for NaN/inf."""
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        if info.min == 0:                             # unsigned (8-bit wav): centred at the middle
            mid = (int(info.max) + 1) / 2
            return ((array.astype(np.float64) - mid) / mid).astype(np.float32)
        return (array.astype(np.float64) / (int(info.max) + 1)).astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise AudioError("the samples contain NaN or infinity", name)
        return array.astype(np.float32)
    raise AudioError(f"samples must be numbers, got dtype {array.dtype}", name)


def to_mono(array: np.ndarray, name: str = "<array>") -> np.ndarray:
    """Average the channels of a ``(n,)``, ``(n, channels)`` or ``(channels, n)`` array."""
    if array.ndim == 1:
        return array
    if array.ndim != 2:
        raise AudioError(f"expected a 1-D or 2-D sample array, got shape {array.shape}", name)
    channels_first = array.shape[0] <= 8 and array.shape[1] > array.shape[0]
    return array.mean(axis=1 if not channels_first else 0)


def resample(audio: np.ndarray, sample_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Resample mono float32 samples from ``sample_rate`` to ``target_rate`` (swresample, band-limited)."""
    if sample_rate == target_rate:
        return audio.astype(np.float32)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio, np.float32)[None, :],
                                       format="flt", layout="mono")
    frame.sample_rate = sample_rate
    frame.time_base = Fraction(1, sample_rate)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target_rate)
    parts = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    parts += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


def _decode_array(array: np.ndarray, sample_rate: int | None, max_seconds: float | None) -> np.ndarray:
    name = "<array>"
    sample_rate = SAMPLE_RATE if sample_rate is None else int(sample_rate)
    if not 1_000 <= sample_rate <= 384_000:
        raise AudioError(f"implausible sample rate {sample_rate} Hz", name)
    if array.size == 0:
        raise AudioError("the recording is empty", name)
    mono = to_mono(_as_float(np.asarray(array), name), name)
    seconds = mono.size / sample_rate
    if max_seconds is not None and seconds > max_seconds:
        raise _too_long(seconds, max_seconds, name)
    return np.clip(resample(mono, sample_rate), -1.0, 1.0)


def decode_audio(source: str | Path | bytes | np.ndarray, sample_rate: int | None = None,
                 max_seconds: float | None = None) -> np.ndarray:
    """Decode a file, bytes or sample array to 16 kHz mono float32; ``AudioError`` if unusable.

    ``sample_rate`` is only read for arrays (``None`` means the array is 16 kHz already).
    ``max_seconds`` bounds the recording's length before it is decoded in full.
    """
    if isinstance(source, np.ndarray):
        return _decode_array(source, sample_rate, max_seconds)
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise AudioError("the recording is empty (0 bytes)", _name(source))
        return _decode_container(io.BytesIO(bytes(source)), _name(source), max_seconds)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise AudioError("no such file", str(path))
        if path.stat().st_size == 0:
            raise AudioError("the file is empty (0 bytes)", str(path))
        return _decode_container(str(path), str(path), max_seconds)
    raise AudioError(f"cannot read audio from a {type(source).__name__}; "
                     "give a file path, bytes, or a numpy array with its sample rate")


def duration(audio: np.ndarray) -> float:
    """Length in seconds of 16 kHz samples."""
    return float(len(audio)) / SAMPLE_RATE


def is_silent(audio: np.ndarray, threshold: float = SILENCE_RMS) -> bool:
    """True when the root-mean-square level is below ``threshold`` (digital silence)."""
    return audio.size == 0 or float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) < threshold


_CODECS = {".wav": ("pcm_s16le", "s16"), ".mp3": ("libmp3lame", "s16p"), ".ogg": ("libopus", "s16"),
           ".webm": ("libopus", "s16"), ".m4a": ("aac", "fltp"), ".flac": ("flac", "s16")}


def save_audio(path: str | Path, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write mono or ``(n, channels)`` float samples to wav/mp3/ogg/webm/m4a/flac with PyAV."""
    path = Path(path)
    if path.suffix.lower() not in _CODECS:
        raise ValueError(f"{path}: unsupported extension; use one of {sorted(_CODECS)}")
    codec, fmt = _CODECS[path.suffix.lower()]
    data = np.asarray(samples, np.float32)
    data = data[:, None] if data.ndim == 1 else data
    layout = {1: "mono", 2: "stereo"}[data.shape[1]]
    pcm = (np.clip(data, -1, 1) * 32767).astype(np.int16)
    rate = 48_000 if codec == "libopus" else sample_rate  # opus only runs at 48 kHz
    container_format = {".m4a": "mp4", ".ogg": "ogg", ".webm": "webm"}.get(path.suffix.lower())
    with av.open(str(path), "w", format=container_format) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout=layout)
        frame.sample_rate = sample_rate
        frame.time_base = Fraction(1, sample_rate)
        resampler = av.AudioResampler(format=fmt, layout=layout, rate=rate,
                                      frame_size=stream.codec_context.frame_size or None)
        for chunk in list(resampler.resample(frame)) + list(resampler.resample(None)):
            chunk.pts = None
            out.mux(stream.encode(chunk))
        out.mux(stream.encode(None))
    return path


def reduce_noise(audio: np.ndarray, n_fft: int = 512, hop: int = 128, noise_percentile: float = 10.0,
                 strength: float = 2.0, min_gain: float = 0.1) -> np.ndarray:
    """Spectral subtraction of steady background noise (fan, hiss) before Whisper listens.

    The noise spectrum is each frequency's ``noise_percentile``-th percentile magnitude over the
    recording's frames (the pauses between words); every frame keeps ``1 - strength * noise /
    magnitude`` of each frequency, at least ``min_gain``. Clean speech (no noise floor) passes
    almost unchanged. Frames are Hann-windowed with 75% overlap and added back together.
    """
    x = np.asarray(audio, np.float32)
    if x.size < n_fft:
        return x
    pad = (-(x.size - n_fft) % hop)
    x_pad = np.concatenate([np.zeros(n_fft - hop, np.float32), x, np.zeros(pad + n_fft - hop, np.float32)])
    window = np.hanning(n_fft + 1)[:-1].astype(np.float32)
    n_frames = 1 + (x_pad.size - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(n_frames)[:, None]
    spec = np.fft.rfft(x_pad[idx] * window, axis=1)
    mag = np.abs(spec)
    noise = np.percentile(mag, noise_percentile, axis=0)
    gain = np.clip(1.0 - strength * noise / np.maximum(mag, 1e-10), min_gain, 1.0)
    frames = np.fft.irfft(spec * gain, n=n_fft, axis=1) * window
    out = np.zeros(x_pad.size, np.float64)
    norm = np.zeros(x_pad.size, np.float64)
    np.add.at(out, idx, frames)
    np.add.at(norm, idx, window ** 2)
    out = out / np.maximum(norm, 1e-8)
    return out[n_fft - hop: n_fft - hop + x.size].astype(np.float32)
