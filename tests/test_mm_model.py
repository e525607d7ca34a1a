"""The splice model: same logits as transformers' Llava, clear errors, labels, KV-cache decoding."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY_N_PATCHES, make_tiny_lm

from capstone_lib.chat import IMAGE_TOKEN, caption_conversation, encode_conversation, encode_prompt
from capstone_lib.mm_model import VisionLanguageModel
from capstone_lib.projector import build_projector


def _vlm(tokenizer, lm, vision):
    tower, _ = vision
    torch.manual_seed(1)
    proj = build_projector("mlp2x_gelu", tower.config.hidden_size, lm.config.hidden_size)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return VisionLanguageModel(lm, proj, image_id, vision_tower=tower).eval()


def _reference_llava(vlm):
    """A LlavaForConditionalGeneration holding the same weights, built by hand (not via export.py)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(vision_config=vlm.vision_tower.config.to_dict(), text_config=vlm.lm.config.to_dict(),
                         image_token_id=vlm.image_token_id, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=TINY_N_PATCHES)
    llava = LlavaForConditionalGeneration(config).eval()
    llava.model.language_model.load_state_dict(vlm.lm.gpt_neox.state_dict())
    llava.lm_head.load_state_dict(vlm.lm.embed_out.state_dict())
    llava.model.vision_tower.load_state_dict(vlm.vision_tower.state_dict())
    llava.model.multi_modal_projector.load_state_dict(vlm.projector.state_dict())
    return llava


def _batch(tokenizer, images, processor, n=TINY_N_PATCHES):
    """Two prompts of different lengths, left-padded, with their pixel values."""
    prompts = [encode_prompt(tokenizer, [], f"{IMAGE_TOKEN}\nWhat colour is the circle in the top left?", n),
               encode_prompt(tokenizer, [], f"{IMAGE_TOKEN}\nDescribe the image.", n)]
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    assert mask[1].sum() < width                      # the second prompt really is padded
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    return ids, mask, pixels


def test_logits_equal_llava_for_same_weights(tiny_tokenizer, tiny_lm, tiny_vision, tiny_images):
    vlm = _vlm(tiny_tokenizer, tiny_lm, tiny_vision)
    llava = _reference_llava(vlm)
    ids, mask, pixels = _batch(tiny_tokenizer, tiny_images, tiny_vision[1])
    with torch.no_grad():
        ours = vlm(ids, attention_mask=mask, pixel_values=pixels).logits
        theirs = llava(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        # the cached-feature path gives the same result as running the tower
        features = vlm.image_features(pixels)
        cached = vlm(ids, attention_mask=mask, image_features=features).logits
    keep = mask.bool()
    assert ours.shape == theirs.shape == (2, ids.shape[1], len(tiny_tokenizer))
    torch.testing.assert_close(ours[keep], theirs[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached[keep], ours[keep], rtol=0, atol=0)
    # and the image matters: another image changes the answer logits
    with torch.no_grad():
        swapped = vlm(ids, attention_mask=mask, pixel_values=pixels.flip(0)).logits
    assert not torch.allclose(swapped[0, -1], ours[0, -1])


def test_features_shape_and_splice_positions(tiny_tokenizer, tiny_lm, tiny_vision, tiny_images):
    vlm = _vlm(tiny_tokenizer, tiny_lm, tiny_vision)
    ids, _, pixels = _batch(tiny_tokenizer, tiny_images, tiny_vision[1])
    with torch.no_grad():
        features = vlm.image_features(pixels)
        embeds = vlm.embed(ids, image_features=features)
        plain = tiny_lm.get_input_embeddings()(ids)
    assert features.shape == (2, TINY_N_PATCHES, tiny_vision[0].config.hidden_size)
    is_image = ids == vlm.image_token_id
    torch.testing.assert_close(embeds[~is_image], plain[~is_image], rtol=0, atol=0)
    torch.testing.assert_close(embeds[0][is_image[0]], vlm.project(features)[0], rtol=0, atol=0)


def test_count_mismatch_is_a_clear_error(tiny_tokenizer, tiny_lm, tiny_vision, tiny_images):
    vlm = _vlm(tiny_tokenizer, tiny_lm, tiny_vision)
    ids, mask, pixels = _batch(tiny_tokenizer, tiny_images, tiny_vision[1], n=TINY_N_PATCHES - 1)
    with pytest.raises(ValueError, match=rf"{2 * (TINY_N_PATCHES - 1)} <image>.*{2 * TINY_N_PATCHES} features"):
        vlm(ids, attention_mask=mask, pixel_values=pixels)
    # right total, wrong split between the samples
    ids, mask, pixels = _batch(tiny_tokenizer, tiny_images, tiny_vision[1])
    row0 = ids[0].clone()
    first = int((row0 == vlm.image_token_id).nonzero()[0])
    ids[0, first] = tiny_tokenizer.eos_token_id
    ids[1, 0] = vlm.image_token_id
    with pytest.raises(ValueError, match="sample 0"):
        vlm(ids, attention_mask=mask, pixel_values=pixels)
    with pytest.raises(ValueError, match="no image_features"):
        vlm(ids)
    with pytest.raises(ValueError, match="not both"):
        vlm.embed(ids, image_features=vlm.image_features(pixels), pixel_values=pixels)


def test_labels_loss_is_hf_shifted_and_ignores_masked(tiny_tokenizer, tiny_lm, tiny_vision, tiny_images):
    vlm = _vlm(tiny_tokenizer, tiny_lm, tiny_vision)
    enc = encode_conversation(tiny_tokenizer, caption_conversation("A red square in the top left."),
                              TINY_N_PATCHES, max_len=96)
    ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])
    pixels = tiny_vision[1](tiny_images[:1], return_tensors="pt")["pixel_values"]
    out = vlm(ids, pixel_values=pixels, labels=labels)
    shift_logits, shift_labels = out.logits[0, :-1], labels[0, 1:]
    keep = shift_labels != -100
    expected = torch.nn.functional.cross_entropy(shift_logits[keep], shift_labels[keep])
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert vlm.projector.linear_1.weight.grad.abs().sum() > 0
    # supervising the placeholders (the earlier attempt's bug) is refused
    with pytest.raises(ValueError, match="placeholder positions carry labels"):
        vlm(ids, pixel_values=pixels, labels=ids.clone())


