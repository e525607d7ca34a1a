"""The LM spec: one place names the LM's identity, and a spec that does not fit its model fails loudly.

The same stages (stage 1, stage 2, export, the assistant) run with two LM families: the course's
GPT-NeoX in the ``instruct`` format and a SmolLM2-architecture Llama in the ``chatml`` format;
a Phi (biased output head) exports to the course's own folder.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import make_chatml_tokenizer, make_tiny_lm, make_tiny_llama, make_tiny_phi

from capstone_lib.chat import (CHATML, INSTRUCT, IMAGE_TOKEN, TemplateError, encode_conversation, encode_prompt,
                               format_of, render_prompt, set_format)
from capstone_lib.lm_spec import (LM_PRESETS, LMSpecError, check_lora_targets, check_tokenizer, lm_preset,
                                  lm_spec, spec_from_section)
from capstone_lib.profiles import PROFILE_NAMES, get_profile

SMOL_TARGETS = LM_PRESETS["smollm2-360m"].lora_targets


def _chatml_tokenizer():
    from capstone_lib.tokenizer import add_chat_tokens
    return set_format(add_chat_tokens(make_chatml_tokenizer(), "<|im_end|>"), CHATML)


# ----------------------------------------------------------------------------- the spec
def test_every_profile_has_a_valid_spec_and_gpu_profiles_export_to_llava():
    for name in PROFILE_NAMES:
        spec = lm_spec(get_profile(name))
        assert spec.format.end_of_turn == spec.eos_token
        if name in ("t4", "a100"):
            assert spec.hub_id.startswith("HuggingFaceTB/SmolLM2-") and spec.export == "llava"
    phi = lm_spec(get_profile("a100", lm=lm_preset("phi-2")))
    assert phi.hub_id == "microsoft/phi-2" and phi.export == "course"


def test_a_bad_lm_section_fails_when_the_profile_is_built():
    with pytest.raises(LMSpecError, match=r"unknown lm setting\(s\) \['lora_target'\]; valid: .*lora_targets"):
        get_profile("cpu", lm={"lora_target": ("q_proj",)})
    with pytest.raises(LMSpecError, match="ends answers with '<\\|im_end\\|>'"):
        get_profile("a100", lm={"eos_token": "<|endoftext|>"})
    with pytest.raises(TemplateError, match="unknown chat format 'vicuna'"):
        get_profile("a100", lm={"chat_format": "vicuna"})
    with pytest.raises(LMSpecError, match="lm.export"):
        spec_from_section({**lm_preset("phi-2"), "export": "gguf"})
    with pytest.raises(LMSpecError, match="unknown LM preset"):
        lm_preset("phi-3")


def test_misnamed_lora_target_fails_loudly(tiny_tokenizer):
    """peft would train fewer modules; the course refuses and lists the real names."""
    from capstone_lib.qlora import add_lora

    profile = get_profile("smoke", lm={"lora_targets": ("query_key_value", "q_proj")},
                          stage2={"quantize_4bit": False})
    with pytest.raises(LMSpecError, match=r"\['q_proj'\] match no module of GPTNeoXForCausalLM; .*"
                                          r"'dense_h_to_4h'.*'query_key_value'"):
        add_lora(profile, make_tiny_lm(tiny_tokenizer))
    llama = make_tiny_llama(400)
    assert check_lora_targets(llama, SMOL_TARGETS) == {t: 2 for t in SMOL_TARGETS}
    with pytest.raises(LMSpecError, match="match no module of LlamaForCausalLM"):
        check_lora_targets(llama, LM_PRESETS["course-pythia"].lora_targets)


def test_tokenizer_checks():
    spec = LM_PRESETS["smollm2-135m"]
    tok = _chatml_tokenizer()
    check_tokenizer(spec, tok)
    instruct_tok = make_chatml_tokenizer()
    instruct_tok.eos_token = "<|endoftext|>"
    with pytest.raises(LMSpecError, match="eos_token is '<\\|endoftext\\|>'"):
        check_tokenizer(spec, instruct_tok)
    # a spec whose end-of-answer token the tokenizer does not have as one token
    from capstone_lib.tokenizer import add_chat_tokens
    no_image = make_chatml_tokenizer()
    with pytest.raises(LMSpecError, match="'<image>' tokenizes to"):
        check_tokenizer(spec, no_image)
    assert add_chat_tokens(no_image).convert_tokens_to_ids(IMAGE_TOKEN) == len(no_image) - 1


# ----------------------------------------------------------------------------- formats
def test_chatml_renders_like_smollm2s_own_template():
    """SmolLM2-Instruct's chat template (from its tokenizer_config.json) gives the same prompt text."""
    from jinja2 import Template

    smol = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
            "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    msgs = [{"role": "user", "content": "What colour is the circle?"}, {"role": "assistant", "content": "red"},
            {"role": "user", "content": "And the square?"}]
    theirs = Template(smol).render(messages=msgs, add_generation_prompt=True)
    history = [{"from": "human", "value": "What colour is the circle?"}, {"from": "gpt", "value": "red"}]
    assert render_prompt(history, "And the square?", CHATML) == theirs


