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
# # 04 · Stage 2: QLoRA on conversations, and a standard assistant

# %% [markdown]
# Stage 1 taught the projector to describe images. Now the model learns to **answer**: we
# fine-tune the language model together with the projector on LLaVA-Instruct-style
# conversations. The LM is loaded in 4-bit NF4 (bitsandbytes) and only small LoRA adapters on
# its attention and MLP projections learn (QLoRA): that is what lets a 1-3B LM fit a T4.
#
# What the earlier write-ups got wrong, and what this notebook shows instead:
# - they never fed the answer as input (no teacher forcing): here the answer tokens are the input
#   *and* the (shifted) labels;
# - EOS was both padding and `ignore_index`, so the model never learned to stop: here padding is
#   masked by position and the EOS after every answer is supervised;
# - one turn per conversation: here every turn is kept (truncated only at turn boundaries);
# - `PeftModel.from_pretrained(...)`'s result was discarded, so the demo ran an untrained adapter:
#   here loading an adapter checks that it really changes the model.

# %%
import json
import matplotlib.pyplot as plt
import torch
from IPython.display import HTML, display

from capstone_lib.chat import IMAGE_TOKEN, encode_conversation, format_of, render_supervision
from capstone_lib.coco import load_coco_captions
from capstone_lib.evaluate import evaluate_course, format_course_results, headline, on_shapesworld
from capstone_lib.feature_cache import ensure_feature_cache
from capstone_lib.llava_data import load_llava_instruct
from capstone_lib.lm_spec import lm_spec
from capstone_lib.language_model import ensure_language_model
from capstone_lib.data_sources import dataset_paths
from capstone_lib.report import StageTimer, record_eval
from capstone_lib.stage1 import ensure_projector
from capstone_lib.stage2 import ensure_assistant, train_stage2
from capstone_lib.tokenizer import load_tokenizer
from capstone_lib.history import plot_history

on_shapes = on_shapesworld(profile)
spec = lm_spec(profile)               # the LM's identity: weights, chat format, EOS, LoRA targets, export
print(f"LM: {spec.hub_id or 'the model you pretrained in notebook 01'} ({spec.chat_format} format; {spec.why})")
paths = dataset_paths(profile)        # ShapesWorld on cpu/smoke, COCO + LLaVA-Instruct on GPU profiles
ensure_projector(profile)            # notebook 03's projector (trained now if you skipped 03)
records = load_llava_instruct(paths.llava_train, paths.train_images)
val_cache = ensure_feature_cache(profile, "val")
n_tokens = val_cache.feature_shape[0]
print(f"{len(records)} conversations, {sum(len(r.conversations) // 2 for r in records)} question-answer turns")
print(json.dumps(records[0].conversations, indent=1)[:600])

# %% [markdown]
# ## 1. One template, every turn supervised
# The course renders every conversation with one template, in training and at inference: the
# format the LM spec names (`instruct`, Phi-2's `Instruct: ... Output: ...`, for the LM of notebook
# 01; `chatml`, SmolLM2's own `<|im_start|>user ... <|im_end|>`, on GPU profiles). The exported
# processor carries the same template, generated from the same strings. Human turns are grey
# (masked), answers and their end-of-answer token green.

# %%
tokenizer = load_tokenizer(ensure_language_model(profile), spec)     # checked against the spec
print("chat format:", format_of(tokenizer).name, "| answers end with", repr(tokenizer.eos_token))
enc = encode_conversation(tokenizer, records[0].conversations, n_tokens, profile.stage2.max_len)
display(HTML(render_supervision(tokenizer, enc.input_ids, enc.labels)))
n_answers = sum(1 for t in records[0].conversations if t["from"] == "gpt")
supervised_eos = sum(1 for t, l in zip(enc.input_ids, enc.labels) if l == tokenizer.eos_token_id)
assert supervised_eos == n_answers, "every answer must end with a supervised EOS"

# Too long for the context? Whole turns are dropped from the end, never half a turn.
first_pair = encode_conversation(tokenizer, records[0].conversations[:2], n_tokens, max_len=10**6)
limit = len(first_pair.input_ids) + 5           # room for the first exchange only
short = encode_conversation(tokenizer, records[0].conversations, n_tokens, max_len=limit)
print(f"kept {short.turns_kept} of {short.turns_total} turns at max_len={limit}")
assert short.turns_kept == 2 and short.input_ids == first_pair.input_ids

