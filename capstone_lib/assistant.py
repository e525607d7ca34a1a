"""The finished assistant: an image plus a question (typed or spoken) in, a streamed answer out.

One object holds what is loaded once: the multimodal model (the exported Llava checkpoint
of notebook 04, or the in-library ``VisionLanguageModel``), its tokenizer and image
processor, and a :class:`~capstone_lib.transcribe.Transcriber` for spoken questions.
Answering a question is four readable steps:

1. image -> pixel values (the image processor) -> patch features -> projected to the LM width;
2. question (and earlier turns) -> prompt ids with ``chat.encode_prompt``, THE template of
   training, ``<image>`` expanded to one placeholder per patch;
3. token embeddings with the patch vectors written over the placeholders (``masked_scatter``,
   exactly as ``LlavaModel.forward`` does);
4. :func:`capstone_lib.generate.stream_generate` (KV cache), decoded piece by piece.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .chat import IMAGE_TOKEN, encode_prompt
from .generate import _token_embedding, stream_generate
from .precision import storage_dtype
from .transcribe import Transcriber, Transcript



class AssistantError(ValueError):
    """A request the assistant cannot answer: no image, empty or over-long question ..."""


def _setting(profile, section: str, key: str, default: Any) -> Any:
    if profile is None:
        return default
    try:
        return getattr(getattr(profile, section), key, default)
    except AttributeError:
        return default


# Uploads are shrunk to this side while they are read: every vision tower here reads 224 px or less.
MAX_IMAGE_SIDE = 1024


def as_image(image: Any, name: str = "image") -> Image.Image:
    """A PIL RGB image from a PIL image, a path, file bytes or an ``(H, W[, C])`` array; clear errors."""
    from .images import load_image, to_rgb
    from .validation import DataError

    if image is None:
        raise AssistantError("no image: upload or choose an image first")
    if isinstance(image, (str, Path)):
        return load_image(image, max_side=MAX_IMAGE_SIDE)   # DataError names the file
    if isinstance(image, (bytes, bytearray, memoryview)):   # an upload's content
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(name).name
            path.write_bytes(bytes(image))
            try:
                return load_image(path, max_side=MAX_IMAGE_SIDE)
            except DataError as exc:
                raise DataError(exc.message, path=name) from None
    if isinstance(image, Image.Image):
        if min(image.size) < 8:
            raise DataError(f"image is {image.size[0]}x{image.size[1]}, too small", path=name)
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)) or min(arr.shape[:2]) < 8:
            raise DataError(f"expected an (H, W), (H, W, 3) or (H, W, 4) array of at least 8x8, "
                            f"got shape {arr.shape}", path=name)
        if np.issubdtype(arr.dtype, np.floating):
            if not np.isfinite(arr).all():
                raise DataError("the image array contains NaN or infinity", path=name)
            arr = arr * 255.0 if arr.max() <= 1.0 else arr
        arr = np.clip(arr, 0, 255).astype(np.uint8)
        return to_rgb(Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr))
    raise AssistantError(f"cannot use a {type(image).__name__} as an image; give a PIL image, "
                         "a file path, the file's bytes or a numpy array")


@dataclass
class Chat:
    """A multi-turn conversation about one image; keeps the history and the image features."""

    assistant: "Assistant"
    features: torch.Tensor
    history: list[dict[str, str]] = field(default_factory=list)
    last_transcript: Transcript | None = None
    dropped_turns: int = 0

    def stream(self, text: str | None = None, audio: Any = None, sample_rate: int | None = None,
               **generation) -> Iterator[str]:
        """Answer the next question (text, or audio when text is empty), streaming text pieces."""
        self.assistant.last_transcript = None
        question = self.assistant.question(text, audio, sample_rate)
        self.last_transcript = self.assistant.last_transcript
        history, dropped = self.assistant.fit_history(self.history, question)
        self.dropped_turns += dropped
        pieces: list[str] = []
        for piece in self.assistant.stream_features(self.features, question, history, **generation):
            pieces.append(piece)
            yield piece
        answer = "".join(pieces).strip()
        first = not history
        self.history = history + [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}" if first else question},
                                  {"from": "gpt", "value": answer or "(no answer)"}]

    def ask(self, text: str | None = None, audio: Any = None, **generation) -> str:
        """Answer the next question and return the whole answer."""
        return "".join(self.stream(text, audio, **generation)).strip()

    def reset(self) -> None:
        """Forget the conversation (keep the image)."""
        self.history, self.dropped_turns, self.last_transcript = [], 0, None


class Assistant:
    """The loaded model + tokenizer + image processor + transcriber; ``(image, question) -> answer``."""

    def __init__(self, model: torch.nn.Module, tokenizer, image_processor,
                 transcriber: Transcriber | None = None, max_question_chars: int = 500,
                 max_history_exchanges: int = 16,
                 max_new_tokens: int = 64, image_token_id: int | None = None):
        self.model = model.eval()
        self.tokenizer, self.image_processor, self.transcriber = tokenizer, image_processor, transcriber
        self.max_question_chars, self.max_new_tokens = max_question_chars, max_new_tokens
        self.max_history_exchanges = max_history_exchanges   # older exchanges are dropped first
        config = getattr(model, "config", None)
        self.image_token_id = int(image_token_id if image_token_id is not None else
                                  getattr(model, "image_token_id", None) or config.image_token_id)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.context_length = int(getattr(text_config, "max_position_embeddings", 2048))
        self.last_transcript: Transcript | None = None
        if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != self.image_token_id:
            raise AssistantError(f"the tokenizer's {IMAGE_TOKEN} id differs from the model's "
                                 f"image_token_id {self.image_token_id}: tokenizer and model do not belong together")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, llava_dir: str | Path, transcriber: Transcriber | None = None,
                        profile=None, device: str | None = None, dtype: torch.dtype | None = None) -> "Assistant":
        """Load an exported Llava checkpoint directory (model + processor), offline."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from .chat import format_of, set_format
        from .export import COURSE_MANIFEST, EXPORT_MANIFEST, load_course_export, verify_export

        llava_dir = Path(llava_dir)
        course = (llava_dir / COURSE_MANIFEST).is_file()
        if not course and not (llava_dir / "config.json").is_file():
            raise FileNotFoundError(f"{llava_dir}: no exported assistant here (config.json missing); "
                                    "export one with notebook 04 or capstone_lib.stage2.export_assistant")
        if not verify_export(llava_dir):        # sha256 of every file, when the export has a manifest
            print(f"Assistant: {llava_dir} has no {EXPORT_MANIFEST}; its files' integrity is not checked")
        device = device or _setting(profile, "runtime", "device", "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            print("Assistant: no CUDA device; loading on the CPU")
            device = "cpu"
        if dtype is None:
            dtype = storage_dtype(_setting(profile, "runtime", "precision", "fp32"), device)
        if course:                     # the course's own folder (an LM Llava cannot hold, e.g. Phi-2)
            model, tokenizer, image_processor = load_course_export(llava_dir, device, dtype)
        else:
            processor = AutoProcessor.from_pretrained(str(llava_dir), local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(str(llava_dir), dtype=dtype,
                                                                local_files_only=True).to(device)
            tokenizer, image_processor = processor.tokenizer, processor.image_processor
            # The processor's template is the one training used; the prompt is rendered from it.
            set_format(tokenizer, format_of(processor))
        return cls(model, tokenizer, image_processor, transcriber,
                   max_question_chars=_setting(profile, "demo", "max_question_chars", 500),
                   max_history_exchanges=_setting(profile, "demo", "max_history_exchanges", 16),
                   max_new_tokens=_setting(profile, "demo", "max_new_tokens", 64))

    @classmethod
    def from_profile(cls, profile=None, transcriber: Transcriber | bool = True) -> "Assistant":
        """The profile's assistant (``runs/<p>/assistant/``, built by stage 2 if missing) + its transcriber."""
        from .profiles import get_profile
        from .stage2 import ensure_assistant

        profile = profile or get_profile()
        if transcriber is True:
            transcriber = Transcriber.from_profile(profile)
        return cls.from_pretrained(ensure_assistant(profile), transcriber or None, profile)

    @property
    def device(self) -> torch.device:
        """Where the model's input embedding lives."""
        return _token_embedding(self.model).weight.device

    # ------------------------------------------------------------------ inputs
    def transcribe(self, audio: Any, sample_rate: int | None = None) -> Transcript:
        """Speech to text with the assistant's transcriber (``AudioError`` for unusable audio)."""
        if self.transcriber is None:
            raise AssistantError("this assistant has no transcriber: pass transcriber=Transcriber(...)")
        self.last_transcript = self.transcriber.transcribe(audio, sample_rate=sample_rate)
        return self.last_transcript

    def question(self, text: str | None = None, audio: Any = None, sample_rate: int | None = None) -> str:
        """The question to answer: ``text`` if given, else the transcript of ``audio``; validated."""
        text = (text or "").strip()
        if not text and audio is not None:
            text = self.transcribe(audio, sample_rate).text.strip()
        if not text:
            raise AssistantError("empty question: type a question or record one")
        if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
            raise AssistantError("the question contains invalid characters (unpaired surrogates): retype it")
        if not any(c.isprintable() and not c.isspace() and unicodedata.category(c) != "Cf" for c in text):
            raise AssistantError("the question has no visible characters: type a question or record one")
        if len(text) > self.max_question_chars:
            raise AssistantError(f"the question has {len(text)} characters; the limit is "
                                 f"{self.max_question_chars} (setting demo.max_question_chars)")
        from .chat import format_of
        marks = set(self.tokenizer.all_special_tokens) | set(format_of(self.tokenizer).reserved)
        reserved = sorted(t for t in marks if t and t in text)
        if reserved:
            raise AssistantError(f"the question contains the reserved token(s) {reserved}, which the chat "
                                 "template uses as structure")
        return text

    @torch.no_grad()
    def image_features(self, image: Any) -> torch.Tensor:
        """Projected patch features ``(n_patches, d_text)`` of one image, ready to splice."""
        pil = as_image(image)
        pixels = self.image_processor(images=pil, return_tensors="pt")["pixel_values"]
        if hasattr(self.model, "get_image_features"):            # transformers Llava
            pixels = pixels.to(self.device, self.model.dtype)
            feats = self.model.get_image_features(pixel_values=pixels).pooler_output
            return torch.cat(list(feats), dim=0)
        feats = self.model.project(self.model.image_features(pixels.to(self.device)))  # VisionLanguageModel
        return feats[0]

    def prompt_ids(self, history: Sequence[dict[str, str]], question: str, n_image_tokens: int) -> list[int]:
        """Prompt token ids, ``<image>`` on the first human turn; error if over the LM context."""
        first = not history
        ids = encode_prompt(self.tokenizer, history, f"{IMAGE_TOKEN}\n{question}" if first else question,
                            n_image_tokens)
        if len(ids) >= self.context_length:
            raise AssistantError(f"the prompt is {len(ids)} tokens ({n_image_tokens} of them image tokens); "
                                 f"the language model's context is {self.context_length}: ask a shorter question")
        return ids

    def fit_history(self, history: Sequence[dict[str, str]], question: str,
                    n_image_tokens: int | None = None) -> tuple[list[dict[str, str]], int]:
        """Drop the oldest exchanges until the prompt fits the context; returns (history, n_dropped).

        At most ``max_history_exchanges`` recent exchanges are kept at all, and how many more to drop
        is found by bisection: a few tokenizations, however long the history a client sends.
        """
        n = n_image_tokens or self._n_patches()
        turns = [dict(t) for t in history]
        turns = turns[: len(turns) // 2 * 2]                      # whole exchanges only
        kept = turns[-2 * self.max_history_exchanges:] if self.max_history_exchanges else []
        dropped = len(turns) - len(kept)

        def tail(k: int) -> list[dict[str, str]]:
            rest = [dict(t) for t in kept[2 * k:]]
            if rest and IMAGE_TOKEN not in rest[0]["value"]:
                rest[0]["value"] = f"{IMAGE_TOKEN}\n{rest[0]['value']}"
            return rest

        def fits(k: int) -> bool:
            return len(encode_prompt(self.tokenizer, tail(k), question, n)) < self.context_length

        pairs = len(kept) // 2
        lo, hi = 0, pairs                      # the fewest exchanges to drop so that the prompt fits
        while lo < hi:
            mid = (lo + hi) // 2
            if fits(mid):
                hi = mid
            else:
                lo = mid + 1
        return tail(lo), dropped + 2 * lo

    def _n_patches(self) -> int:
        config = getattr(self.model, "config", None)
        n = getattr(config, "image_seq_length", None)
        if n:
            return int(n)
        return int(self.image_features(Image.new("RGB", (64, 64))).shape[0])

    def embed_prompt(self, ids: Sequence[int], features: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``(1, T, d)`` with the patch vectors written over the placeholders."""
        input_ids = torch.tensor([list(ids)], device=self.device)
        with torch.no_grad():
            embeds = _token_embedding(self.model)(input_ids)
        is_image = (input_ids == self.image_token_id).unsqueeze(-1).expand_as(embeds)
        if int(is_image[..., 0].sum()) != features.shape[0]:
            raise AssistantError(f"{int(is_image[..., 0].sum())} image placeholders but "
                                 f"{features.shape[0]} image features")
        return embeds.masked_scatter(is_image, features.to(embeds.dtype))

    # ------------------------------------------------------------------ answering
    def stream_features(self, features: torch.Tensor, question: str, history: Sequence[dict[str, str]],
                        max_new_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
                        seed: int | None = None) -> Iterator[str]:
        """Stream the answer to a validated ``question`` about precomputed image ``features``."""
        ids = self.prompt_ids(history, question, features.shape[0])
        embeds = self.embed_prompt(ids, features)
        budget = min(max_new_tokens or self.max_new_tokens, self.context_length - len(ids))
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        tokens: list[int] = []
        shown = ""
        for token in stream_generate(self.model, embeds, eos_token_id=self.tokenizer.eos_token_id,
                                     max_new_tokens=budget, temperature=temperature, top_p=top_p,
                                     generator=generator):
            tokens.append(token)
            # Decode everything so far and emit only the new characters: a multi-byte
            # character may span tokens (then the text ends in U+FFFD until it is complete).
            text = self.tokenizer.decode(tokens, skip_special_tokens=True,
                                         clean_up_tokenization_spaces=False).lstrip()
            if text.endswith("\ufffd") or not text.startswith(shown):
                continue
            piece, shown = text[len(shown):], text
            if piece:
                yield piece
        final = self.tokenizer.decode(tokens, skip_special_tokens=True,
                                      clean_up_tokenization_spaces=False).lstrip()
        if final != shown and final.startswith(shown):      # e.g. an unfinished character
            yield final[len(shown):]

    def stream(self, image: Any, text: str | None = None, audio: Any = None,
               history: Sequence[dict[str, str]] | None = None, sample_rate: int | None = None,
               **generation) -> Iterator[str]:
        """Stream the answer to a question about ``image`` as text pieces (text wins over audio)."""
        pil = as_image(image)                                  # check the inputs first
        question = self.question(text, audio, sample_rate)
        features = self.image_features(pil)
        history, _ = self.fit_history(history or [], question, features.shape[0])
        yield from self.stream_features(features, question, history, **generation)

    def ask(self, image: Any, text: str | None = None, audio: Any = None,
            history: Sequence[dict[str, str]] | None = None, **generation) -> str:
        """The whole answer to one question about ``image``."""
        return "".join(self.stream(image, text, audio, history, **generation)).strip()

    def chat(self, image: Any) -> Chat:
        """Start a multi-turn conversation about ``image`` (its features are computed once)."""
        return Chat(self, self.image_features(image))