def test_kv_cache_decoding_matches_full_forward(tiny_tokenizer, tiny_lm, tiny_vision, tiny_images):
    vlm = _vlm(tiny_tokenizer, tiny_lm, tiny_vision)
    ids, mask, pixels = _batch(tiny_tokenizer, tiny_images[:1] * 2, tiny_vision[1])
    ids, mask, pixels = ids[:1, -mask[0].sum():], mask[:1, -mask[0].sum():], pixels[:1]
    next_ids = torch.tensor([[5, 9, 11]])
    with torch.no_grad():
        full = vlm(torch.cat([ids, next_ids], 1), pixel_values=pixels).logits
        out = vlm(ids, pixel_values=pixels, use_cache=True)
        steps = [out.logits[:, -1]]
        past = out.past_key_values
        for t in range(next_ids.shape[1]):
            step = vlm(inputs_embeds=vlm.embed(next_ids[:, t:t + 1]), past_key_values=past, use_cache=True)
            past = step.past_key_values
            steps.append(step.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, ids.shape[1] - 1:], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="already contain the image"):
        vlm(inputs_embeds=vlm.embed(next_ids), pixel_values=pixels)


def test_works_with_a_peft_lora_model(tiny_tokenizer, tiny_vision, tiny_images):
    from peft import LoraConfig, get_peft_model

    lm = get_peft_model(make_tiny_lm(tiny_tokenizer), LoraConfig(
        r=4, lora_alpha=8, target_modules=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]))
    vlm = _vlm(tiny_tokenizer, lm, tiny_vision)
    ids, mask, pixels = _batch(tiny_tokenizer, tiny_images, tiny_vision[1])
    out = vlm(ids, attention_mask=mask, pixel_values=pixels, labels=torch.where(mask.bool(), ids, -100)
              .masked_fill(ids == vlm.image_token_id, -100))
    out.loss.backward()
    lora_b = [p for n, p in lm.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    assert all(p.grad is None for n, p in lm.named_parameters() if "lora" not in n)