# %% [markdown]
# ## 2. Train: 4-bit base + LoRA + projector
# Same trainer as stage 1 (warmup + cosine, accumulation, clipping, resumable checkpoints); the
# LoRA weights and the projector get their own learning rates. Batches group conversations of
# similar length so little compute goes to padding.
#
# Whether the frozen base is 4-bit is one setting, `stage2.quantize_4bit`. On the GPU profiles it
# is on: that is what makes a 1.7B LM fit. The `cpu` profile's LM has about a million parameters,
# so 4-bit saves nothing there and costs time (each step dequantizes the weights): it keeps the
# base in full precision and trains the same LoRA adapters, ~1.2x faster per step
# (`make bench`, docs/PERFORMANCE.md). The plan printed below says which precision the
# matrix products run in.

# %%
with StageTimer(profile, "stage2") as t:
    result = train_stage2(profile, resume="auto")
    t.metrics.update({"steps": len(result["history"]), "conversations": result["samples"],
                      "truncated": result["truncated"], "final_loss": result["history"][-1]["loss"]})
print(t.metrics)
vlm, tokenizer = result["model"], result["tokenizer"]
base = "4-bit NF4" if profile.stage2.quantize_4bit else "full-precision"
print(type(vlm.lm.base_model.model).__name__, f"({base} base) with LoRA;",
      sum(p.numel() for p in vlm.parameters() if p.requires_grad), "trainable parameters")
plot_history(result["history"], title=f"stage 2: LoRA on a {base} base + projector");

# %% [markdown]
# The model we ship merges the LoRA weights into a full-precision copy of the base LM. We load it
# back from the saved files, as the demo will: `load_adapter_checked` *returns* the adapted model
# (the earlier demo discarded it) and refuses an adapter that is all zeros or does not fit the base.

# %%
from capstone_lib.stage2 import load_trained_model
vlm, tokenizer = load_trained_model(profile)

# %% [markdown]
# ## 3. Held-out evaluation
# Questions about images the model never saw (asked of the merged model that we ship), by type; answers normalised
# (case, punctuation,
# number words) before matching. The report keeps all three phases.

# %%
with StageTimer(profile, "eval") as t:
    final = evaluate_course(profile, vlm, tokenizer, val_cache, paths)
scores = {k: v for k, v in final.items() if not k.endswith("examples")}
record_eval(profile, "after_stage2", scores)
report = record_eval(profile, "final", scores)
phases = report["eval"]["phases"]
print(format_course_results({"before training": phases.get("before_training", final),
                             "after stage 1": phases.get("after_stage1", final), "after stage 2": final}))
name, value = headline(final)
print(f"{name} after stage 2: {value:.3f}")
if not on_shapes:                     # COCO: POPE answers and captions next to their references
    for ex in final["pope_examples"][:4] + final["caption_examples"][:2]:
        print(" ", ex)
for ex in final.get("vqa_examples", [])[:8]:
    print(f"  {'OK ' if ex['ok'] else 'BAD'} Q: {ex['question']:<42} A: {ex['prediction']!r:<16} ref: {ex['answer']!r}")

plt.figure(figsize=(7, 3))
shown = [(label, phases[key]) for label, key in (("before training", "before_training"),
                                                 ("after stage 1", "after_stage1")) if key in phases]
shown.append(("after stage 2", final))
if on_shapes:                         # accuracy per question type, per phase
    types = sorted(final["vqa_by_type"])
    for i, (label, r) in enumerate(shown):
        plt.bar([j + i * 0.27 for j in range(len(types))], [r["vqa_by_type"][t] for t in types], 0.27, label=label)
    plt.xticks([j + 0.27 for j in range(len(types))], types); plt.ylabel("accuracy")
else:                                 # POPE accuracy and CIDEr per phase
    for i, (label, r) in enumerate(shown):
        plt.bar([i * 0.27, 1 + i * 0.27], [r["pope_accuracy"], r["cider"]], 0.27, label=label)
    plt.xticks([0.27, 1.27], ["POPE accuracy", "CIDEr (x1)"])
plt.legend(); plt.show()

if profile.name == "cpu":
    assert final["n_questions"] >= 200
    # The course's bar: held-out VQA >= 0.90 and captions >= 0.80 (all 300 held-out images).
    # With yes/no answers that state their evidence first (next section), runs from seeds that had
    # left "exists" on its plateau measured VQA 0.98 / 0.973 and captions 0.94 / 0.95 (docs/EXPERIMENTS.md).
    assert final["vqa_accuracy"] >= 0.90, final["vqa_accuracy"]
    assert final["caption_accuracy"] >= 0.80, final["caption_accuracy"]
    assert final["vqa_accuracy"] >= phases["after_stage1"]["vqa_accuracy"] + 0.25

