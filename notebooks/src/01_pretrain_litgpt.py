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
# # Pretrain a Pythia model from scratch with LitGPT

# %% [markdown]
# A language model starts as random numbers. **Pretraining** turns it into something that
# continues text plausibly, by one simple exercise repeated millions of times: read a block of
# tokens, predict each next token, nudge the weights to make the right one more likely.
#
# Here you pretrain a GPT with the **Pythia** architecture (EleutherAI's GPT-NeoX family) from
# random weights, with **LitGPT** doing the training:
#
# | profile | model | corpus | tokenizer |
# |---|---|---|---|
# | `smoke` | 2 layers, 58k parameters | a few hundred ShapesWorld documents | BPE trained here |
# | `cpu` | 4 layers, ~1.1M parameters | 20k ShapesWorld documents (~1.1M tokens; 600k read) | BPE trained here (~600 tokens) |
# | `t4`/`a100` | `pythia-160m` | a RedPajama sample, downloaded here | the real Pythia tokenizer |
#
# The earlier write-ups pasted a 2023 lit-gpt RedPajama script that LitGPT has since removed.
# This notebook uses the current LitGPT (0.5.13) through its supported interface, the `litgpt
# pretrain` command. The library prepares its inputs (corpus, tokenizer, model config, settings)
# and reads its outputs (CSV log, checkpoints); it never re-implements the training loop.
#
# **Where the model goes next.** On `cpu`/`smoke` the model you train here is the language model
# that notebooks 03-05 teach to see. On GPU profiles those notebooks use Microsoft's **Phi-2**
# instead (2.7B parameters, pretrained on 1.4T tokens, far beyond a course budget); pretraining
# `pythia-160m` here shows the process and what more compute would buy.

# %%
import itertools
import json
import math
import matplotlib.pyplot as plt
import torch

from capstone_lib.language_model import ensure_language_model, export_language_model, load_language_model
from capstone_lib.pretrain import (EARLIER_WRITEUP, corpus_paths, ensure_tokenizer, format_command, hf_generate,
                                   lit_config, lit_generate, lit_model, loss_curves, pretrain_command,
                                   pretrain_paths, read_metrics, run_pretraining, scaling_estimate, throughput)
from capstone_lib.report import StageTimer
from capstone_lib.tokenizer import load_tokenizer

paths = pretrain_paths(profile)
on_shapes = profile.data.source == "shapesworld"
print("pretraining files go to", paths.root)

# %% [markdown]
# ## 1. The corpus: RedPajama-format jsonl
# RedPajama (the open reproduction of LLaMA's training data) ships one JSON object per line:
# `{"text": ..., "meta": {...}}`. Our ShapesWorld corpus uses the same format, so the same code
# reads both. It mixes captions of random scenes, short facts, and text-only chats written in the
# course's chat template (`Instruct: ... Output: ...<|endoftext|>`), so the model learns the
# vocabulary *and* the turn format that notebooks 03-05 rely on.
#
# The mix and the amount both matter. A chat document first states a scene in words ("Scene: a
# red circle at the top left and ...") and then asks and answers questions about it and describes
# it: the only kind of document whose next words depend on words earlier in the same document
# (a yes/no answer states its evidence first, "The square is blue, so no.", as in notebook 04's
# training conversations, which explains why: `data.shapesworld.explain_exists`). The
# `cpu` profile mixes captions, chats (2-5 exchanges: `corpus_chat_turns`) and facts 4 : 4 : 2
# (`data.shapesworld.corpus_mix`) and stops after 600k tokens, about half the corpus. We measured
# the whole course with other choices (docs/EXPERIMENTS.md): pretraining twice as long (1.2M tokens)
# gives an LM that reads worded scenes better and a projector (notebook 03) that grounds captions
# better, but after stage 2 (notebook 04) it answers *fewer* held-out questions (0.83 against
# 0.89-0.90); half as long (300k) collapses (0.67). Real text (RedPajama) is full of such
# dependencies already.
#
# On the GPU profiles the corpus is three files of the RedPajama sample on the hub (c4, wikipedia,
# stackexchange). A hub file downloads whole: `c4_sample.jsonl` alone is 866 MB, of which the
# reader uses only the first `pretrain.corpus_max_tokens` (60M tokens, about 240 MB of text; 12M on
# the T4). With Drive mounted (the setup cell), it is downloaded once, into `CAPSTONE_DATA_DIR`.

