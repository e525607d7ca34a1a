"""Stage 2: QLoRA-finetune the LM together with the projector on LLaVA-Instruct conversations.

Guards against the earlier write-ups: the answer is fed as input (teacher forcing), every
human turn is masked and every assistant turn supervised with the EOS after it, all turns
of a conversation are kept (truncated only at turn boundaries, with a count), the adapter
saved here is checked on load, and the export is one standard Llava checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .batching import collate_padded, length_grouped_batches
from .chat import IMAGE_TOKEN, TemplateError, encode_conversation
from .checkpoint import stage_checkpoint_dir
from .export import assistant_dir
from .lessons import SeedBugs, apply_seed_bugs
from .profiles import Profile
from .projector import load_projector, save_projector
from .stage1 import ensure_projector
from .validation import SkipCounter, raise_or_skip, sample_subset


def image_id_of(image: str | Path) -> int:
    """COCO-style image id from a file name (``000000123456.jpg`` -> 123456)."""
    return int(Path(image).stem.split("_")[-1])


@dataclass
class ConversationDataset:
    """LLaVA-Instruct records tokenized once with the course template (all turns kept)."""

    records: Sequence[Any]
    tokenizer: Any
    n_image_tokens: int
    max_len: int
    bugs: SeedBugs | None = None
    skips: SkipCounter | None = None      # count conversations the template cannot hold (else DataError)
    samples: list[dict] = field(default_factory=list, init=False)
    truncated: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        for i, rec in enumerate(self.records):
            try:
                enc = encode_conversation(self.tokenizer, rec.conversations, self.n_image_tokens,
                                          self.max_len, check=i < 64)
            except TemplateError as err:
                raise_or_skip(self.skips, "conversation the chat template cannot hold", rec.image,
                              f"id {rec.id!r}", str(err))
                continue
            self.truncated += enc.truncated
            ids, labels = apply_seed_bugs(enc.input_ids, enc.labels, self.bugs)
            self.samples.append({"input_ids": ids, "labels": labels, "image_id": image_id_of(rec.image),
                                 "id": rec.id})

    @property
    def lengths(self) -> list[int]:
        """Token length of each sample (for length-grouped batches)."""
        return [len(s["input_ids"]) for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


def stage2_dir(profile: Profile) -> Path:
    """``runs/<profile>/stage2/`` (adapter, projector, checkpoints)."""
    return profile.run_dir / "stage2"


def build_stage2_model(profile: Profile, projector: nn.Module | None = None):
    """4-bit LM + fresh LoRA + the stage-1 projector (trainable) -> ``VisionLanguageModel``."""
    from .mm_model import VisionLanguageModel
    from .language_model import ensure_language_model
    from .qlora import load_qlora_model
    from .tokenizer import load_tokenizer

    from .lm_spec import lm_spec

    lm_path = ensure_language_model(profile)
    tokenizer = load_tokenizer(lm_path, lm_spec(profile))
    if projector is None:
        projector, _ = load_projector(ensure_projector(profile))
    for p in projector.parameters():
        p.requires_grad_(True)
    lm = load_qlora_model(profile, lm_path, tokenizer)   # placed on the profile's device by device_map
    projector.to(profile.runtime.device)
    vlm = VisionLanguageModel(lm, projector, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    return vlm, tokenizer, lm_path


def make_qa_eval(vlm, tokenizer, val_data: ConversationDataset, cache, n: int = 64) -> Any:
    """An eval hook: held-out conversation loss plus a few answers printed next to references."""
    from .evaluate import generate_answer

    pad = tokenizer.pad_token_id
    subset = val_data.samples[:n]
    shown = [(r, s) for r, s in zip(val_data.records[:3], subset[:3])]

    @torch.no_grad()
    def eval_fn(model: nn.Module, step: int) -> dict[str, Any]:
        model.eval()
        losses = [model(**collate_padded(subset[i:i + 16], pad, cache.get_batch)).loss.item()
                  for i in range(0, len(subset), 16)]
        rows = []
        for rec, s in shown:
            q, ref = rec.conversations[0]["value"], rec.conversations[1]["value"]
            pred = generate_answer(vlm, tokenizer, cache.get_batch([s["image_id"]])[0], q)
            rows.append({"question": q.replace(IMAGE_TOKEN, "").strip(), "answer": ref, "prediction": pred})
            print(f"  [step {step}] Q: {rows[-1]['question']!r}  A: {pred!r}  ref: {ref!r}")
        model.train()
        return {"val_loss": float(sum(losses) / len(losses)), "samples": rows}

    return eval_fn


def conversation_data(profile: Profile, tokenizer, n_tokens: int, max_len: int,
                      bugs: SeedBugs | None = None) -> ConversationDataset:
    """The profile's training conversations (its subset), tokenized; skipped records reported."""
    from .llava_data import load_llava_instruct
    from .data_sources import dataset_paths

    paths = dataset_paths(profile)
    skips = SkipCounter() if profile.runtime.allow_skips else None
    records = load_llava_instruct(paths.llava_train, paths.train_images, skips=skips)
    records = sample_subset(records, profile.data.subset, profile.runtime.seed)
    data = ConversationDataset(records, tokenizer, n_tokens, max_len, bugs=bugs, skips=skips)
    if skips is not None and skips.count:
        print(skips.report())
    return data