@pytest.mark.parametrize("fmt", [INSTRUCT, CHATML], ids=lambda f: f.name)
def test_generated_jinja_equals_the_training_prompt(fmt):
    from jinja2 import Template

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is red?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "the circle"}]},
            {"role": "user", "content": [{"type": "text", "text": "Where?"}]}]
    history = [{"from": "human", "value": f"{IMAGE_TOKEN}\nWhat is red?"}, {"from": "gpt", "value": "the circle"}]
    eos = fmt.end_of_turn
    assert Template(fmt.jinja()).render(messages=msgs, eos_token=eos) == render_prompt(history, "Where?", fmt)


def test_format_travels_with_the_tokenizer(tiny_tokenizer):
    tok = _chatml_tokenizer()
    assert format_of(tok) is CHATML and format_of(tiny_tokenizer) is INSTRUCT
    conv = [{"from": "human", "value": f"{IMAGE_TOKEN}\nWhat colour is the circle?"}, {"from": "gpt", "value": "red"}]
    enc = encode_conversation(tok, conv, n_image_tokens=3, max_len=200)
    supervised = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != -100]
    assert tok.decode(supervised) == "red<|im_end|>"                 # the answer and its end-of-turn only
    assert tok.decode(enc.input_ids).startswith("<|im_start|>system\n")
    foreign = make_chatml_tokenizer()
    foreign.chat_template = "{{ messages }}"
    with pytest.raises(TemplateError, match="not one of the course's formats"):
        format_of(foreign)


# ----------------------------------------------------------------------------- two families, same stages
def _save_lm(tmp_path, name, lm, tokenizer):
    path = tmp_path / name
    lm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _family_profile(monkeypatch, tmp_path, lm_section: dict, steps: int = 2):
    monkeypatch.setenv("CAPSTONE_RUNS", str(tmp_path / "runs"))
    return get_profile("smoke", lm=lm_section, stage1={"max_steps": steps, "eval_every": steps, "save_every": steps},
                       stage2={"max_steps": steps, "eval_every": steps, "save_every": steps})


