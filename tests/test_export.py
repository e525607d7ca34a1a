"""Export to a standard Llava checkpoint: same answers offline, LoRA merged, adapters guarded."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY_N_PATCHES, make_tiny_lm, make_tiny_vision

from capstone_lib.chat import IMAGE_TOKEN, encode_prompt, format_of, render_prompt
from capstone_lib.export import ExportError, export_llava, load_adapter_checked, to_llava
from capstone_lib.mm_model import VisionLanguageModel
from capstone_lib.projector import build_projector

TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
QUESTION = "What colour is the circle?"


def _vlm(tokenizer, lm=None, kind="mlp2x_gelu", seed=1):
    lm = lm if lm is not None else make_tiny_lm(tokenizer)
    tower, processor = make_tiny_vision()
    torch.manual_seed(seed)
    proj = build_projector(kind, tower.config.hidden_size, lm.config.hidden_size)
    return VisionLanguageModel(lm, proj, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tower).eval(), processor


def _lora(lm, seed=2, r=4):
    """A peft LoRA on ``lm`` with random (non-zero) B matrices, as if trained."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(lm, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def _greedy(vlm, ids, pixels, eos_id, max_new_tokens=8):
    """The library's answer: one prefill, then one token at a time through the KV cache."""
    tokens = []
    with torch.no_grad():
        out = vlm(ids, pixel_values=pixels, use_cache=True)
        for _ in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(nxt))
            if tokens[-1] == eos_id:
                break
            out = vlm(inputs_embeds=vlm.embed(nxt), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def _messages(image, question=QUESTION):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def exported(tiny_tokenizer, tmp_path_factory):
    """The plain (no LoRA) model exported once for the round-trip tests."""
    vlm, processor = _vlm(tiny_tokenizer)
    out = export_llava(tmp_path_factory.mktemp("export") / "assistant", tokenizer=tiny_tokenizer,
                       image_processor=processor, vision_tower=vlm.vision_tower, vlm=vlm)
    return vlm, processor, out


def test_export_round_trip_same_greedy_tokens(exported, tiny_tokenizer, tiny_images):
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    vlm, image_processor, out = exported
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"

    pipe = pipeline("image-text-to-text", model=str(out))
    eos = tiny_tokenizer.eos_token_id
    for image in tiny_images:
        ids = torch.tensor([encode_prompt(tiny_tokenizer, [], f"{IMAGE_TOKEN}\n{QUESTION}", TINY_N_PATCHES)])
        pixels = image_processor(image, return_tensors="pt")["pixel_values"]
        ours = _greedy(vlm, ids, pixels, eos)
        assert len(ours) >= 4, "the random model stopped at once: the comparison would be too weak"

        # the exported model, fed by its own processor from the same prompt text
        prompt = render_prompt([], f"{IMAGE_TOKEN}\n{QUESTION}", format_of(tiny_tokenizer))
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        assert inputs["input_ids"].tolist() == ids.tolist()
        torch.testing.assert_close(inputs["pixel_values"], pixels)
        gen = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert gen[0, ids.shape[1]:].tolist() == ours

        # and through the pipeline
        res = pipe(images=image, text=prompt, max_new_tokens=8, return_tensors=True)
        assert list(res[0]["generated_token_ids"][ids.shape[1]:]) == ours
        res = pipe(images=image, text=prompt, max_new_tokens=8, return_full_text=False)
        assert res[0]["generated_text"] == tiny_tokenizer.decode(ours, skip_special_tokens=True)


@pytest.mark.parametrize("question", [QUESTION, "  Where is the red square?  "])
def test_chat_template_gives_the_training_prompt_ids(exported, tiny_tokenizer, tiny_images, question):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(exported[2])
    enc = processor.apply_chat_template(_messages(tiny_images[0], question), add_generation_prompt=True,
                                        tokenize=True, return_dict=True)
    expected = encode_prompt(tiny_tokenizer, [], f"{IMAGE_TOKEN}\n{question}", TINY_N_PATCHES)
    assert list(enc["input_ids"][0]) == expected, processor.apply_chat_template(
        _messages(tiny_images[0], question), add_generation_prompt=True, tokenize=False)


def test_chat_template_multi_turn(exported, tiny_tokenizer, tiny_images):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(exported[2])
    history = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{QUESTION}"}, {"from": "gpt", "value": "red"}]
    messages = _messages(tiny_images[0]) + [
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "Where is it?"}]}]
    enc = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert list(enc["input_ids"][0]) == encode_prompt(tiny_tokenizer, history, "Where is it?", TINY_N_PATCHES)


