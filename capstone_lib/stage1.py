"""Stage 1: train the projector CLIP -> LM on image captions, vision encoder and LM frozen.

The recipe (LLaVA-1.5 stage 1) and the guards against the earlier write-ups' bugs:
- every caption of every image is a sample (not the last of five, not cut to 12 tokens);
- only caption tokens and the EOS after them carry labels (image/prompt/padding are -100);
- vision features come from an on-disk cache, never from CLIP inside the training loop;
- AdamW, cosine schedule with warmup, real batches, gradient clipping (``capstone_lib.trainer``);
- the projector saved here is the very module used at inference (``mm_model``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .batching import collate_padded, shuffled_batches
from .checkpoint import stage_checkpoint_dir
from .chat import (CAPTION_PROMPT, IGNORE_INDEX, IMAGE_TOKEN, TemplateError, caption_conversation,
                   encode_conversation)
from .lessons import SeedBugs, apply_seed_bugs
from .profiles import Profile
from .fileio import read_json_or_none
from .projector import build_projector, save_projector
from .validation import SkipCounter, raise_or_skip, sample_subset

CAPTION_PROMPTS = (CAPTION_PROMPT, "What is in this picture?", "Give a short caption for the image.",
                   "What do you see?")


@dataclass
class CaptionDataset:
    """One sample per (image, caption) pair, tokenized once with the course chat template."""

    records: Sequence[Any]
    tokenizer: Any
    n_image_tokens: int
    max_len: int
    prompts: Sequence[str] = CAPTION_PROMPTS
    bugs: SeedBugs | None = None
    skips: SkipCounter | None = None      # count captions the template cannot hold (else DataError)
    samples: list[dict] = field(default_factory=list, init=False)
    truncated: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        for rec in self.records:
            for k, caption in enumerate(rec.captions):
                prompt = self.prompts[(rec.image_id + k) % len(self.prompts)]
                conv = caption_conversation(caption, prompt)
                try:
                    enc = encode_conversation(self.tokenizer, conv, self.n_image_tokens, max_len=10**9,
                                              check=len(self.samples) < 64)
                except TemplateError as err:
                    raise_or_skip(self.skips, "caption the chat template cannot hold", getattr(rec, "path", None),
                                  f"image {rec.image_id}, caption {k}", str(err))
                    continue
                ids, labels = enc.input_ids, enc.labels
                if len(ids) > self.max_len:
                    self.truncated += 1
                    ids, labels = ids[:self.max_len], labels[:self.max_len]
                    if all(lab == IGNORE_INDEX for lab in labels):
                        raise TemplateError(f"image {rec.image_id}: max_len={self.max_len} leaves no "
                                            f"caption token after {self.n_image_tokens} image tokens")
                ids, labels = apply_seed_bugs(ids, labels, self.bugs)
                self.samples.append({"input_ids": ids, "labels": labels, "image_id": rec.image_id,
                                     "caption": caption})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


# ------------------------------------------------------------------------------------------
# Model assembly and training.
# ------------------------------------------------------------------------------------------
def build_model(profile: Profile, lm=None, tokenizer=None, projector: nn.Module | None = None):
    """The frozen LM (notebook 01's on cpu, the LM spec's hub model on GPU) + a projector -> ``VisionLanguageModel``."""
    from .feature_cache import ensure_feature_cache
    from .lm_tuning import tune_language_model
    from .mm_model import VisionLanguageModel
    from .language_model import load_language_model
    from .precision import attention_implementation, storage_dtype

    if lm is None:
        # Frozen weights may live in the compute dtype (bf16/fp16 on GPU, fp32 on a CPU); the
        # projector stays fp32 and autocast runs the matmuls in the profile's precision.
        runtime = profile.runtime
        lm, tokenizer = load_language_model(
            profile, dtype=storage_dtype(runtime.precision, runtime.device),
            attn_implementation=attention_implementation(runtime.precision, runtime.device))
    for p in lm.parameters():
        p.requires_grad_(False)
    # Frozen LM: dropout off (Phi-2 ships resid_pdrop 0.1; LLaVA's stage-1 Vicuna has none), plus
    # the loader's fused tanh GELU and half-precision LayerNorms. The cpu course's GPT-NeoX (exact
    # GELU, no dropout, fp32) is left as it is.
    tune_language_model(lm, frozen=True)
    cache = ensure_feature_cache(profile, "train")
    n_tokens, vision_dim = cache.feature_shape
    if projector is None:
        torch.manual_seed(profile.runtime.seed)
        projector = build_projector(profile.stage1.projector, vision_dim, lm.config.hidden_size)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vlm = VisionLanguageModel(lm, projector, image_token_id)
    lm.to(profile.runtime.device)
    projector.to(profile.runtime.device)
    return vlm, tokenizer, n_tokens


def projector_dir(profile: Profile) -> Path:
    """``runs/<profile>/projector/``."""
    return profile.run_dir / "projector"


def make_caption_eval(vlm, tokenizer, val_records, cache, n: int, max_len: int,
                      n_image_tokens: int) -> Any:
    """An eval hook: validation loss on held-out captions plus a few generated captions."""
    from .evaluate import generate_answer

    val = CaptionDataset(val_records[:max(1, n)], tokenizer, n_image_tokens, max_len,
                         prompts=(CAPTION_PROMPT,))
    pad = tokenizer.pad_token_id

    @torch.no_grad()
    def eval_fn(model: nn.Module, step: int) -> dict[str, Any]:
        model.eval()
        losses = []
        for i in range(0, len(val), 32):
            batch = collate_padded(val.samples[i:i + 32], pad, cache.get_batch)
            losses.append(model(**batch).loss.item())
        shown = []
        for s in val.samples[:3]:
            text = generate_answer(vlm, tokenizer, cache.get_batch([s["image_id"]])[0],
                                   f"{IMAGE_TOKEN}\n{CAPTION_PROMPT}", max_new_tokens=40)
            shown.append({"generated": text, "reference": s["caption"]})
        model.train()
        for row in shown:
            print(f"  [step {step}] {row['generated']!r:60}  ref: {row['reference']!r}")
        return {"val_loss": float(sum(losses) / len(losses)), "samples": shown}

    return eval_fn


def train_stage1(profile: Profile, resume: str | bool = "auto", bugs: SeedBugs | None = None,
                 out_dir: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Train the projector from the profile; save it to ``runs/<p>/projector/``; return a summary."""
    from .coco import load_coco_captions
    from .feature_cache import ensure_feature_cache
    from .lm_spec import lm_spec
    from .plan import find_device, plan_training
    from .data_sources import dataset_paths
    from .trainer import TrainConfig, Trainer

    cfg1 = {**vars(profile.stage1), **overrides}
    find_device(profile)                  # a profile this machine cannot run stops here, before any loading
    paths = dataset_paths(profile)
    skips = SkipCounter() if profile.runtime.allow_skips else None
    train_records = load_coco_captions(paths.coco_root, "train", skips=skips)
    val_records = load_coco_captions(paths.coco_root, "val", skips=skips)
    train_records = sample_subset(train_records, profile.data.subset, profile.runtime.seed)
    vlm, tokenizer, n_tokens = build_model(profile)
    vlm.allow_image_labels = bool(bugs and bugs.any())   # only the seed-bug lesson
    train_cache = ensure_feature_cache(profile, "train")
    val_cache = ensure_feature_cache(profile, "val")
    data = CaptionDataset(train_records, tokenizer, n_tokens, cfg1["max_len"], bugs=bugs, skips=skips)
    if skips is not None and skips.count:
        print(skips.report())
    if data.truncated:
        print(f"note: {data.truncated} of {len(data)} captions truncated to max_len={cfg1['max_len']}")
    out = Path(out_dir) if out_dir else projector_dir(profile)
    cfg = TrainConfig.from_stage(cfg1, profile.runtime)
    pad = tokenizer.pad_token_id
    trainer = Trainer(
        vlm, [{"name": "projector", "params": list(vlm.projector.parameters()), "lr": cfg1["lr"]}], data,
        lambda samples: collate_padded(samples, pad, train_cache.get_batch), cfg,
        stage_checkpoint_dir(profile, out.name, out),
        eval_fn=make_caption_eval(vlm, tokenizer, val_records, val_cache, cfg1["n_eval_captions"],
                                  cfg1["max_len"], n_tokens),
        batches_for_epoch=lambda epoch: shuffled_batches(len(data), cfg1["micro_batch_size"],
                                                         profile.runtime.seed, epoch),
        state_filter=lambda name: name.startswith("projector."),
    )
    plan = plan_training(profile, "stage1", len(data), sum(len(x["input_ids"]) for x in data.samples) / len(data),
                         vlm.lm.config, cfg.micro_batch_size, cfg.micro_batch_size * cfg.grad_accum * trainer.world,
                         cfg1["max_len"], trainer.total_steps,
                         trainable_params=sum(p.numel() for p in vlm.projector.parameters()))
    plan.check()                          # on every rank: all stop together when it does not fit
    if trainer.rank == 0:
        print(plan)
    result = trainer.fit(resume=resume)
    meta = {"kind": cfg1["projector"], "lm": lm_spec(profile).name, "vision_dim": train_cache.feature_shape[1],
            "text_dim": vlm.lm.config.hidden_size, "n_image_tokens": n_tokens,
            "encoder_fingerprint": train_cache.fingerprint, "steps": result.step,
            "samples": len(data), "truncated": data.truncated}
    if trainer.rank == 0:                       # one writer when several ranks train
        save_projector(vlm.projector, meta, out)
    trainer._barrier()
    return {"model": vlm, "tokenizer": tokenizer, "history": result.history, "meta": meta,
            "out_dir": out}