# %% [markdown]
# ### Why "exists" is the hardest type, and the least reliable
# Every other question is a *lookup*: find the image token that matches the words (a shape, a
# colour, a cell) and copy what it holds; counting is a lookup of "any object here?". "Is there a
# red circle?" is a *comparison*: no feature of the image alone, and none of the question alone,
# says yes or no; only the two together do. Gradient descent gets almost no signal from such a
# product at the start, so a small model sits on a plateau at a coin flip until, in some runs, it
# finds its way off. We measured both on `cpu` (5000 stage-2 steps): one run got "exists" to 0.80
# (and 0.92 with notebook 01's chat-heavy corpus), another with a differently pretrained LM stayed at 0.52 while
# every other type rose (colour 0.95, position 0.85). Trained on "exists" questions alone for 1500
# steps, the loss of the yes/no token stayed at ln 2, with or without a start-of-text token to
# attend to; twice as many "exists" questions (0.53) or "Where is the red circle?" -> "There is no
# red circle." negatives in training (0.48) did not get it off the plateau either. Large LMs learn
# such comparisons while pretraining on far more text; ours saw 600k tokens.
#
# With notebook 01's current corpus (2-5 exchanges per chat, 600k tokens) "exists" got off its plateau
# (0.95), and what now holds the model back is *binding*: every wrong "Where is the yellow square?"
# answer we inspected (22 of 60) named the cell of *another* object in the same image, even when the
# colour alone picks the object. The image tokens carry what is needed (from one token a linear probe
# reads colour 1.00, cell 0.98, shape 0.93); the small LM is slow to learn to look up the right one.
# With an LM pretrained twice as long on a chat-heavy corpus, the colour questions were the weak ones
# (0.60-0.72) and VQA ended at 0.82-0.85.
#
# The last step was on the *vision* side. Of 23 wrong captions in one run, 13 had a wrong shape,
# nearly always a circle called a square (at 12-16 pixels they differ only in their corners), and
# "what shape?" answers sat at 0.93. A linear probe on one patch token read the shape at 0.945.
# Training the tiny CLIP longer and gentler (2000 steps at lr 1e-3 instead of 1200 at 2e-3, notebook
# 02) took that probe to 0.98, shape answers to 1.00 and captions from 0.77 to 0.90, with fewer
# stage-2 steps (5000 instead of 7000). An answer can be no better than the features it reads.
# Then, since a caption has to get every object right, the training conversations ask for a
# description more often (`describe_fraction`, 60% instead of 30%): on a seed where captions had
# stopped at 0.79 they reached 0.87, while VQA gave up a little (0.97 -> 0.94). In the CI run of
# that recipe captions reached 0.98 but "exists" stayed on its coin-flip plateau (0.57) and VQA
# ended at 0.82: a description *replaced* a question, so fewer question turns left less signal for
# the comparison to be found. The same LM with 30% descriptions got "exists" to 0.93 but captions
# only to 0.76. The way out of that trade was to give each training conversation one more exchange
# (4-5 instead of 3-4): the model sees more questions *and* more descriptions per step for ~20% more
# tokens. From the very LM, CLIP and projector that had ended at 0.82 / 0.98: VQA 0.97 ("exists"
# 0.98), captions 0.93; its two CI runs 0.98 / 0.98 and 0.963 / 0.98. Captions then held in every run; "exists" still did
# not: a run from another seed left it at 0.72 (VQA 0.897), one more at 0.57 even after 6000 steps (VQA 0.82).
#
# ### Let the answer show its work
# What finally took "exists" off its plateau was not more steps but a different *answer*. The
# training conversations (and notebook 01's chats) now answer a yes/no question with its evidence
# first and its verdict last:
#
#     Is there a red square?   ->  The square is blue, so no.
#     Can you see a blue circle? ->  The circles are green and blue, so yes.
#     Is there a purple triangle? -> There is no triangle, so no.
#
# The first half is a lookup the model already makes well ("What colour is the square?"); the
# verdict then compares two words that are both *in the text*, the question's colour and the one
# just written, which is the kind of match a language model learns easily. This is chain of thought
# at the smallest scale: the same network, given room to write an intermediate result, solves what it
# could not solve in one step. The held-out questions keep their canonical answers, and the
# evaluation reads a yes/no answer's verdict after its closing "so" (`yes_no_verdict`; a bare "no"
# still counts, a verdict anywhere else does not). From the seed that had left "exists" at 0.57 after
# 6000 steps: VQA 0.98, "exists" 0.95, captions 0.94 after 5000; from the one that had left it at 0.72:
# VQA 0.973, "exists" 0.95, captions 0.95 (`data.shapesworld.explain_exists`, docs/EXPERIMENTS.md).

