"""stream_generate: the KV-cache loop gives exactly the tokens of transformers' greedy generate()."""
from __future__ import annotations

import pytest
import torch

from capstone_lib.generate import generate, next_token, stream_generate
from capstone_lib.mm_model import VisionLanguageModel
from capstone_lib.projector import build_projector
from conftest import make_tiny_lm, make_tiny_vision


def _prompt(lm, n: int = 7, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, lm.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return lm.get_input_embeddings()(ids)


def _hf_greedy(lm, embeds, n, eos=None):
    with torch.no_grad():
        out = lm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                          do_sample=False, max_new_tokens=n, min_new_tokens=0, eos_token_id=eos,
                          pad_token_id=0)
    return out[0].tolist()


@pytest.mark.parametrize("seed", [0, 1])
def test_streamed_greedy_equals_hf_generate(tiny_tokenizer, seed):
    lm = make_tiny_lm(tiny_tokenizer, seed=seed)
    embeds = _prompt(lm, seed=seed)
    ref = _hf_greedy(lm, embeds, 20)
    assert len(ref) == 20                          # generate() returned only the new tokens
    streamed = list(stream_generate(lm, embeds, eos_token_id=None, max_new_tokens=20))
    assert streamed == ref
    assert len(set(streamed)) > 1                  # a real sequence, not one token repeated


def test_cache_and_no_cache_agree(tiny_lm):
    embeds = _prompt(tiny_lm)
    with_cache = generate(tiny_lm, embeds, eos_token_id=None, max_new_tokens=15)
    without = generate(tiny_lm, embeds, eos_token_id=None, max_new_tokens=15, use_cache=False)
    assert with_cache == without


def test_stops_at_eos_without_yielding_it(tiny_lm):
    embeds = _prompt(tiny_lm)
    free = generate(tiny_lm, embeds, eos_token_id=None, max_new_tokens=12)
    eos = free[5]
    cut = free[:free.index(eos)]
    assert generate(tiny_lm, embeds, eos_token_id=eos, max_new_tokens=12) == cut
    assert generate(tiny_lm, embeds, eos_token_id=[9999, eos], max_new_tokens=12) == cut
    ref = _hf_greedy(tiny_lm, embeds, 12, eos=eos)
    assert ref[:len(cut) + 1] == cut + [eos]        # generate() emits the EOS, then pads


def test_attention_mask_is_honoured(tiny_lm):
    """A left-padded prompt with its mask: same tokens as generate(); the mask changes them."""
    embeds = _prompt(tiny_lm, n=6)
    padded = torch.cat([torch.randn(1, 3, embeds.shape[-1]), embeds], dim=1)
    mask = torch.tensor([[0, 0, 0] + [1] * 6])
    ours = generate(tiny_lm, padded, mask, eos_token_id=None, max_new_tokens=8)
    with torch.no_grad():
        ref = tiny_lm.generate(inputs_embeds=padded, attention_mask=mask, do_sample=False,
                               max_new_tokens=8, pad_token_id=0)[0].tolist()
    assert ours == ref
    assert ours != generate(tiny_lm, padded, eos_token_id=None, max_new_tokens=8)


def test_sampling(tiny_lm):
    embeds = _prompt(tiny_lm)
    greedy = generate(tiny_lm, embeds, eos_token_id=None, max_new_tokens=10)
    # a nucleus so small that only the top token survives is greedy, whatever the temperature
    assert generate(tiny_lm, embeds, eos_token_id=None, max_new_tokens=10, temperature=5.0,
                    top_p=1e-6, generator=torch.Generator().manual_seed(0)) == greedy
    runs = [generate(tiny_lm, embeds, eos_token_id=None, max_new_tokens=10, temperature=2.0,
                     generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    with pytest.raises(ValueError, match="temperature"):
        next(stream_generate(tiny_lm, embeds, eos_token_id=None, temperature=-1.0))
    for bad in (float("nan"), float("inf")):        # a NaN would reach the sampler and crash there
        with pytest.raises(ValueError, match="finite temperature"):
            next(stream_generate(tiny_lm, embeds, eos_token_id=None, temperature=bad))
    with pytest.raises(ValueError, match="top_p"):
        next(stream_generate(tiny_lm, embeds, eos_token_id=None, top_p=0.0))
    with pytest.raises(ValueError, match="one prompt"):
        next(stream_generate(tiny_lm, embeds.repeat(2, 1, 1), eos_token_id=None))


def test_next_token_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    drawn = {next_token(logits, 1.0, 0.7, g) for _ in range(300)}
    assert drawn == {0, 1}                          # 0.5 + 0.3 >= 0.7: tokens 2 and 3 are cut
    assert next_token(logits) == 0


def test_works_on_the_in_library_vision_language_model(tiny_tokenizer):
    lm = make_tiny_lm(tiny_tokenizer)
    tower, _ = make_tiny_vision()
    vlm = VisionLanguageModel(lm, build_projector("mlp2x_gelu", 24, 32),
                              tiny_tokenizer.convert_tokens_to_ids("<image>"), tower).eval()
    image_id = vlm.image_token_id
    ids = torch.tensor([[5, 6] + [image_id] * 16 + [7, 8]])
    with torch.no_grad():
        embeds = vlm.embed(ids, pixel_values=torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert generate(vlm, embeds, eos_token_id=None, max_new_tokens=10) == _hf_greedy(lm, embeds, 10)