def test_pipeline_with_chat_messages_answers_like_the_library(exported, tiny_tokenizer, tiny_images):
    from transformers import pipeline

    vlm, image_processor, out = exported
    ids = torch.tensor([encode_prompt(tiny_tokenizer, [], f"{IMAGE_TOKEN}\n{QUESTION}", TINY_N_PATCHES)])
    pixels = image_processor(tiny_images[1], return_tensors="pt")["pixel_values"]
    ours = _greedy(vlm, ids, pixels, tiny_tokenizer.eos_token_id)
    pipe = pipeline("image-text-to-text", model=str(out))
    res = pipe(text=_messages(tiny_images[1]), max_new_tokens=8, return_full_text=False)
    assert res[0]["generated_text"] == tiny_tokenizer.decode(ours, skip_special_tokens=True)


@pytest.mark.parametrize("kind", ["linear", "resblock"])
def test_non_llava_projector_is_refused(tiny_tokenizer, kind, tmp_path):
    vlm, processor = _vlm(tiny_tokenizer, kind=kind)
    with pytest.raises(ExportError, match=rf"projector '{kind}'.*mlp2x_gelu"):
        to_llava(vlm, None, tiny_tokenizer, processor)
    with pytest.raises(ExportError, match="mlp2x_gelu"):
        export_llava(tmp_path / "a", tokenizer=tiny_tokenizer, image_processor=processor,
                     vision_tower=vlm.vision_tower, vlm=vlm)
    assert not (tmp_path / "a").exists()


def test_output_head_bias_is_refused(tiny_tokenizer):
    """Llava's lm_head has no bias (Phi-2's has one): exporting it would change the answers."""
    from transformers import PhiConfig, PhiForCausalLM

    phi = PhiForCausalLM(PhiConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2)).eval()
    vlm, processor = _vlm(tiny_tokenizer, lm=phi)
    with pytest.raises(ExportError, match="bias"):
        to_llava(vlm, None, tiny_tokenizer, processor)


def _padded_batch(tokenizer, images, processor):
    prompts = [encode_prompt(tokenizer, [], f"{IMAGE_TOKEN}\n{q}", TINY_N_PATCHES)
               for q in (QUESTION, "Where is the blue square in the top left?")]
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask, processor(images, return_tensors="pt")["pixel_values"]


