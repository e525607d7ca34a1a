"""Tiny stage-1 / stage-2 look-alikes trained by ``capstone_lib.trainer`` (for the trainer tests).

``stage1``: a frozen tiny GPT-NeoX and a trainable projector (Linear-GELU-Dropout-Linear) whose
outputs are spliced in front of the caption tokens, as in the real stage 1.
``stage2``: the same LM in 4-bit NF4 (bitsandbytes) with peft LoRA adapters plus the projector,
two param groups with different learning rates, as in the real stage 2.

``run_segment(kind, out_dir, ...)`` builds the model with a fixed seed and calls
``Trainer.fit(resume="auto")``; the fault tests run it in forked processes and SIGKILL them.
Run as a script it does one segment: ``python tests/fault_worker.py stage1 OUT_DIR``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from capstone_lib.checkpoint import fault_point  # noqa: E402
from capstone_lib.trainer import TrainConfig, Trainer  # noqa: E402

VOCAB, HIDDEN, FEAT, N_PATCH, SEQ = 48, 64, 8, 4, 8   # hidden >= 64: bnb CPU 4-bit blocks


def tiny_lm(seed: int = 0):
    """A 2-layer GPTNeoXForCausalLM (hidden 64, vocab 48) with random weights."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=4 * HIDDEN, max_position_embeddings=64,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                            "partial_rotary_factor": 0.25},
                           bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(config)


class TinyVLM(nn.Module):
    """Projected patch features as a prefix to token embeddings; loss only on caption tokens."""

    def __init__(self, lm: nn.Module, dropout: float = 0.1):
        super().__init__()
        self.lm = lm
        self.projector = nn.Sequential(nn.Linear(FEAT, HIDDEN), nn.GELU(), nn.Dropout(dropout),
                                       nn.Linear(HIDDEN, HIDDEN))

    def forward(self, features, input_ids, labels=None):
        prefix = self.projector(features)
        embeds = torch.cat([prefix, self.lm.get_input_embeddings()(input_ids).to(prefix.dtype)], dim=1)
        if labels is not None:
            labels = torch.cat([torch.full(prefix.shape[:2], -100, dtype=labels.dtype), labels], dim=1)
        return self.lm(inputs_embeds=embeds, labels=labels)


def make_data(n: int = 40, seed: int = 7) -> list[dict]:
    """``n`` random (features, tokens) samples; the first two tokens of each are unsupervised."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, N_PATCH, FEAT, generator=g)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    out = []
    for i in range(n):
        labels = ids[i].clone()
        labels[:2] = -100
        out.append({"features": feats[i], "input_ids": ids[i], "labels": labels})
    return out


def collate(samples: list[dict]) -> dict:
    """Stack samples into a batch dict."""
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def build(kind: str, seed: int = 0):
    """``(model, param_groups, state_filter)`` for ``stage1`` or ``stage2``."""
    torch.manual_seed(seed)
    if kind == "stage1":
        lm = tiny_lm(seed)
        lm.requires_grad_(False)
        model = TinyVLM(lm)
        return model, [{"params": list(model.projector.parameters())}], lambda n: n.startswith("projector.")
    if kind == "stage2":
        import tempfile

        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        with tempfile.TemporaryDirectory() as tmp:
            tiny_lm(seed).save_pretrained(tmp)
            base = AutoModelForCausalLM.from_pretrained(
                tmp, device_map={"": "cpu"}, dtype=torch.float32,
                quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=torch.float32))
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        torch.manual_seed(seed)
        lm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                             target_modules=["query_key_value", "dense"], bias="none"))
        model = TinyVLM(lm)
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        groups = [{"params": lora, "lr": 5e-3, "name": "lora"},
                  {"params": list(model.projector.parameters()), "lr": 1e-3, "name": "projector"}]
        return model, groups, lambda n: "lora_" in n or n.startswith("projector.")
    raise ValueError(f"unknown kind {kind!r}")


def make_eval(val: list[dict]):
    """Validation: loss on held-out samples, a greedy 'caption', and some RNG use (as sampling would)."""
    def eval_fn(model, step):
        batch = collate(val)
        loss = float(model(**batch).loss)
        fault_point("eval_mid")
        logits = model(batch["features"][:2], batch["input_ids"][:2, :3]).logits
        noise = float(torch.rand(()))          # consumes torch RNG: resume must restore it
        return {"val_loss": loss, "noise": noise,
                "samples": [{"generated": logits[i, -1].argmax().item(), "reference": batch["input_ids"][i, 3].item()}
                            for i in range(2)]}
    return eval_fn


def config(kind: str, **over) -> TrainConfig:
    """The fault-suite run: 3 epochs of 40 samples, accumulation, checkpoints every 3 steps."""
    base = dict(lr=3e-3, warmup_ratio=0.1, epochs=3, micro_batch_size=4, grad_accum=2, grad_clip=1.0,
                eval_every=4, save_every=3, keep_last=2, seed=1234, log_every=0)
    base.update(over)
    return TrainConfig(**base)


def run_segment(kind: str, out_dir: str, env: dict[str, str] | None = None, stop_at_step: int | None = None,
                **over) -> int:
    """Build, ``fit(resume="auto")``; returns the final step. ``env`` sets fault-injection variables."""
    for key in ("CAPSTONE_FAULT_KILL", "CAPSTONE_FAULT_SLEEP"):
        os.environ.pop(key, None)
    os.environ.update(env or {})
    torch.set_num_threads(1)
    import threading

    from tqdm.auto import tqdm
    tqdm.set_lock(threading.RLock())   # no multiprocessing lock: a SIGKILLed child would leak it
    model, groups, state_filter = build(kind)
    data = make_data()
    trainer = Trainer(model, groups, data[:32], collate, config(kind, **over), out_dir,
                      eval_fn=make_eval(data[32:]), state_filter=state_filter)
    return trainer.fit(resume="auto", stop_at_step=stop_at_step).step


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["stage1", "stage2"])
    ap.add_argument("out_dir")
    ap.add_argument("--stop-at", type=int, default=None)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--fsize-limit", type=int, default=None, help="RLIMIT_FSIZE bytes (simulates a full disk)")
    args = ap.parse_args()
    if args.fsize_limit:
        import resource
        import signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a too-large write then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.fsize_limit, args.fsize_limit))
    step = run_segment(args.kind, args.out_dir, stop_at_step=args.stop_at, grad_accum=args.grad_accum)
    from capstone_lib.distributed import cleanup_distributed
    cleanup_distributed()
    print(f"FINAL_STEP {step}")