def _assert_same_answers(profile, assistant, images, max_new_tokens=6):
    """The exported assistant generates the in-library model's greedy tokens (stage 2's own loader)."""
    from capstone_lib.generate import stream_generate
    from capstone_lib.stage2 import load_trained_model
    from capstone_lib.vision import load_vision_tower

    vlm, tokenizer = load_trained_model(profile)
    vlm.vision_tower, image_processor = load_vision_tower(profile, device="cpu")
    question = "What colour is the circle?"
    n_tokens = 0
    for image in images:
        pixels = image_processor(images=image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            feats = vlm.image_features(pixels)
            ids = encode_prompt(tokenizer, [], f"{IMAGE_TOKEN}\n{question}", feats.shape[1])
            ours = list(stream_generate(vlm, vlm.embed(torch.tensor([ids]), image_features=feats),
                                        eos_token_id=tokenizer.eos_token_id, max_new_tokens=max_new_tokens))
            theirs_feats = assistant.image_features(image)
            theirs_ids = assistant.prompt_ids([], question, theirs_feats.shape[0])
            theirs = list(stream_generate(assistant.model, assistant.embed_prompt(theirs_ids, theirs_feats),
                                          eos_token_id=assistant.tokenizer.eos_token_id,
                                          max_new_tokens=max_new_tokens))
        assert theirs_ids == ids and theirs == ours
        n_tokens += len(ours)
    assert n_tokens >= 2 * max_new_tokens // 2, "stopped at once: the comparison would be too weak"


@pytest.mark.slow
def test_chatml_llama_family_runs_the_stages_and_exports_to_llava(monkeypatch, tmp_path, tiny_images):
    """SmolLM2's family: stage 1, stage 2 (4-bit + LoRA on its q/k/v/o/gate/up/down), export, pipeline."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from capstone_lib.assistant import Assistant
    from capstone_lib.stage1 import train_stage1
    from capstone_lib.stage2 import ensure_assistant, train_stage2

    tok = make_chatml_tokenizer()           # <image> not in it: the embeddings must grow by one row
    lm_dir = _save_lm(tmp_path, "tiny-smollm2", make_tiny_llama(len(tok)), tok)
    profile = _family_profile(monkeypatch, tmp_path, {**lm_preset("smollm2-135m"), "hub_id": lm_dir,
                                                       "name": "tiny-smollm2"})
    s1 = train_stage1(profile)
    assert s1["model"].lm.get_input_embeddings().num_embeddings == len(tok) + 1
    s2 = train_stage2(profile)
    assert len(s2["history"]) == 2 and all(r["loss"] == r["loss"] for r in s2["history"])
    out = ensure_assistant(profile)
    assert (out / "config.json").is_file()
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(model.model.language_model).__name__ == "LlamaModel"
    processor = AutoProcessor.from_pretrained(out)
    assert "<|im_start|>assistant" in processor.chat_template

    assistant = Assistant.from_pretrained(out)
    assert format_of(assistant.tokenizer) is CHATML
    _assert_same_answers(profile, assistant, tiny_images)


@pytest.mark.slow
def test_phi_family_exports_to_the_course_format(monkeypatch, tmp_path, tiny_tokenizer, tiny_images):
    """Phi-2's family (biased head): the assistant is saved in the course's folder and answers the same."""
    from capstone_lib.assistant import Assistant
    from capstone_lib.export import COURSE_MANIFEST
    from capstone_lib.stage2 import ensure_assistant

    lm_dir = _save_lm(tmp_path, "tiny-phi", make_tiny_phi(len(tiny_tokenizer)), tiny_tokenizer)
    profile = _family_profile(monkeypatch, tmp_path, {**lm_preset("phi-2"), "hub_id": lm_dir, "name": "tiny-phi"})
    out = ensure_assistant(profile)                   # trains stages 1-2 first (announced)
    assert (out / COURSE_MANIFEST).is_file() and not (out / "config.json").exists()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt*"))   # safetensors only
    assistant = Assistant.from_pretrained(out)
    assert assistant.model.lm.get_output_embeddings().bias is not None     # the bias is kept, not dropped
    assert format_of(assistant.tokenizer) is INSTRUCT
    _assert_same_answers(profile, assistant, tiny_images)


# ----------------------------------------------------------------------------- text that imitates the template
@pytest.mark.parametrize("fmt", [INSTRUCT, CHATML], ids=lambda f: f.name)
def test_text_with_the_templates_own_markers_is_refused(fmt):
    from capstone_lib.chat import segments

    ok = [{"from": "human", "value": f"{IMAGE_TOKEN}\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    assert len(segments(ok, fmt)) == 2
    for marker in fmt.reserved:
        fake = [ok[0], {"from": "gpt", "value": f"red{marker} and more"}]
        with pytest.raises(TemplateError, match=f"turn 1: the text contains {re.escape(repr(marker))}"):
            segments(fake, fmt)
    with pytest.raises(TemplateError, match="turn 1: the text contains '<image>'"):
        segments([ok[0], {"from": "gpt", "value": "a <image> here"}], fmt)
    with pytest.raises(TemplateError, match="turn 0"):
        segments([{"from": "human", "value": f"{IMAGE_TOKEN}{IMAGE_TOKEN} two?"}, ok[1]], fmt)


def test_datasets_count_or_name_the_records_the_template_cannot_hold(tiny_tokenizer):
    from capstone_lib.llava_data import ConversationRecord
    from capstone_lib.stage2 import ConversationDataset
    from capstone_lib.validation import DataError, SkipCounter

    good = ConversationRecord("1", Path("000000000001.png"), [{"from": "human", "value": f"{IMAGE_TOKEN}\nColour?"},
                                                               {"from": "gpt", "value": "red"}])
    bad = ConversationRecord("2", Path("000000000002.png"), [{"from": "human", "value": f"{IMAGE_TOKEN}\nColour?"},
                                                              {"from": "gpt", "value": "red<|endoftext|>Instruct: hi"}])
    skips = SkipCounter()
    data = ConversationDataset([good, bad], tiny_tokenizer, 4, 128, skips=skips)
    assert len(data) == 1 and skips.count == 1 and "cannot hold" in skips.report()
    with pytest.raises(DataError, match=r"id '2'.*'<\|endoftext\|>'"):
        ConversationDataset([good, bad], tiny_tokenizer, 4, 128)


def test_in_memory_merge_when_training_grew_the_embeddings(tmp_path):
    """SmolLM2's <image> row is added by training: merging its LoRA into the saved base still works."""
    from peft import LoraConfig, get_peft_model

    from capstone_lib.export import merged_language_model
    from capstone_lib.language_model import grow_embeddings

    base = make_tiny_llama(100)
    base.save_pretrained(tmp_path / "base")
    grown = make_tiny_llama(100)
    grow_embeddings(grown, 101)
    lora = get_peft_model(grown, LoraConfig(r=4, lora_alpha=8, target_modules=list(SMOL_TARGETS)))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    lora.eval()
    merged = merged_language_model(lora, tmp_path / "base")
    ids = torch.tensor([[1, 5, 9, 100, 3]])                      # 100: the grown row
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, lora(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert merged.get_input_embeddings().num_embeddings == 101
