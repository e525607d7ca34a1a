"""The Gradio demo: upload an image, ask by text or voice, watch the answer stream in.

Run it locally (listens on 127.0.0.1 only)::

    python app.py --profile cpu                  # or: python -m capstone_lib.app
    python app.py --checkpoint runs/cpu/assistant --port 7861
    python app.py --share                         # a public *.gradio.live link: anyone can use it

The same file runs as a Hugging Face Space (the Space sets ``GRADIO_SERVER_NAME=0.0.0.0``;
point ``CAPSTONE_ASSISTANT`` at the exported checkpoint folder committed with the Space).
Bad input (no image, a non-image file, silent or corrupt audio, an over-long recording or
question) gets a clear message in the page; the app keeps serving.
"""
from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

from .assistant import Assistant, Chat, as_image  # noqa: E402

INTRO = """# Ask the course assistant about an image
Upload an image, then type a question or record one. The answer streams in as the model
writes it; follow-up questions about the same image keep the conversation. A new image
starts a new chat."""


class ImageInput(gr.Image):
    """``gr.Image`` whose upload of a non-image file becomes a clear message, not a traceback."""

    is_template = True              # the page renders it with gr.Image's front end

    def preprocess(self, payload):
        """Pass the uploaded file's path on; refuse files Pillow cannot identify."""
        try:
            return super().preprocess(payload)
        except Image.DecompressionBombError as exc:
            name = getattr(payload, "orig_name", None) or "the upload"
            raise gr.Error(f"{name}: too many pixels to open safely ({exc}); upload an image of at most a "
                           "few thousand pixels a side") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            name = getattr(payload, "orig_name", None) or "the upload"
            raise gr.Error(f"{name}: not an image file Pillow can read ({type(exc).__name__}); "
                           "upload a PNG, JPEG or WebP image") from None


MIC = "\N{MICROPHONE} "