# %%
train_path, val_path = corpus_paths(profile)
print("train:", train_path, "\nval:  ", val_path or "held out from the training files")
first = train_path if train_path.is_file() else sorted(train_path.glob("*.jsonl"))[0]
with open(first, encoding="utf-8") as f:                      # the first 3 documents (blank lines skipped)
    for doc in itertools.islice((json.loads(line) for line in f if line.strip()), 3):
        print(f"- [{(doc.get('meta') or {}).get('source', first.stem)}] {doc['text'][:230]!r}")

# %% [markdown]
# A bad line is an error that names the file and line (`file.jsonl:17: not JSON ...`), an empty
# corpus or one shorter than a single training block is refused the same way, before LitGPT starts.
#
# ## 2. The tokenizer
# On GPU profiles we use Pythia's own tokenizer (50k tokens). On `cpu`/`smoke` nothing may be
# downloaded, and a 50k-row output layer would dominate a tiny model's compute, so we train a
# byte-level BPE (GPT-2's algorithm) on the corpus with Hugging Face `tokenizers`. It has two
# special tokens: `<|endoftext|>` ends every document (and pads), `<image>` is the placeholder
# that stage 1 replaces with image features. No BOS token is added.

# %%
tok_dir = ensure_tokenizer(profile)
tokenizer = load_tokenizer(tok_dir)
sample = "Instruct: <image>\nWhat colour is the circle?\nOutput: red<|endoftext|>"
ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
print(f"{len(tokenizer)} tokens in the vocabulary; {len(sample)} characters -> {len(ids)} tokens")
print(tokenizer.convert_ids_to_tokens(ids))
print("eos:", tokenizer.eos_token, "| pad:", tokenizer.pad_token)   # Pythia's hub tokenizer pads with <|padding|>
assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token is not None
if on_shapes:                       # the course's own BPE pads with its only end token
    assert tokenizer.pad_token == tokenizer.eos_token
assert tokenizer.convert_tokens_to_ids("<image>") in ids

# %% [markdown]
# ## 3. The model: a Pythia-style GPT
# Pythia blocks are GPT-NeoX blocks: LayerNorm, multi-head attention with rotary position
# embeddings on a quarter of each head, a GELU MLP, and attention and MLP computed **in parallel**
# from the same input (`parallel_residual`). On GPU profiles the named LitGPT config `pythia-160m`
# is used; on `cpu`/`smoke` a tiny custom config of the same architecture.

# %%
config = lit_config(profile)
fields = ["name", "n_layer", "n_head", "n_embd", "intermediate_size", "block_size",
          "padded_vocab_size", "rotary_percentage", "parallel_residual"]
for k in fields:
    print(f"{k:>18}: {getattr(config, k)}")
untrained = lit_model(profile, seed=0)
n_params = sum(p.numel() for p in untrained.parameters())
print(f"{n_params:,} parameters")

# %% [markdown]
# Before training, the model's next-token distribution is close to uniform, so sampling from it
# gives a random walk through the vocabulary:

# %%
if on_shapes:
    prompts = ["A red circle", "There are two shapes:",
               "Instruct: What colour is the square?\nOutput:", "Instruct: How many shapes are there?\nOutput:"]
else:
    prompts = ["The capital of France is", "def fibonacci(n):", "In 1905, Albert Einstein"]
before = lit_generate(untrained, tok_dir, prompts, max_new_tokens=24, temperature=1.0)
for p, s in zip(prompts, before):
    print(f"{p!r} -> {s!r}")

# %% [markdown]
# ## 4. The training run
# `run_pretraining` builds the `litgpt pretrain` command below and runs it as a subprocess
# (LitGPT's Python entry point re-reads `sys.argv`, which breaks inside Jupyter), streaming its
# progress here. The settings come from the profile's `pretrain` section:
#
# * **token budget** (`--train.max_tokens`): training stops after this many tokens;
# * **micro-batch / global batch**: LitGPT accumulates gradients over `global / micro` micro-batches
#   per optimizer step; `iter` counts micro-batches, `step` optimizer steps;
# * **learning rate**: linear warmup for `lr_warmup_steps`, then cosine decay to `min_lr` (AdamW);
# * **precision**: `32-true` on CPU, `bf16-mixed` on an A100;
# * **checkpoints** every `save_interval` steps into `step-XXXXXXXX/`, and `--resume auto`: if the
#   run is interrupted (stop the cell, a recycled Colab runtime), running the cell again continues
#   from the last checkpoint, with the optimizer state and the data loader's position;
# * **data**: `capstone_lib.lit_data.JsonlText`, a small LitGPT `DataModule` that tokenizes the jsonl
#   once (cached), and cuts the token stream into blocks of `block_size + 1` tokens.
#
# Multi-GPU (`a100x8`) is the same command with `--devices 8`: LitGPT's Fabric starts one process
# per GPU and shards the model with FSDP.