def train_stage2(profile: Profile, resume: str | bool = "auto", bugs: SeedBugs | None = None,
                 out_dir: str | Path | None = None, projector: nn.Module | None = None,
                 **overrides: Any) -> dict[str, Any]:
    """Train LoRA + projector from the profile; save adapter and projector; return a summary."""
    from .feature_cache import ensure_feature_cache
    from .llava_data import load_llava_instruct
    from .plan import find_device, plan_training
    from .qlora import lora_parameters
    from .data_sources import dataset_paths
    from .trainer import TrainConfig, Trainer

    s2 = {**vars(profile.stage2), **overrides}
    find_device(profile)                  # a profile this machine cannot run stops here, before any loading
    paths = dataset_paths(profile)
    train_cache = ensure_feature_cache(profile, "train")
    val_cache = ensure_feature_cache(profile, "val")
    n_tokens = train_cache.feature_shape[0]
    vlm, tokenizer, lm_path = build_stage2_model(profile, projector)
    vlm.allow_image_labels = bool(bugs and bugs.any())   # only the seed-bug lesson
    data = conversation_data(profile, tokenizer, n_tokens, s2["max_len"], bugs=bugs)
    val = ConversationDataset(load_llava_instruct(paths.llava_val, paths.val_images)[:64], tokenizer,
                              n_tokens, s2["max_len"])
    if data.truncated:
        print(f"note: {data.truncated} of {len(data)} conversations truncated at a turn boundary "
              f"to fit max_len={s2['max_len']}")
    out = Path(out_dir) if out_dir else stage2_dir(profile)
    cfg = TrainConfig.from_stage(s2, profile.runtime)
    pad = tokenizer.pad_token_id
    lengths = data.lengths
    groups = [{"name": "lora", "params": lora_parameters(vlm.lm), "lr": s2["lr"]},
              {"name": "projector", "params": list(vlm.projector.parameters()), "lr": s2["projector_lr"]}]
    ckpt = stage_checkpoint_dir(profile, out.name, out)
    trainer = Trainer(
        vlm, groups, data, lambda samples: collate_padded(samples, pad, train_cache.get_batch), cfg, ckpt,
        eval_fn=make_qa_eval(vlm, tokenizer, val, val_cache),
        batches_for_epoch=lambda epoch: length_grouped_batches(lengths, s2["micro_batch_size"],
                                                               profile.runtime.seed, epoch),
        state_filter=lambda name: "lora_" in name or name.startswith("projector."),
    )
    plan = plan_training(profile, "stage2", len(data), sum(lengths) / len(lengths), vlm.lm.config,
                         cfg.micro_batch_size, cfg.micro_batch_size * cfg.grad_accum * trainer.world, s2["max_len"],
                         trainer.total_steps, trainable_params=sum(p.numel() for g in groups for p in g["params"]),
                         quantize_4bit=s2["quantize_4bit"], checkpointing=s2["gradient_checkpointing"])
    plan.check()                          # on every rank: all stop together when it does not fit
    if trainer.rank == 0:
        print(plan)
    result = trainer.fit(resume=resume)
    if trainer.rank == 0:                       # one writer when several ranks train
        # The adapter only: a grown embedding (<image>, zero) is rebuilt by every loader.
        vlm.lm.save_pretrained(out / "adapter", save_embedding_layers=False)
        _, meta = load_projector(ensure_projector(profile))
        save_projector(vlm.projector, {**meta, "stage": 2, "steps": result.step}, out / "projector")
    trainer._barrier()
    return {"model": vlm, "tokenizer": tokenizer, "history": result.history, "out_dir": out,
            "lm_path": lm_path, "samples": len(data), "truncated": data.truncated}