def _text_of(content: Any) -> str:
    """A chat message's text, whether a string or gradio's ``[{"type": "text", "text": ...}]``."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return "".join(_text_of(part) for part in content or [])


def history_of(messages: list[dict], max_exchanges: int = 16, max_chars: int = 2000) -> list[dict[str, str]]:
    """The chat template's history (``{"from", "value"}`` turns) from the chat shown on the page.

    The page's chat comes from the client: only its last ``max_exchanges`` exchanges are read,
    each turn cut to ``max_chars`` characters, so one request cannot hold the server for long.
    """
    history = []
    for m in messages[-2 * max_exchanges - 1:]:
        text = _text_of(m["content"]).removeprefix(MIC).strip()[:max_chars]
        speaker = "human" if m["role"] == "user" else "gpt"
        if text and (len(history) % 2 == 0) == (speaker == "human"):
            history.append({"from": speaker, "value": text})
    return history[: len(history) // 2 * 2]          # complete exchanges only


def transcript_status(heard, markup: str = "markdown") -> str:
    """The line shown under a spoken question: what Whisper heard, how sure of the language, how long.

    ``markup`` is ``"markdown"`` (the Gradio page) or ``"html"`` (the notebook widgets); the heard
    text is escaped for it.
    """
    import html
    import re

    if markup == "html":
        text = f"<i>{html.escape(heard.text)}</i>"
    else:
        text = "*" + re.sub(r"([\\`*_{}\[\]()<>#+!|~-])", r"\\\1", heard.text) + "*"
    sure = ""
    if heard.language_probability is not None:       # None: the language was fixed, not detected
        sure = f", {heard.language} {heard.language_probability:.0%}"
    return f"heard: {text} (transcribed in {heard.seconds:.2f} s{sure})"


def _lazy(factory: Callable[[], Assistant]) -> Callable[[], Assistant]:
    """Call ``factory`` once, on first use, from any thread."""
    lock, box = threading.Lock(), []

    def get() -> Assistant:
        with lock:
            if not box:
                box.append(factory())
        return box[0]
    return get


def build_app(assistant_factory: Callable[[], Assistant], title: str = "Course assistant",
              profile=None) -> gr.Blocks:
    """The demo page; ``assistant_factory()`` is called once, on the first question."""
    get_assistant = _lazy(assistant_factory)
    defaults = {"max_new_tokens": 48, "temperature": 0.0, "top_p": 1.0}
    if profile is not None:
        defaults.update({k: getattr(profile.demo, k) for k in defaults if hasattr(profile.demo, k)})

    def respond(image: str | None, text: str | None, audio: str | None, messages: list | None,
                max_new_tokens: float = 48, temperature: float = 0.0,
                top_p: float = 1.0) -> Iterator[tuple[Any, ...]]:
        messages = [{"role": m["role"], "content": _text_of(m["content"])} for m in messages or []]
        try:
            assistant = get_assistant()
            pil = as_image(image)
            spoken = not (text or "").strip() and audio is not None
            heard = assistant.transcribe(audio) if spoken else None
            question = assistant.question(heard.text if heard else text)
            history = history_of(messages, assistant.max_history_exchanges)
            chat = Chat(assistant, assistant.image_features(pil), history=history)
        except ValueError as exc:                  # AssistantError, AudioError, DataError
            raise gr.Error(str(exc)) from None
        messages += [{"role": "user", "content": f"{MIC}{question}" if spoken else question},
                     {"role": "assistant", "content": ""}]
        status = transcript_status(heard) if heard else ""
        settings = dict(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                        top_p=float(top_p))
        t0 = time.perf_counter()
        try:
            for piece in chat.stream(question, **settings):
                messages[-1]["content"] += piece
                yield messages, status, gr.skip(), gr.skip()
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        if not messages[-1]["content"]:
            messages[-1]["content"] = "(no answer)"
        status = " · ".join(filter(None, [status, f"answered in {time.perf_counter() - t0:.2f} s"]))
        if chat.dropped_turns:
            status += f" (the {chat.dropped_turns} oldest turns were left out to fit the context)"
        yield messages, status, "", None

    def new_chat() -> tuple[list, str]:
        return [], ""

    with gr.Blocks(title=title) as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1):
                image = ImageInput(type="filepath", image_mode=None, label="Image",
                                   sources=["upload", "clipboard"])
                text = gr.Textbox(label="Question", placeholder="What color is the circle?", lines=1)
                audio = gr.Audio(sources=["microphone", "upload"], type="filepath",
                                 label="...or ask by voice")
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary")
                    clear = gr.Button("New chat")
                with gr.Accordion("Generation settings", open=False):
                    max_new = gr.Slider(1, 256, value=defaults["max_new_tokens"], step=1,
                                        label="max new tokens")
                    temperature = gr.Slider(0.0, 1.5, value=defaults["temperature"], step=0.05,
                                            label="temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=defaults["top_p"], step=0.05, label="top-p")
            with gr.Column(scale=1):
                chatbot = gr.Chatbot(label="Assistant", height=420)
                status = gr.Markdown()
        # The chat shown is the conversation: no hidden state, so the API is stateless too.
        inputs = [image, text, audio, chatbot, max_new, temperature, top_p]
        outputs = [chatbot, status, text, audio]
        ask.click(respond, inputs, outputs, api_name="ask")
        text.submit(respond, inputs, outputs, api_visibility="private")
        clear.click(new_chat, None, [chatbot, status], api_name="new_chat")
        image.change(new_chat, None, [chatbot, status], api_visibility="private")
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           max_upload_mb: float = 10, block: bool = True) -> gr.Blocks:
    """Start the server: loopback unless ``host``/``share`` say otherwise; uploads capped."""
    if share or host not in ("127.0.0.1", "localhost", "::1"):
        print(f"WARNING: the demo is reachable beyond this machine (host={host}, share={share}); "
              "anyone with the address can use it and upload files.")
    demo.queue(default_concurrency_limit=1)         # one answer at a time: the CPU is shared
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                max_file_size=int(max_upload_mb * 1024 * 1024), show_error=False, quiet=not block)
    return demo


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python app.py [--profile P] [--checkpoint DIR] [--host H] [--port N] [--share]``."""
    from .profiles import get_profile
    from .transcribe import Transcriber

    parser = argparse.ArgumentParser(description="The course assistant as a Gradio app.")
    parser.add_argument("--profile", default=None, help="smoke | cpu | t4 | a100 (default: $CAPSTONE_PROFILE or auto)")
    parser.add_argument("--checkpoint", default=os.environ.get("CAPSTONE_ASSISTANT"),
                        help="an exported Llava folder (default: the profile's runs/<p>/assistant/)")
    parser.add_argument("--host", default=None, help="default 127.0.0.1 (loopback only)")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    args = parser.parse_args(argv)

    profile = get_profile(args.profile)
    host = args.host or os.environ.get("GRADIO_SERVER_NAME") or profile.demo.host
    port = args.port or int(os.environ.get("GRADIO_SERVER_PORT", profile.demo.port))
    if args.checkpoint:
        transcriber = Transcriber.from_profile(profile)
        assistant = Assistant.from_pretrained(Path(args.checkpoint), transcriber, profile)
    else:
        assistant = Assistant.from_profile(profile)
    if assistant.transcriber is not None:
        assistant.transcriber.load()              # now, not on the first spoken question
    print(f"assistant loaded; open http://{host}:{port}/")
    launch(build_app(lambda: assistant, profile=profile), host=host, port=port, share=args.share,
           max_upload_mb=profile.demo.max_upload_mb)


if __name__ == "__main__":
    main()