def _read_meta(out: Path) -> dict[str, Any]:
    meta = read_json_or_none(out / "projector.json")
    return meta if isinstance(meta, dict) else {}


def ensure_projector(profile: Profile) -> Path:
    """The stage-1 projector dir; trains it through the library if it is missing."""
    from transformers import AutoConfig

    from .lm_spec import lm_spec
    from .language_model import ensure_language_model

    out = projector_dir(profile)
    meta, spec = _read_meta(out), lm_spec(profile)
    if meta:                              # made for this LM? (a runs/ folder kept on Drive may be older)
        width = AutoConfig.from_pretrained(str(ensure_language_model(profile))).get_text_config().hidden_size
        if meta.get("lm", spec.name) != spec.name or meta.get("text_dim") != width:
            print(f"the projector in {out} was trained for another LM ({meta.get('lm', 'unnamed')}, width "
                  f"{meta.get('text_dim')}), not {spec.name} (width {width}): training stage 1 again")
            train_stage1(profile, resume=False)
            return out
    if not (out / "projector.json").exists():
        steps = profile.stage1.max_steps or "one epoch of"
        print(f"no projector from notebook 03 in {out}: training stage 1 now ({steps} steps; it resumes "
              "from its checkpoints if interrupted)")
        train_stage1(profile)
    return out