# %%
cmd = pretrain_command(profile, train_path, val_path, tok_dir)
print(format_command(cmd))

# %%
with StageTimer(profile, "pretrain") as timer:
    result = run_pretraining(profile)
    rows = read_metrics(result.out_dir)
    speed = throughput(rows, profile)
    timer.metrics.update(initial_val_loss=result.initial_val_loss, final_val_loss=result.final_val_loss,
                         params=n_params, tokens=int(max(r.get("tokens", 0) for r in rows)),
                         **{k: round(v, 1) for k, v in speed.items()})
print(f"validation loss {result.initial_val_loss:.3f} at step 0 -> {result.final_val_loss:.3f} at the end")

# %% [markdown]
# ## 5. The loss curves
# LitGPT's CSV logger writes `logs/csv/version_N/metrics.csv` (one version per run, so a resumed
# run adds a file). The training loss is a running mean over each optimizer step; the validation
# loss is measured on held-out documents.

# %%
curves = loss_curves(rows, result.initial_val_loss, result.final_val_loss)
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.plot(*curves["train"], label="train (running mean)", alpha=0.8)
ax.plot(*curves["val"], "o-", label="validation")
ax.axhline(math.log(config.padded_vocab_size), ls=":", c="grey", label="uniform guess: ln(vocab)")
ax.set_xlabel("tokens seen"); ax.set_ylabel("cross-entropy (nats/token)"); ax.legend(); ax.grid(alpha=0.3)
ax.set_title(f"{config.name}: pretraining from random weights")
plt.show()

drop = result.initial_val_loss - result.final_val_loss
print(f"validation loss fell by {drop:.2f} nats/token (perplexity {math.exp(result.initial_val_loss):.0f} "
      f"-> {math.exp(result.final_val_loss):.1f})")
assert result.final_val_loss < result.initial_val_loss
if profile.name == "cpu":
    # From ~ln(vocab) = 6.9 down to the corpus' own uncertainty (which colour, shape, place comes next).
    assert drop > 4.0 and result.final_val_loss < 2.0, (result.initial_val_loss, result.final_val_loss)

# %% [markdown]
# ## 6. Samples after training
# The same prompts as before, now from the final checkpoint (greedy decoding, then sampling):

# %%
trained = lit_model(profile, result.final_checkpoint)
greedy = lit_generate(trained, tok_dir, prompts, max_new_tokens=24)
sampled = lit_generate(trained, tok_dir, prompts, max_new_tokens=24, temperature=0.8, top_k=50)
for p, b, g, s in zip(prompts, before, greedy, sampled):
    print(f"{p!r}\n   before : {b!r}\n   greedy : {g!r}\n   sampled: {s!r}")

# %% [markdown]
# ## 7. Speed, next to the earlier write-up
# The earlier write-up's LitGPT log shows about **650 ms per iteration** for `pythia-160m` at
# micro-batch 4 on a 24 GB GPU (its loss went from 10.98 to about 6.1 in 600 iterations). Tokens
# per second assume Pythia's 2048-token context. Our figures are medians over the run (the first
# iteration, which warms up, is excluded).

# %%
theirs = EARLIER_WRITEUP
their_tps = theirs["micro_batch_size"] * theirs["block_size"] / (theirs["ms_per_iter"] / 1000)
table = [("", "earlier write-up", "this run"),
         ("model", theirs["model"], config.name),
         ("device", "24 GB GPU", profile.runtime.device),
         ("micro-batch x context", f"{theirs['micro_batch_size']} x {theirs['block_size']}",
          f"{speed['micro_batch_size']} x {speed['block_size']}"),
         ("ms per iteration", f"{theirs['ms_per_iter']:.0f}", f"{speed['ms_per_iter']:.1f}"),
         ("ms per optimizer step", "-", f"{speed['ms_per_step']:.1f}"),
         ("tokens / second", f"{their_tps:,.0f}", f"{speed['tokens_per_sec']:,.0f}")]