def test_lora_merge_export_equals_lora_model(tiny_tokenizer, tiny_images, tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText

    base = make_tiny_lm(tiny_tokenizer)
    base.save_pretrained(tmp_path / "base")
    vlm, processor = _vlm(tiny_tokenizer, lm=_lora(make_tiny_lm(tiny_tokenizer)))
    vlm.lm.save_pretrained(tmp_path / "adapter")
    save_file({f"projector.{k}": v for k, v in vlm.projector.state_dict().items()},
              str(tmp_path / "projector.safetensors"))
    vlm.vision_tower.save_pretrained(tmp_path / "tower")

    ids, mask, pixels = _padded_batch(tiny_tokenizer, tiny_images, processor)
    keep = mask.bool()
    with torch.no_grad():
        reference = vlm(ids, attention_mask=mask, pixel_values=pixels).logits
        with vlm.lm.disable_adapter():
            without_lora = vlm(ids, attention_mask=mask, pixel_values=pixels).logits
    assert not torch.allclose(reference[keep], without_lora[keep], atol=1e-3)   # the LoRA matters

    # stage 2's call: everything from disk
    out = export_llava(tmp_path / "assistant", tokenizer=tiny_tokenizer, image_processor=processor,
                       vision_tower=tmp_path / "tower", base_lm=tmp_path / "base",
                       adapter_dir=tmp_path / "adapter", projector=tmp_path / "projector.safetensors")
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    torch.testing.assert_close(logits[keep], reference[keep], rtol=1e-4, atol=1e-4)

    # the in-memory path merges a copy and leaves the training model untouched
    llava, _ = to_llava(vlm, None, tiny_tokenizer, processor)
    with torch.no_grad():
        logits = llava(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    torch.testing.assert_close(logits[keep], reference[keep], rtol=1e-4, atol=1e-4)
    assert any("lora_B" in n for n, _ in vlm.lm.named_parameters())


def test_lora_over_4bit_base_merges_into_full_precision(tiny_tokenizer, tiny_images, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    make_tiny_lm(tiny_tokenizer, hidden_size=64).save_pretrained(tmp_path / "base")   # bnb CPU needs >= 64
    quant = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True))
    vlm, processor = _vlm(tiny_tokenizer, lm=_lora(quant))
    with pytest.raises(ExportError, match="base_lm"):
        to_llava(vlm, None, tiny_tokenizer, processor)

    llava, _ = to_llava(vlm, None, tiny_tokenizer, processor, base_lm=tmp_path / "base")
    assert all(p.dtype == torch.float32 for p in llava.parameters())
    # reference: the same adapter on the float32 base
    vlm.lm.save_pretrained(tmp_path / "adapter")
    fp32 = load_adapter_checked(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    ref_vlm = VisionLanguageModel(fp32, vlm.projector, vlm.image_token_id, vlm.vision_tower).eval()
    ids, mask, pixels = _padded_batch(tiny_tokenizer, tiny_images, processor)
    keep = mask.bool()
    with torch.no_grad():
        reference = ref_vlm(ids, attention_mask=mask, pixel_values=pixels).logits
        logits = llava(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    torch.testing.assert_close(logits[keep], reference[keep], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- adapter guard
def test_adapter_guard_returns_the_loaded_model(tiny_tokenizer, tmp_path):
    from peft import PeftModel

    trained = _lora(make_tiny_lm(tiny_tokenizer))
    trained.save_pretrained(tmp_path / "adapter")
    base = make_tiny_lm(tiny_tokenizer)
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        trained_logits = trained(input_ids=ids).logits
    model = load_adapter_checked(base, tmp_path / "adapter")
    assert isinstance(model, PeftModel)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, trained_logits)
    assert not torch.allclose(logits, base_logits, atol=1e-3)


def test_adapter_guard_refuses_zero_lora(tiny_tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    untrained = get_peft_model(make_tiny_lm(tiny_tokenizer), LoraConfig(r=4, target_modules=TARGETS))
    untrained.save_pretrained(tmp_path / "adapter")           # LoRA B starts at zero
    with pytest.raises(ExportError, match="LoRA B matrices are zero"):
        load_adapter_checked(make_tiny_lm(tiny_tokenizer), tmp_path / "adapter")


def test_adapter_guard_refuses_mismatched_base(tiny_tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    _lora(make_tiny_lm(tiny_tokenizer)).save_pretrained(tmp_path / "adapter")
    wider = make_tiny_lm(tiny_tokenizer, hidden_size=48)
    with pytest.raises(ExportError, match="different base model"):
        load_adapter_checked(wider, tmp_path / "adapter")
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ExportError, match="does not have"):
        load_adapter_checked(llama, tmp_path / "adapter")
    with pytest.raises(ExportError, match="adapter_config.json"):
        load_adapter_checked(make_tiny_lm(tiny_tokenizer), tmp_path)


def test_export_integrity_is_verified_on_load(exported, tmp_path):
    """Every exported file is listed with its sha256; a flipped byte, a missing file or a path
    outside the folder is refused by name when the assistant loads."""
    import json
    import shutil

    from capstone_lib.assistant import Assistant
    from capstone_lib.export import EXPORT_MANIFEST, verify_export

    src = exported[2]
    manifest = json.loads((src / EXPORT_MANIFEST).read_text())
    assert "model.safetensors" in manifest["files"] and verify_export(src)
    Assistant.from_pretrained(src)                                    # intact: loads

    flipped = shutil.copytree(src, tmp_path / "flipped")
    weights = flipped / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="model.safetensors: sha256 does not match"):
        Assistant.from_pretrained(flipped)

    missing = shutil.copytree(src, tmp_path / "missing")
    (missing / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match="tokenizer.json: missing"):
        verify_export(missing)

    escaping = shutil.copytree(src, tmp_path / "escaping")
    bad = json.loads((escaping / EXPORT_MANIFEST).read_text())
    bad["files"]["../outside.bin"] = {"size": 1, "sha256": "0" * 64}
    (escaping / EXPORT_MANIFEST).write_text(json.dumps(bad))
    with pytest.raises(ExportError, match="outside the export folder"):
        verify_export(escaping)


def test_a_system_message_is_refused_not_silently_dropped(exported, tiny_images):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(exported[2])
    messages = [{"role": "system", "content": "Answer briefly."}] + _messages(tiny_images[0])
    with pytest.raises(Exception, match="fixed system line"):
        processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
