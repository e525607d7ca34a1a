"""Export the finished assistant as a standard transformers Llava checkpoint (safetensors).

After export, anyone can use the model with no code from this course::

    model = AutoModelForImageTextToText.from_pretrained("runs/cpu/assistant")
    processor = AutoProcessor.from_pretrained("runs/cpu/assistant")
    pipe = pipeline("image-text-to-text", model="runs/cpu/assistant")

What goes in: the language model with its LoRA adapter merged into a *full-precision* copy
of the base (never the 4-bit weights), the ``mlp2x_gelu`` projector as Llava's
``multi_modal_projector``, the CLIP vision tower, and a ``LlavaProcessor`` (image processor,
tokenizer, and the course's chat template with the ``<image>`` token).

``load_adapter_checked`` is the guard against an earlier attempt's bug (the result of
``PeftModel.from_pretrained`` was discarded, so the demo ran an untrained adapter): it
returns the adapted model and refuses adapters that are all zero, that do not fit the base
model, or that do not change its output.
"""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .chat import IMAGE_TOKEN, format_of
from .mm_model import VisionLanguageModel
from .projector import build_projector, projector_kind

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class ExportError(ValueError):
    """The model cannot be written as a standard Llava checkpoint, or an adapter is unusable."""


# ----------------------------------------------------------------------------- adapters
def _is_peft(model: nn.Module) -> bool:
    from peft import PeftModel
    return isinstance(model, PeftModel)


def _is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
                or getattr(getattr(model, "config", None), "quantization_config", None))


