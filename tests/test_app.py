"""The Gradio app over loopback: a tiny assistant answers, bad uploads get messages, it keeps serving."""
from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from capstone_lib.app import build_app, launch  # noqa: E402
from capstone_lib.assistant import Assistant  # noqa: E402
from capstone_lib.transcribe import Transcriber  # noqa: E402
from test_assistant import build_tiny_llava  # noqa: E402

CLIPS = Path(__file__).resolve().parent.parent / "data" / "audio"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_tokenizer, tmp_path_factory):
    llava = build_tiny_llava(tiny_tokenizer, tmp_path_factory.mktemp("llava"))
    assistant = Assistant.from_pretrained(llava, Transcriber(max_seconds=10))
    calls = []

    def factory():
        calls.append(1)
        return assistant

    port = free_port()
    demo = launch(build_app(factory), host="127.0.0.1", port=port, max_upload_mb=0.5, block=False)
    try:
        yield {"url": f"http://127.0.0.1:{port}/", "assistant": assistant, "calls": calls,
               "client": Client(f"http://127.0.0.1:{port}/", verbose=False)}
    finally:
        demo.close()


@pytest.fixture
def files(tmp_path, tiny_images):
    image = tmp_path / "shapes.png"
    tiny_images[0].save(image)
    text = tmp_path / "notes.png"
    text.write_text("not an image, just text " * 10)
    noise = tmp_path / "noise.wav"
    noise.write_bytes(b"RIFF" + b"\x00" * 100)
    big = tmp_path / "huge.png"
    noise_pixels = np.random.default_rng(0).integers(0, 256, (600, 600, 3), dtype=np.uint8)
    Image.fromarray(noise_pixels).save(big)                     # ~1 MB: noise does not compress
    return {"image": image, "text": text, "bad_audio": noise, "big": big}


def ask(client, image=None, text="", audio=None, messages=()):
    return client.predict(handle_file(str(image)) if image else None, text,
                          handle_file(str(audio)) if audio else None, list(messages),
                          api_name="/ask")


def answer_of(result) -> str:
    messages = result[0] if isinstance(result, tuple) else result
    content = messages[-1]["content"]
    if isinstance(content, list):                     # [{"type": "text", "text": ...}]
        content = "".join(part.get("text", "") for part in content)
    return content


def test_listens_on_loopback_only(server):
    assert server["url"].startswith("http://127.0.0.1:")


def test_streams_the_same_answer_as_the_library(server, files, tiny_images):
    client, assistant = server["client"], server["assistant"]
    expected = assistant.ask(tiny_images[0], "What colour is the circle?", max_new_tokens=48)
    job = client.submit(handle_file(str(files["image"])), "What colour is the circle?", None, [],
                        api_name="/ask")
    final = job.result(timeout=60)
    assert len(job.outputs()) >= 3                    # the answer arrived in several pieces
    assert answer_of(final) == (expected or "(no answer)")
    messages = final[0]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert final[2] == ""                             # the question box is cleared
    assert server["calls"] == [1]                     # the model is loaded once


def test_follow_up_keeps_the_conversation(server, files, tiny_images):
    client, assistant = server["client"], server["assistant"]
    first = ask(client, files["image"], "What colour is the circle?")[0]
    second = ask(client, files["image"], "Where is it?", messages=first)[0]
    assert len(second) == 4
    history = [{"from": "human", "value": "<image>\nWhat colour is the circle?"},
               {"from": "gpt", "value": answer_of(first)}]
    expected = assistant.ask(tiny_images[0], "Where is it?", history=history, max_new_tokens=48)
    assert answer_of(second) == (expected or "(no answer)")


def test_spoken_question(server, files):
    result = ask(server["client"], files["image"], "", CLIPS / "what_color_is_the_circle.wav")
    assert "What color is the circle?" in result[1]   # the status shows what was heard
    assert result[0][0]["content"] in ("🎤 What color is the circle?",
                                       [{"type": "text", "text": "🎤 What color is the circle?"}])


@pytest.mark.parametrize("case, message", [
    ("no_image", "no image"),
    ("not_image", "not an image"),
    ("empty_question", "empty question"),
    ("long_question", "limit is 500"),
    ("bad_audio", "noise.wav"),
])
def test_bad_input_gives_a_message_and_the_app_keeps_serving(server, files, case, message):
    client = server["client"]
    kwargs = {"no_image": dict(image=None, text="What?"),
              "not_image": dict(image=files["text"], text="What?"),
              "empty_question": dict(image=files["image"], text="  "),
              "long_question": dict(image=files["image"], text="why " * 200),
              "bad_audio": dict(image=files["image"], audio=files["bad_audio"])}[case]
    with pytest.raises(AppError, match=message):
        ask(client, **kwargs)
    assert answer_of(ask(client, files["image"], "Where is it?"))      # still serving


def test_upload_size_limit(server, files):
    """Both the client (from the app's config) and the server (HTTP 413) refuse big uploads."""
    import httpx

    assert files["big"].stat().st_size > 0.5 * 1024 * 1024
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        ask(server["client"], files["big"], "What?")
    upload = server["url"] + "gradio_api/upload"
    refused = httpx.post(upload, files={"files": ("huge.png", files["big"].read_bytes())})
    assert refused.status_code == 413
    assert httpx.post(upload, files={"files": ("ok.png", files["image"].read_bytes())}).status_code == 200
    assert answer_of(ask(server["client"], files["image"], "Where is it?"))
