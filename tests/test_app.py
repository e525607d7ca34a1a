"""The Gradio app over loopback: a tiny assistant answers, bad uploads get messages, it keeps serving."""
from __future__ import annotations

import re
import socket
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from capstone_lib.app import build_app, launch  # noqa: E402
from capstone_lib.assistant import Assistant  # noqa: E402
from capstone_lib.audio import save_audio  # noqa: E402
from capstone_lib.transcribe import Transcriber  # noqa: E402
from test_assistant import build_tiny_llava  # noqa: E402

CLIPS = Path(__file__).resolve().parent.parent / "data" / "audio"
NOW = datetime.now(timezone.utc)


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
        yield {"url": f"http://127.0.0.1:{port}/", "assistant": assistant, "calls": calls, "demo": demo,
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
    silent = save_audio(tmp_path / "silent.wav", np.zeros(32000, np.float32))
    t = np.arange(16000 * 12) / 16000
    long = save_audio(tmp_path / "long.wav", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32))
    return {"image": image, "text": text, "bad_audio": noise, "big": big, "silent": silent, "long": long}


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


def _lan_address() -> str | None:
    """This machine's address on a non-loopback interface, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))                 # no packet is sent for UDP connect
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_listens_on_loopback_only(server):
    assert server["demo"].server_name == "127.0.0.1"
    port = int(server["url"].rsplit(":", 1)[1].strip("/"))
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    lan = _lan_address()
    if lan is None:
        pytest.skip("no non-loopback interface to test from")
    with pytest.raises(OSError):
        socket.create_connection((lan, port), timeout=2).close()


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
    assert re.search(r"transcribed in \d+\.\d\d s.*answered in \d+\.\d\d s", result[1])   # and how long
    assert result[0][0]["content"] in ("🎤 What color is the circle?",
                                       [{"type": "text", "text": "🎤 What color is the circle?"}])


@pytest.mark.parametrize("case, message", [
    ("no_image", "no image"),
    ("not_image", "not an image"),
    ("empty_question", "empty question"),
    ("long_question", "limit is 500"),
    ("bad_audio", "noise.wav"),
    ("silent_audio", "silent"),
    ("long_audio", "limit is 10 s"),
])
def test_bad_input_gives_a_message_and_the_app_keeps_serving(server, files, case, message):
    client = server["client"]
    kwargs = {"no_image": dict(image=None, text="What?"),
              "not_image": dict(image=files["text"], text="What?"),
              "empty_question": dict(image=files["image"], text="  "),
              "long_question": dict(image=files["image"], text="why " * 200),
              "bad_audio": dict(image=files["image"], audio=files["bad_audio"]),
              "silent_audio": dict(image=files["image"], audio=files["silent"]),
              "long_audio": dict(image=files["image"], audio=files["long"])}[case]
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


def test_notebook_widgets_drive_the_same_assistant(server, files, tiny_images):
    from capstone_lib.app import NotebookDemo

    assistant = server["assistant"]
    ui = NotebookDemo(assistant, max_upload_mb=0.5, max_new_tokens=8)
    ui.ask_button.click()
    assert "no image" in ui.status.value
    content = files["image"].read_bytes()                       # what the browser would upload
    ui.image_upload.value = ({"name": "shapes.png", "type": "image/png", "size": len(content),
                              "content": memoryview(content), "last_modified": NOW},)
    assert ui.chat is not None and ui.preview.value
    ui.question.value = "What colour is the circle?"
    ui.ask_button.click()
    expected = assistant.ask(tiny_images[0], "What colour is the circle?", max_new_tokens=8)
    assert ui.chat.history[1]["value"] == (expected or "(no answer)")
    assert "What colour is the circle?" in ui.answer.value and ui.question.value == ""
    ui.set_audio(str(CLIPS / "how_many_shapes_are_there.wav"))
    ui.ask_button.click()                                        # empty box: the audio is asked
    assert "How many shapes are there?" in ui.status.value and len(ui.chat.history) == 4
    assert "transcribed in" in ui.status.value and "answered in" in ui.status.value
    ui.set_audio(files["silent"].read_bytes(), "silent.wav")
    ui.ask_button.click()
    assert "silent" in ui.status.value and len(ui.chat.history) == 4
    big = files["big"].read_bytes()
    ui.image_upload.value = ({"name": "huge.png", "type": "image/png", "size": len(big),
                              "content": memoryview(big), "last_modified": NOW},)
    assert "upload limit" in ui.status.value
    assert not ui.set_image(files["text"].read_bytes(), "notes.png")
    assert "notes.png" in ui.status.value