def _probe_logits(model: nn.Module) -> torch.Tensor:
    """Logits of a fixed 16-token probe (used to see whether an adapter changes the model)."""
    emb = model.get_input_embeddings()
    ids = (torch.arange(16) * 7 % emb.num_embeddings).unsqueeze(0).to(emb.weight.device)
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _check_adapter_files(base_model: nn.Module, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Read the adapter weights and check them against ``base_model`` before loading anything."""
    from safetensors.torch import load_file

    weights_file = adapter_dir / ADAPTER_WEIGHTS
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise ExportError(f"{adapter_dir}: no {ADAPTER_CONFIG} (not a peft save_pretrained directory)")
    if not weights_file.is_file():
        raise ExportError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} (adapters are read from safetensors only)")
    weights = load_file(str(weights_file))
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k or "lora_embedding_B" in k}
    if not lora_b:
        raise ExportError(f"{weights_file}: no LoRA B weights in the file ({len(weights)} tensors)")
    if all(bool((v == 0).all()) for v in lora_b.values()):
        raise ExportError(f"{weights_file}: all {len(lora_b)} LoRA B matrices are zero, so the adapter "
                          "does nothing (an untrained adapter, e.g. saved before any training step)")

    # Each lora_A/lora_B pair must sit on a Linear of the base with matching shapes.
    modules = dict(base_model.named_modules())
    for key, a in weights.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key[:-len(".lora_A.weight")].removeprefix("base_model.model.")
        target = modules.get(path)
        if target is None:
            raise ExportError(f"{weights_file}: adapter targets module {path!r}, which the base model "
                              f"{type(base_model).__name__} does not have (adapter trained on another model?)")
        b = weights.get(key.replace(".lora_A.", ".lora_B."))
        in_f = getattr(target, "in_features", None)
        out_f = getattr(target, "out_features", None)
        if in_f != a.shape[1] or (b is not None and out_f != b.shape[0]):
            raise ExportError(f"{weights_file}: {path} is {in_f}->{out_f} in the base model but the adapter "
                              f"expects {a.shape[1]}->{b.shape[0] if b is not None else '?'} "
                              "(adapter trained on a different base model)")
    return weights


def load_adapter_checked(base_model: nn.Module, adapter_dir: str | Path, is_trainable: bool = False):
    """Load a peft LoRA adapter onto ``base_model`` and RETURN the ``PeftModel``, after checking it.

    Raises ``ExportError`` when the LoRA B weights are all zero, when target modules or shapes
    do not match the base model, when a saved tensor did not load, or when the adapter does
    not change the model's output. Note that peft modifies ``base_model`` in place.
    """
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    adapter_dir = Path(adapter_dir)
    if _is_peft(base_model):
        raise ExportError("base_model already carries an adapter; pass the plain base model")
    weights = _check_adapter_files(base_model, adapter_dir)
    was_training = base_model.training
    base_model.eval()
    before = _probe_logits(base_model)

    model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=is_trainable)

    # Every tensor in the file must now be in the model, with the same values.
    loaded = get_peft_model_state_dict(model, save_embedding_layers=False)
    for key, saved in weights.items():
        if key not in loaded:
            raise ExportError(f"{adapter_dir / ADAPTER_WEIGHTS}: tensor {key} was not loaded into the model")
        if not torch.equal(loaded[key].detach().cpu().to(saved.dtype), saved):
            raise ExportError(f"{adapter_dir / ADAPTER_WEIGHTS}: tensor {key} differs after loading")
    model.eval()
    after = _probe_logits(model)
    if torch.equal(before, after):
        raise ExportError(f"{adapter_dir}: the loaded adapter does not change the model's output")
    model.train(was_training and is_trainable)
    return model


def merged_language_model(lm: nn.Module, base_lm: str | Path | nn.Module | None = None) -> nn.Module:
    """A plain full-precision causal LM: ``lm`` itself, or its LoRA merged into a float32 base.

    For a LoRA over a 4-bit base, ``base_lm`` (the full-precision base: a directory, a hub
    name, or a loaded model) is required: merging into 4-bit weights would lose precision.
    """
    if not _is_peft(lm):
        if _is_quantized(lm):
            raise ExportError("the language model is quantized; export needs full-precision weights")
        return lm
    if base_lm is None:
        if _is_quantized(lm.get_base_model()):
            raise ExportError("the LoRA sits on a quantized (4-bit) base; pass base_lm= the full-precision "
                              "base model directory so the adapter is merged into float32 weights")
        return copy.deepcopy(lm).merge_and_unload()
    base = _load_causal_lm(base_lm)
    rows = lm.get_input_embeddings().num_embeddings
    if base.get_input_embeddings().num_embeddings != rows:    # training grew it for <image>
        from .language_model import grow_embeddings
        grow_embeddings(base, rows)
    with tempfile.TemporaryDirectory() as tmp:
        # adapter only: adapter_config.json + safetensors (a grown <image> row is rebuilt, zero, on load)
        lm.save_pretrained(tmp, save_embedding_layers=False)
        return load_adapter_checked(base, tmp).merge_and_unload()


def _load_causal_lm(source: str | Path | nn.Module, tokenizer=None) -> nn.Module:
    """A float32 causal LM from a directory / hub name, or a float32 copy of a loaded one.

    With ``tokenizer``, a loaded base grows its embeddings to hold ``<image>`` as training did.
    """
    from transformers import AutoModelForCausalLM

    if isinstance(source, nn.Module):
        if _is_quantized(source):
            raise ExportError("base_lm must be a full-precision model, not a quantized one")
        return copy.deepcopy(source).float()
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    if tokenizer is not None:
        from .language_model import fit_embeddings
        fit_embeddings(model, tokenizer)
    return model


# ----------------------------------------------------------------------------- Llava
def _image_side(image_processor) -> int:
    """Side in pixels of the images the processor produces (run on a blank image)."""
    from PIL import Image

    pixels = image_processor(Image.new("RGB", (37, 53)), return_tensors="pt")["pixel_values"]
    if pixels.shape[-1] != pixels.shape[-2]:
        raise ExportError(f"the image processor makes non-square images {tuple(pixels.shape[-2:])}")
    return int(pixels.shape[-1])


def _check_parts(vlm: VisionLanguageModel, lm: nn.Module, tower: nn.Module, tokenizer, image_processor) -> int:
    """Check that the parts fit a standard Llava checkpoint; return the number of image patches."""
    kind = projector_kind(vlm.projector)
    if kind != "mlp2x_gelu":
        raise ExportError(f"projector {kind!r} cannot be exported: a standard Llava checkpoint has only the "
                          "mlp2x_gelu projector (Linear -> GELU -> Linear); train with projector='mlp2x_gelu'")
    head = lm.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ExportError(f"{type(lm).__name__}'s output head has a bias, which Llava's lm_head (bias=False) "
                          "cannot hold; the export would change the model's answers")
    side = _image_side(image_processor)
    vc = tower.config
    if side != vc.image_size:
        raise ExportError(f"the image processor makes {side}px images but the vision tower expects {vc.image_size}px")
    ids = tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)
    if ids != [vlm.image_token_id]:
        raise ExportError(f"the tokenizer encodes {IMAGE_TOKEN!r} as {ids}, expected the single token "
                          f"{vlm.image_token_id} (add it as a special token)")
    n_rows = lm.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_rows:
        raise ExportError(f"the tokenizer has {len(tokenizer)} tokens but the embedding only {n_rows} rows")
    return (vc.image_size // vc.patch_size) ** 2


def to_llava(vlm: VisionLanguageModel, vision_tower: nn.Module | None, tokenizer, image_processor,
             base_lm: str | Path | nn.Module | None = None):
    """Build an equivalent ``(LlavaForConditionalGeneration, LlavaProcessor)`` from the course model.

    ``vision_tower`` defaults to ``vlm.vision_tower``; ``base_lm`` is needed only for a LoRA
    over a 4-bit base (see ``merged_language_model``).
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tower = vision_tower if vision_tower is not None else vlm.vision_tower
    if tower is None:
        raise ExportError("a vision tower is needed: the Llava checkpoint contains it")
    lm = merged_language_model(vlm.lm, base_lm)
    n_patches = _check_parts(vlm, lm, tower, tokenizer, image_processor)

    # 1. The config: the two sub-configs as they are, plus how images enter the prompt.
    config = LlavaConfig(
        vision_config=copy.deepcopy(tower.config).to_dict(),
        text_config=copy.deepcopy(lm.config).to_dict(),
        image_token_id=vlm.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=vlm.feature_layer,
        vision_feature_select_strategy="default",       # drop CLS, as VisionLanguageModel does
        image_seq_length=n_patches,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
    )
    llava = LlavaForConditionalGeneration(config).to(torch.float32).eval()

    # 2. The weights, copied by name; strict=True proves that every tensor found its place.
    state = {}
    state.update({f"model.language_model.{k}": v for k, v in lm.base_model.state_dict().items()})
    state["lm_head.weight"] = lm.get_output_embeddings().weight
    state.update({f"model.vision_tower.{k}": v for k, v in tower.state_dict().items()})
    state.update({f"model.multi_modal_projector.{k}": v for k, v in vlm.projector.state_dict().items()})
    state = {k: v.detach().to("cpu", torch.float32) for k, v in state.items()}
    llava.load_state_dict(state, strict=True)

    # 3. Generation stops at EOS and pads with the tokenizer's pad token.
    gen = llava.generation_config
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    gen.do_sample = False

    # 4. The processor: expands <image> to n_patches placeholders, renders the chat template.
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=tower.config.patch_size, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=_chat_template(tokenizer),
                               image_token=IMAGE_TOKEN)
    return llava, processor


