"""Token-by-token generation with a KV cache, written out so that it can be read.

A decoder produces one token per forward pass. Without a cache, step ``t`` re-runs the model
over all ``prompt + t`` positions; with a cache (``past_key_values``) the keys and values of
earlier positions are kept, and each step feeds only the newest token's embedding. Both
give the same tokens; the cache turns O(T^2) work into O(T). ``use_cache=False`` keeps the
slow path so that the benchmark can compare them.

The loop works on *embeddings* (``inputs_embeds``), because a multimodal prompt is not a
list of token ids: image features are spliced into it. Any model whose forward accepts
``inputs_embeds``, ``attention_mask``, ``past_key_values`` and ``use_cache`` and returns
``.logits`` and ``.past_key_values`` works: transformers' ``LlavaForConditionalGeneration``,
a plain causal LM, or the course's ``VisionLanguageModel``.
"""
from __future__ import annotations

import math

from typing import Iterator, Sequence

import torch


def _token_embedding(model) -> torch.nn.Module:
    """The input embedding table of ``model`` (or of its language model)."""
    for owner in (model, getattr(model, "lm", None), getattr(model, "language_model", None)):
        if owner is not None and hasattr(owner, "get_input_embeddings"):
            table = owner.get_input_embeddings()
            if table is not None:
                return table
    raise TypeError(f"{type(model).__name__} has no get_input_embeddings(); cannot embed new tokens")


@torch.no_grad()
def _forward(model, embeds, mask, past, use_cache):
    return model(inputs_embeds=embeds, attention_mask=mask, past_key_values=past, use_cache=use_cache)


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> int:
    """Pick the next token from one row of logits: greedy, or temperature + nucleus (top-p)."""
    logits = logits.float().reshape(-1)
    if temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest set of tokens whose mass reaches top_p (always the top one)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def stream_generate(model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    *, eos_token_id: int | Sequence[int] | None, max_new_tokens: int = 64,
                    temperature: float = 0.0, top_p: float = 1.0, use_cache: bool = True,
                    generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield new token ids one at a time for a single prompt of embeddings ``(1, T, d)``.

    Stops after ``max_new_tokens`` or at an EOS token (which is not yielded). Greedy when
    ``temperature == 0``; otherwise samples from ``softmax(logits / temperature)`` cut to
    the top-p nucleus, drawing from ``generator`` for reproducibility.
    """
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[0] != 1:
        raise ValueError(f"stream_generate takes one prompt of shape (1, T, d), got {tuple(inputs_embeds.shape)}")
    if not (math.isfinite(temperature) and temperature >= 0) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need a finite temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    table = _token_embedding(model)
    device = inputs_embeds.device
    mask = (torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=device)
            if attention_mask is None else attention_mask.to(device))
    embeds = inputs_embeds

    # Prefill: one pass over the whole prompt fills the cache and gives the first logits.
    out = _forward(model, embeds, mask, None, use_cache)
    for step in range(max_new_tokens):
        token = next_token(out.logits[0, -1], temperature, top_p, generator)
        if token in eos:
            return
        yield token
        if step == max_new_tokens - 1:
            return
        with torch.no_grad():
            new = table(torch.tensor([[token]], device=device)).to(embeds.dtype)   # (1, 1, d)
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        if use_cache:   # decode: feed only the new token; the cache holds the rest
            out = _forward(model, new, mask, out.past_key_values, True)
        else:           # no cache: recompute every position of the growing sequence
            embeds = torch.cat([embeds, new], dim=1)
            out = _forward(model, embeds, mask, None, False)


def generate(model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
             **kwargs) -> list[int]:
    """All tokens of :func:`stream_generate` as a list."""
    return list(stream_generate(model, inputs_embeds, attention_mask, **kwargs))