for row in table:
    print(f"{row[0]:>24} | {row[1]:>18} | {row[2]:>18}")

# %% [markdown]
# ## 8. What more compute would buy
# Training cost is about `6 x parameters x tokens` FLOPs. The Chinchilla study found that for a
# fixed budget the loss is lowest with roughly **20 tokens per parameter**; Pythia itself was
# trained far past that (300B tokens for every size). The table says how far this run got, and
# how long a compute-optimal run would take at the speed just measured.

# %%
tokens_seen = int(max(r.get("tokens", 0) for r in rows))
est = scaling_estimate(n_params, tokens_seen, speed["tokens_per_sec"])
print(f"this run: {tokens_seen:,} tokens = {est['fraction_of_optimal']:.1%} of the compute-optimal "
      f"{est['chinchilla_tokens']:,.0f}; {est['train_flops']:.2e} FLOPs")
print(f"a compute-optimal run at this speed: {est['hours_to_optimal_here']:.2f} hours")
big = scaling_estimate(162_322_944, 0, their_tps)
print(f"pythia-160m: {big['chinchilla_tokens'] / 1e9:.1f}B tokens, {big['optimal_flops']:.1e} FLOPs, "
      f"~{big['hours_to_optimal_here']:.0f} GPU-hours at the earlier write-up's speed "
      f"(Pythia's own 300B tokens: ~{300e9 / their_tps / 3600 / 24:.0f} GPU-days)")

# %% [markdown]
# On ShapesWorld the corpus is small and repetitive, so a second epoch buys little; on real text
# the curve is still falling steeply when a course budget ends, and every 10x of compute keeps
# buying a predictable drop in loss (the scaling laws).
#
# ## 9. Hand-off: a Hugging Face `transformers` model
# LitGPT's own converter (`convert_lit_checkpoint`) renames the weights to GPT-NeoX's layout; the
# library adds the matching `GPTNeoXConfig` and the tokenizer and saves everything (safetensors)
# to `runs/<profile>/pretrain/hf/`. Any `transformers` code can now load it offline with
# `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`. We check that both
# frameworks compute the same logits.

# %%
hf_dir = export_language_model(profile)
print(sorted(p.name for p in hf_dir.iterdir()))

from transformers import AutoModelForCausalLM, AutoTokenizer
hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
hf_tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
x = torch.tensor([hf_tok(prompts[0] + " and", add_special_tokens=False)["input_ids"]])
with torch.no_grad():
    diff = (hf_model(x).logits - trained(x)).abs().max().item()
print(f"{type(hf_model).__name__}: max |logit difference| vs LitGPT = {diff:.2e}")
assert diff < 1e-4
hf_greedy = hf_generate(hf_model, hf_tok, prompts, max_new_tokens=24)
for p, s in zip(prompts, hf_greedy):
    print(f"{p!r} -> {s!r}")
assert hf_greedy == greedy          # same weights, same greedy continuation

# %%
if on_shapes:
    words = {"red", "green", "blue", "yellow", "purple", "white", "circle", "square", "triangle",
             "circles", "squares", "triangles", "left", "right", "top", "bottom", "center",
             "one", "two", "three"}
    hits = [len(words & set(s.replace(".", " ").replace(",", " ").split())) for s in hf_greedy]
    print("ShapesWorld words per sample:", hits)
    need = len(prompts) if profile.name == "cpu" else 1         # smoke is barely trained
    assert sum(h > 0 for h in hits) >= need, hf_greedy

source = ensure_language_model(profile)
print("notebooks 03-05 will use:", source)
if on_shapes:
    model, tok = load_language_model(profile)
    print(type(model).__name__, f"{sum(p.numel() for p in model.parameters()):,} parameters;",
          "<image> id:", tok.convert_tokens_to_ids("<image>"), "eos = pad:", tok.pad_token)

# %% [markdown]
# On `cpu`/`smoke` that directory is the language model of notebooks 03-05. On GPU profiles
# they use `microsoft/phi-2` instead, as printed above.
#
# **Try it:** double `max_tokens` with `get_profile(..., pretrain={"max_tokens": ...})` and run
# the training cell again: `--resume auto` continues from the last checkpoint instead of starting
# over (LitGPT stretches the cosine schedule to the new budget), and the CSV log gains a second
# version.