# ----------------------------------------------------------------------------- on disk
def assistant_dir(profile) -> Path:
    """Where a profile's finished assistant is exported: ``runs/<profile>/assistant/``."""
    return Path(profile.run_dir) / "assistant"


def _load_projector(projector: nn.Module | dict | str | Path, vision_dim: int, text_dim: int) -> nn.Module:
    """An ``mlp2x_gelu`` projector from a module, a state dict or a ``.safetensors`` file."""
    if isinstance(projector, nn.Module):
        return projector
    if isinstance(projector, (str, Path)):
        from safetensors.torch import load_file
        projector = load_file(str(projector))
    state = dict(projector)
    if state and all(k.startswith("projector.") for k in state):     # a checkpoint's "projector.*" keys
        state = {k.removeprefix("projector."): v for k, v in state.items()}
    module = build_projector("mlp2x_gelu", vision_dim, text_dim)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ExportError(f"the projector weights do not fit an mlp2x_gelu projector "
                          f"({vision_dim}->{text_dim}): {err}") from err
    return module


def _model_card(out_dir: Path, n_patches: int) -> None:
    """A short README saying how to load the checkpoint."""
    (out_dir / "README.md").write_text(
        "# Course assistant (Llava format)\n\n"
        f"A CLIP vision tower, an mlp2x_gelu projector ({n_patches} image tokens) and a causal LM, "
        "saved as a standard transformers Llava checkpoint.\n\n```python\n"
        "from transformers import pipeline\n"
        f"pipe = pipeline('image-text-to-text', model='{out_dir.name}')\n"
        "messages = [{'role': 'user', 'content': [{'type': 'image', 'image': 'photo.png'},\n"
        "                                         {'type': 'text', 'text': 'What colour is the circle?'}]}]\n"
        "print(pipe(text=messages, max_new_tokens=32, return_full_text=False))\n```\n")