# ----------------------------------------------------------------------------- notebook UI
class NotebookDemo:
    """The same demo as ipywidgets inside a notebook: uploads, a question box, a streamed answer.

    ``display(NotebookDemo(assistant).widget)``. Every control is an attribute, so that a
    test (or nbmake) can drive it without a browser: ``set_image``, ``set_audio``,
    ``question.value = ...``, ``ask_button.click()``, then read ``answer.value``.
    """

    def __init__(self, assistant: Assistant, max_upload_mb: float = 10, **generation):
        import ipywidgets as w

        self.assistant, self.max_bytes, self.generation = assistant, int(max_upload_mb * 2**20), generation
        self.chat: Chat | None = None
        self.audio: Any = None
        self.image_upload = w.FileUpload(accept="image/*", description="Image", multiple=False)
        self.audio_upload = w.FileUpload(accept="audio/*", description="Audio", multiple=False)
        self.question = w.Text(placeholder="What color is the circle?", description="Question",
                               layout=w.Layout(width="420px"))
        self.ask_button = w.Button(description="Ask", button_style="primary")
        self.new_chat_button = w.Button(description="New chat")
        self.preview = w.Image(format="png", width=160)
        self.status = w.HTML()
        self.answer = w.HTML(layout=w.Layout(min_height="80px"))
        self.image_upload.observe(lambda change: self._uploaded(change, self.set_image), names="value")
        self.audio_upload.observe(lambda change: self._uploaded(change, self.set_audio), names="value")
        self.ask_button.on_click(self.ask)
        self.new_chat_button.on_click(lambda _: self.reset())
        self.widget = w.VBox([
            w.HBox([self.image_upload, self.audio_upload, self.new_chat_button]),
            w.HBox([self.preview, w.VBox([self.question, self.ask_button, self.status])]),
            self.answer])

    def _error(self, message: str) -> None:
        import html
        self.status.value = f"<span style='color:#b00'>{html.escape(message)}</span>"

    def _uploaded(self, change, setter) -> None:
        files = change["new"]
        if not files:
            return
        upload = files[0]
        if upload["size"] > self.max_bytes:
            self._error(f"{upload['name']}: {upload['size'] / 2**20:.1f} MB is over the "
                        f"{self.max_bytes / 2**20:g} MB upload limit (setting demo.max_upload_mb)")
            return
        setter(bytes(upload["content"]), upload["name"])

    def set_image(self, image: Any, name: str = "image") -> bool:
        """Use ``image`` (path, bytes, PIL or array) for a new conversation; False with a message if bad."""
        import io
        try:
            pil = as_image(image, name=name)
            self.chat = self.assistant.chat(pil)
        except ValueError as exc:
            self._error(str(exc))
            return False
        buf = io.BytesIO()
        pil.save(buf, format="PNG")
        self.preview.value = buf.getvalue()
        self.answer.value, self.status.value = "", ""
        return True

    def set_audio(self, audio: Any, name: str = "audio") -> None:
        """Use ``audio`` (path, bytes or 16 kHz array) for the next question when the box is empty."""
        self.audio = audio
        self.status.value = f"audio ready: {name}"

    def reset(self) -> None:
        """Forget the conversation, keep the image."""
        if self.chat is not None:
            self.chat.reset()
        self.answer.value = ""

    def _render(self, current: str = "") -> None:
        import html
        turns = self.chat.history if self.chat else []
        rows = [f"<b>{'You' if t['from'] == 'human' else 'Assistant'}:</b> "
                f"{html.escape(t['value'].replace('<image>', '').strip())}" for t in turns]
        if current:
            rows.append(current)
        self.answer.value = "<br>".join(rows)

    def ask(self, _button=None) -> str:
        """The Ask button: transcribe if needed, then stream the answer into ``answer``."""
        import html
        if self.chat is None:
            self._error("no image: upload or choose an image first")
            return ""
        text, audio = self.question.value, self.audio
        try:
            question = self.chat.assistant.question(text, audio)
        except ValueError as exc:
            self._error(str(exc))
            return ""
        spoken = not text.strip() and audio is not None
        heard = self.chat.assistant.last_transcript if spoken else None
        status = transcript_status(heard, markup="html") if heard else ""
        self.status.value = status
        head = f"<b>You:</b> {html.escape(question)}<br><b>Assistant:</b> "
        pieces: list[str] = []
        t0 = time.perf_counter()
        try:
            for piece in self.chat.stream(question, **self.generation):
                pieces.append(piece)
                self._render(head + html.escape("".join(pieces)))
        except ValueError as exc:
            self._error(str(exc))
            return ""
        self.status.value = " · ".join(filter(None, [status, f"answered in {time.perf_counter() - t0:.2f} s"]))
        self._render()
        self.question.value, self.audio = "", None
        return "".join(pieces).strip()