def export_assistant(profile: Profile) -> Path:
    """Export stage 2's adapter + projector in the format the LM spec names (``lm.export``).

    ``llava``: a standard transformers Llava checkpoint; ``course``: the course's own folder
    (an LM whose output head has a bias, e.g. Phi-2). The choice is made from the spec before
    any weights are loaded.
    """
    from .export import export_course, export_llava
    from .lm_spec import lm_spec
    from .language_model import ensure_language_model
    from .tokenizer import load_tokenizer
    from .vision import load_vision_tower

    spec = lm_spec(profile)
    s2 = stage2_dir(profile)
    lm_path = ensure_language_model(profile)
    tower, image_processor = load_vision_tower(profile, device="cpu")
    export = export_llava if spec.export == "llava" else export_course
    return export(assistant_dir(profile), tokenizer=load_tokenizer(lm_path, spec), image_processor=image_processor,
                  vision_tower=tower, base_lm=lm_path, adapter_dir=s2 / "adapter",
                  projector=s2 / "projector" / "projector.safetensors",
                  feature_layer=profile.vision.feature_layer, info={"lm": spec.name, "hub_id": spec.hub_id})


def exported_lm(path: Path) -> str | None:
    """The LM spec an export was made from (``None``: no finished export there, or an older one)."""
    from .export import COURSE_MANIFEST
    from .fileio import read_json_or_none

    for name in (COURSE_MANIFEST, "capstone_export.json"):
        info = read_json_or_none(path / name)
        if info is not None:
            return info.get("lm") if isinstance(info, dict) else None
    return None


def assistant_ready(path: Path) -> bool:
    """True when ``path`` holds a finished export of either format."""
    from .export import COURSE_MANIFEST
    return (path / "config.json").is_file() or (path / COURSE_MANIFEST).is_file()


def ensure_assistant(profile: Profile) -> Path:
    """The exported assistant of ``profile``; trains stage 2 and exports if missing (or made for another LM)."""
    from .lm_spec import lm_spec

    out = assistant_dir(profile)
    if assistant_ready(out):
        made_for = exported_lm(out)
        if made_for == lm_spec(profile).name:
            return out
        print(f"the assistant in {out} was made from {made_for or 'an unrecorded LM'}, not {lm_spec(profile).name}: "
              "exporting it again")
        return export_assistant(profile)
    if not (stage2_dir(profile) / "adapter" / "adapter_config.json").exists():
        steps = profile.stage2.max_steps or "one epoch of"
        print(f"no stage-2 adapter in {stage2_dir(profile)}: training stage 2 now (notebook 04's step, "
              f"{steps} steps; it resumes from its checkpoints if interrupted)")
        train_stage2(profile)
    return export_assistant(profile)


def load_trained_model(profile: Profile, device: str | None = None):
    """The finished in-library assistant: full-precision base LM + checked, merged adapter + projector.

    This is exactly what ``ensure_assistant`` exports. ``load_adapter_checked`` returns the
    loaded model (the earlier demo threw it away) and refuses an all-zero or mismatched adapter.
    It is placed on ``device`` (default: the profile's, so evaluation runs on the GPU there).
    """
    from .export import load_adapter_checked
    from .mm_model import VisionLanguageModel
    from .language_model import load_language_model
    from .distributed import resolve_device

    base, tokenizer = load_language_model(profile)
    lm = load_adapter_checked(base, stage2_dir(profile) / "adapter").merge_and_unload()
    projector, _ = load_projector(stage2_dir(profile) / "projector")
    vlm = VisionLanguageModel(lm, projector, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)).eval()
    return vlm.to(resolve_device(device or profile.runtime.device)), tokenizer