def _verify_reload(out_dir: Path, reference: torch.Tensor, probe: dict[str, torch.Tensor]) -> None:
    """Reload the written checkpoint with the Auto classes and compare logits on the probe."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(out_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(**probe).logits
    if not torch.allclose(logits, reference, atol=1e-4, rtol=1e-4):
        raise ExportError(f"{out_dir}: the reloaded checkpoint answers differently from the exported model "
                          f"(max logit difference {(logits - reference).abs().max():.3g})")


def _assemble(tokenizer, image_processor, vision_tower, vlm, base_lm, adapter_dir, projector, feature_layer):
    """Load the parts given as paths and, without ``vlm``, build it from base + adapter + projector."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPVisionModel

    if isinstance(tokenizer, (str, Path)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    if isinstance(image_processor, (str, Path)):
        image_processor = AutoImageProcessor.from_pretrained(str(image_processor))
    if isinstance(vision_tower, (str, Path)):
        vision_tower = CLIPVisionModel.from_pretrained(str(vision_tower), dtype=torch.float32)
    vision_tower = vision_tower.eval()
    if vlm is None:
        if base_lm is None or projector is None:
            raise ExportError("export needs vlm=..., or base_lm=... and projector=... (and adapter_dir)")
        lm = _load_causal_lm(base_lm, tokenizer)
        if adapter_dir is not None:
            lm = load_adapter_checked(lm, adapter_dir).merge_and_unload()
        proj = _load_projector(projector, vision_tower.config.hidden_size, lm.config.hidden_size)
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        vlm = VisionLanguageModel(lm, proj, image_id, vision_tower, feature_layer=feature_layer)
        base_lm = None                       # already merged
    return tokenizer, image_processor, vision_tower, vlm, base_lm


def _chat_template(tokenizer) -> str:
    """The Jinja template of the tokenizer's course chat format (``instruct`` when it has none)."""
    return format_of(tokenizer).jinja()


def export_llava(out_dir: str | Path, *, tokenizer, image_processor, vision_tower: nn.Module | str | Path,
                 vlm: VisionLanguageModel | None = None, base_lm: str | Path | nn.Module | None = None,
                 adapter_dir: str | Path | None = None, projector: Any = None,
                 feature_layer: int = -2, verify: bool = True, info: dict[str, Any] | None = None) -> Path:
    """Write a standard Llava checkpoint (safetensors + processor) to ``out_dir``; return the path.

    Either pass ``vlm`` (the in-memory model; ``base_lm`` only for a LoRA over 4-bit), or the
    parts as stage 2 leaves them: ``base_lm`` (full-precision base LM dir), ``adapter_dir``
    (peft ``save_pretrained`` dir, optional), ``projector`` (module, state dict or
    ``.safetensors`` path), ``vision_tower`` (model or dir), ``tokenizer`` and
    ``image_processor`` (objects or dirs). The directory is written to ``<out_dir>.tmp``
    and renamed when complete; with ``verify`` it is reloaded and its logits compared. ``info``
    is added to ``capstone_export.json`` (e.g. which LM spec it was made from).
    """
    out_dir = Path(out_dir)
    tokenizer, image_processor, vision_tower, vlm, base_lm = _assemble(
        tokenizer, image_processor, vision_tower, vlm, base_lm, adapter_dir, projector, feature_layer)
    llava, processor = to_llava(vlm, vision_tower, tokenizer, image_processor, base_lm=base_lm)

    tmp = _fresh_tmp(out_dir)
    llava.save_pretrained(str(tmp), safe_serialization=True)
    processor.save_pretrained(str(tmp))
    n_patches = llava.config.image_seq_length
    _model_card(tmp, n_patches)
    (tmp / "capstone_export.json").write_text(json.dumps(
        {"projector": "mlp2x_gelu", "image_token": IMAGE_TOKEN, "image_token_id": vlm.image_token_id,
         "n_image_tokens": n_patches, "vision_feature_layer": vlm.feature_layer,
         "chat_format": format_of(tokenizer).name, **(info or {})}, indent=2))
    if verify:
        probe = _probe_inputs(llava.config.text_config.vocab_size, vision_tower, n_patches, vlm.image_token_id)
        with torch.no_grad():
            reference = llava(**probe).logits
        del llava
        _verify_reload(tmp, reference, probe)
    return _move_into_place(tmp, out_dir)


EXPORT_MANIFEST = "capstone_manifest.json"


def write_export_manifest(folder: Path) -> Path:
    """List every file of an export with its size and sha256 (written last, as checkpoints do)."""
    from .real_data import file_digest

    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": file_digest(p, "sha256")}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != EXPORT_MANIFEST}
    out = folder / EXPORT_MANIFEST
    out.write_text(json.dumps({"format": 1, "files": files}, indent=1))
    return out


def verify_export(folder: str | Path) -> bool:
    """Check an export against its manifest (presence, size, sha256); False when it has none.

    ``ExportError`` names the file that is missing, changed or outside the folder: flipped bytes
    in the weights would otherwise load silently and change every answer.
    """
    from .real_data import file_digest
    from .validation import load_json

    folder = Path(folder)
    path = folder / EXPORT_MANIFEST
    if not path.is_file():
        return False
    manifest = load_json(path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise ExportError(f"{path}: not an export manifest (needs a 'files' object)")
    root = folder.resolve()
    for name, info in files.items():
        target = (folder / name).resolve()
        if root not in target.parents:
            raise ExportError(f"{path}: lists {name!r}, which is outside the export folder")
        if not isinstance(info, dict) or not isinstance(info.get("size"), int) or not isinstance(info.get("sha256"), str):
            raise ExportError(f"{path}: the entry of {name!r} needs an integer 'size' and a 'sha256'")
        if not target.is_file():
            raise ExportError(f"{target}: missing from the export (listed in {EXPORT_MANIFEST})")
        if target.stat().st_size != info["size"]:
            raise ExportError(f"{target}: {target.stat().st_size} bytes, the manifest says {info['size']} (truncated?)")
        if file_digest(target, "sha256") != info["sha256"]:
            raise ExportError(f"{target}: sha256 does not match {EXPORT_MANIFEST} (the file was changed or is "
                              "corrupt); export the assistant again")
    return True


def _fresh_tmp(out_dir: Path) -> Path:
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _move_into_place(tmp: Path, out_dir: Path) -> Path:
    write_export_manifest(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


# ----------------------------------------------------------------------------- course format
COURSE_MANIFEST = "capstone_assistant.json"


def export_course(out_dir: str | Path, *, tokenizer, image_processor, vision_tower: nn.Module | str | Path,
                  vlm: VisionLanguageModel | None = None, base_lm: str | Path | nn.Module | None = None,
                  adapter_dir: str | Path | None = None, projector: Any = None,
                  feature_layer: int = -2, verify: bool = True, info: dict[str, Any] | None = None) -> Path:
    """Save the assistant in the course's own safetensors folder (for an LM Llava cannot hold).

    Phi-2's output head has a bias and Llava's ``lm_head`` has none, so no standard Llava
    checkpoint answers like the trained model. This folder holds the same parts, each in its
    standard transformers form: ``language_model/`` (the LoRA merged into a full-precision
    base, with its tokenizer and chat template), ``vision_tower/`` (CLIP vision model and image
    processor), ``projector.safetensors`` and ``capstone_assistant.json``. ``Assistant`` and the
    app load it with :func:`load_course_export`. Same arguments as :func:`export_llava`.
    """
    out_dir = Path(out_dir)
    tokenizer, image_processor, vision_tower, vlm, base_lm = _assemble(
        tokenizer, image_processor, vision_tower, vlm, base_lm, adapter_dir, projector, feature_layer)
    kind = projector_kind(vlm.projector)
    lm = merged_language_model(vlm.lm, base_lm)
    tmp = _fresh_tmp(out_dir)
    lm.save_pretrained(str(tmp / "language_model"), safe_serialization=True)
    tokenizer.chat_template = _chat_template(tokenizer)
    tokenizer.save_pretrained(str(tmp / "language_model"))
    vision_tower.save_pretrained(str(tmp / "vision_tower"), safe_serialization=True)
    image_processor.save_pretrained(str(tmp / "vision_tower"))
    from safetensors.torch import save_file
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in vlm.projector.state_dict().items()},
              str(tmp / "projector.safetensors"))
    n_patches = (vision_tower.config.image_size // vision_tower.config.patch_size) ** 2
    (tmp / COURSE_MANIFEST).write_text(json.dumps(
        {"format": "capstone-course-assistant", "projector": kind,
         "vision_dim": vision_tower.config.hidden_size, "text_dim": lm.config.hidden_size,
         "image_token": IMAGE_TOKEN, "image_token_id": vlm.image_token_id, "n_image_tokens": n_patches,
         "vision_feature_layer": vlm.feature_layer, "chat_format": format_of(tokenizer).name,
         "why": f"{type(lm).__name__}'s output head has a bias, which a standard Llava checkpoint "
                "cannot hold", **(info or {})}, indent=2))
    if verify:
        probe = _probe_inputs(lm.config.vocab_size, vision_tower, n_patches, vlm.image_token_id)
        reference_vlm = VisionLanguageModel(lm, vlm.projector, vlm.image_token_id, vision_tower,
                                            feature_layer=vlm.feature_layer).eval()
        with torch.no_grad():
            reference = reference_vlm(**probe).logits.float()
        # Free the merged model before reloading: two float32 copies of a 2.7B LM would not fit
        # a Colab runtime's memory.
        del reference_vlm, lm, vlm
        import gc
        gc.collect()
        with torch.no_grad():
            reloaded, _, _ = load_course_export(tmp)
            logits = reloaded(**probe).logits.float()
        if not torch.allclose(logits, reference, atol=1e-4, rtol=1e-4):
            raise ExportError(f"{out_dir}: the reloaded assistant answers differently from the exported model "
                              f"(max logit difference {(logits - reference).abs().max():.3g})")
    return _move_into_place(tmp, out_dir)


def load_course_export(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """``(VisionLanguageModel, tokenizer, image_processor)`` from an :func:`export_course` folder."""
    from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

    from .validation import load_json
    path = Path(path)
    meta = load_json(path / COURSE_MANIFEST)
    lm = AutoModelForCausalLM.from_pretrained(str(path / "language_model"), dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path / "language_model"), local_files_only=True)
    tower = CLIPVisionModel.from_pretrained(str(path / "vision_tower"), dtype=dtype, local_files_only=True)
    image_processor = AutoImageProcessor.from_pretrained(str(path / "vision_tower"), local_files_only=True)
    proj = _load_projector(path / "projector.safetensors", int(meta["vision_dim"]), int(meta["text_dim"]))
    vlm = VisionLanguageModel(lm, proj, int(meta["image_token_id"]), tower,
                              feature_layer=int(meta["vision_feature_layer"]))
    return vlm.to(device).eval(), tokenizer, image_processor


def _probe_inputs(vocab: int, tower: nn.Module, n_patches: int, image_id: int) -> dict[str, torch.Tensor]:
    """A fixed prompt (some text, the image placeholders, more text) and a random image."""
    text = [t % vocab for t in range(3, 11) if t % vocab != image_id]
    ids = torch.tensor([text[:4] + [image_id] * n_patches + text[4:]])
    side = tower.config.image_size
    pixels = torch.randn(1, tower.config.num_channels, side, side, generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