# %% [markdown]
# ## 4. Export one standard checkpoint
# The LoRA is merged into a full-precision copy of the base LM, the projector becomes Llava's
# multimodal projector, and the vision tower and processor (image processor, tokenizer, chat
# template with the image token) are saved next to them, all in safetensors. Anyone can load it
# with plain transformers, no code from this course.
#
# One LM cannot be saved that way: Phi-2's output head adds a bias to every logit, and Llava's
# `lm_head` has none (no exact fold of the bias into the weights exists). With `lm=lm_preset("phi-2")`
# the assistant is saved in the course's own folder instead (`language_model/`, `vision_tower/`,
# `projector.safetensors`, each in its standard transformers form), which `Assistant` and the app
# load. The LM spec's `export` setting decides, before any weights are loaded.

# %%
with StageTimer(profile, "export"):
    assistant_path = ensure_assistant(profile)
print(f"{spec.export} export:", sorted(p.name for p in assistant_path.iterdir()))

from PIL import Image
from capstone_lib.assistant import Assistant
from capstone_lib.chat import encode_prompt
from capstone_lib.generate import stream_generate
from capstone_lib.vision import load_vision_tower, vision_features

if on_shapes:
    q = json.loads(paths.eval_questions.read_text())[0]
    image_path, question, truth = paths.root / q["image"], q["question"], q["answer"]
else:                                 # a held-out COCO photo
    rec = load_coco_captions(paths.coco_root, "val")[0]
    image_path, question, truth = rec.path, "What is in the image?", rec.captions[0]
image = Image.open(image_path).convert("RGB")
plt.imshow(image); plt.axis("off"); plt.show()

# The in-library model (stage 2's own loader), on the CPU like the exported one below, fed the image
# through the same fp32 tower: its greedy tokens.
vlm = vlm.to("cpu")
tower, image_processor = load_vision_tower(profile, device="cpu")
with torch.no_grad():
    pixels = image_processor(images=image, return_tensors="pt")["pixel_values"]
    feats = vision_features(tower, pixels, layer=profile.vision.feature_layer)
    ids = encode_prompt(tokenizer, [], f"{IMAGE_TOKEN}\n{question}", feats.shape[1])
    library_tokens = list(stream_generate(vlm, vlm.embed(torch.tensor([ids]), image_features=feats),
                                          eos_token_id=tokenizer.eos_token_id, max_new_tokens=16))
library_answer = tokenizer.decode(library_tokens, skip_special_tokens=True).strip()

messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
if spec.export == "llava":            # plain transformers: no code from this course
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline
    processor = AutoProcessor.from_pretrained(assistant_path)
    model = AutoModelForImageTextToText.from_pretrained(assistant_path).eval()
    inputs = processor(images=image, text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == ids, "the exported template must render the training prompt"
    exported_tokens = model.generate(**inputs, max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    if tokenizer.eos_token_id in exported_tokens:     # generate keeps the EOS it stopped at; the loop does not
        exported_tokens = exported_tokens[:exported_tokens.index(tokenizer.eos_token_id)]
    pipe = pipeline("image-text-to-text", model=str(assistant_path))
    out = pipe(text=messages, max_new_tokens=16, do_sample=False, return_full_text=False)
    exported_answer = out[0]["generated_text"].strip()
else:                                 # the course's folder, through the course's loader
    assistant = Assistant.from_pretrained(assistant_path, transcriber=None)
    features = assistant.image_features(image)
    assert assistant.prompt_ids([], question, features.shape[0]) == ids
    exported_tokens = list(stream_generate(assistant.model, assistant.embed_prompt(ids, features),
                                           eos_token_id=tokenizer.eos_token_id, max_new_tokens=16))
    exported_answer = assistant.ask(image, question, max_new_tokens=16)
print(f"Q: {question}\n  exported:   {exported_answer!r}\n  in-library: {library_answer!r}\n  truth:      {truth!r}")
print(f"  {len(library_tokens)} greedy tokens, the same from both: {exported_tokens == library_tokens}")
assert exported_tokens == library_tokens and exported_answer == library_answer
