"""The one chat template of the course, its tokenization and its label mask.

Every stage (captions in stage 1, conversations in stage 2, the assistant, the exported
Llava processor) renders text through this module, so training and inference cannot
drift apart. The template is Phi-2's instruct style::

    Instruct: <image>\\nWhat colour is the circle?\\nOutput: red<|endoftext|>\\nInstruct: ...

Human turns and the ``Output:`` cue are masked (label -100); every assistant answer and
the EOS after it are supervised. ``<image>`` is expanded to one placeholder token per
image patch, exactly as transformers' ``LlavaProcessor`` does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100
HUMAN_PREFIX = "Instruct: "
ASSISTANT_CUE = "\nOutput:"
TURN_SEPARATOR = "\n"
CAPTION_PROMPT = "Describe the image."

# Jinja version of the same template, saved with the exported processor. It renders a
# transformers-style message list ({"role", "content": [{"type": "image"}, {"type": "text"}]}).
JINJA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}{% else %}"
    "{% set ns = namespace(text='') %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{% set ns.text = ns.text + '<image>\\n' %}"
    "{% elif item['type'] == 'text' %}{% set ns.text = ns.text + item['text'] %}{% endif %}"
    "{% endfor %}{% set text = ns.text %}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}{{ 'Instruct: ' + text | trim + '\\nOutput:' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + text | trim + eos_token }}"
    "{% endif %}{% endfor %}"
)


class TemplateError(ValueError):
    """A conversation or prompt that the template cannot render or tokenizes inconsistently."""


@dataclass
class Encoded:
    """Token ids and labels of one rendered conversation."""

    input_ids: list[int]
    labels: list[int]
    turns_kept: int
    turns_total: int

    @property
    def truncated(self) -> bool:
        """True when whole turns were dropped to fit the context."""
        return self.turns_kept < self.turns_total


def expand_image_token(text: str, n_image_tokens: int) -> str:
    """Replace each ``<image>`` by ``n_image_tokens`` placeholders (Llava-style)."""
    return text.replace(IMAGE_TOKEN, IMAGE_TOKEN * n_image_tokens)


def segments(conversations: Sequence[dict[str, Any]], eos_token: str) -> list[tuple[str, bool]]:
    """Render turns to ``(text, supervised)`` segments; turns must alternate human/gpt."""
    out: list[tuple[str, bool]] = []
    for i, turn in enumerate(conversations):
        speaker, value = turn.get("from"), turn.get("value")
        expected = "human" if i % 2 == 0 else "gpt"
        if speaker != expected:
            raise TemplateError(f"turn {i}: expected from={expected!r}, got {speaker!r}")
        if not isinstance(value, str) or not value.strip():
            raise TemplateError(f"turn {i}: empty or non-text value")
        if speaker == "human":
            prefix = TURN_SEPARATOR if i else ""
            out.append((f"{prefix}{HUMAN_PREFIX}{value.strip()}{ASSISTANT_CUE}", False))
        else:
            out.append((f" {value.strip()}{eos_token}", True))
    return out


def render_prompt(history: Sequence[dict[str, Any]], question: str, eos_token: str) -> str:
    """The text the model continues: earlier turns, then the new question and ``Output:``."""
    turns = list(history) + [{"from": "human", "value": question}]
    return "".join(text for text, _ in segments(turns, eos_token))


def _tokenize(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_conversation(tokenizer, conversations: Sequence[dict[str, Any]], n_image_tokens: int,
                        max_len: int, check: bool = True) -> Encoded:
    """Tokenize a conversation with labels; drop whole trailing turn pairs to fit ``max_len``.

    Raises ``TemplateError`` when even the first exchange does not fit, when the turns are
    out of order, or (``check``) when the segments tokenize differently from the whole text.
    """
    if len(conversations) < 2 or len(conversations) % 2:
        raise TemplateError(f"need human/gpt pairs, got {len(conversations)} turns")
    segs = segments(conversations, tokenizer.eos_token)
    ids: list[int] = []
    labels: list[int] = []
    kept = 0
    for pair in range(0, len(segs), 2):
        pair_ids: list[list[int]] = []
        for text, _ in segs[pair:pair + 2]:
            pair_ids.append(_tokenize(tokenizer, expand_image_token(text, n_image_tokens)))
        n = len(pair_ids[0]) + len(pair_ids[1])
        if len(ids) + n > max_len:
            break
        ids += pair_ids[0] + pair_ids[1]
        labels += [IGNORE_INDEX] * len(pair_ids[0]) + pair_ids[1]
        kept += 2
    if kept == 0:
        raise TemplateError(f"first exchange needs more than max_len={max_len} tokens")
    if check:
        full = "".join(expand_image_token(t, n_image_tokens) for t, _ in segs[:kept])
        if _tokenize(tokenizer, full) != ids:
            raise TemplateError("segment-wise tokenization differs from whole-text tokenization: "
                                "the template would train on different tokens than inference sees")
    return Encoded(ids, labels, kept, len(conversations))


def encode_prompt(tokenizer, history: Sequence[dict[str, Any]], question: str,
                  n_image_tokens: int) -> list[int]:
    """Token ids of an inference prompt; identical to the training prefix for the same turns."""
    text = expand_image_token(render_prompt(history, question, tokenizer.eos_token), n_image_tokens)
    return _tokenize(tokenizer, text)


def caption_conversation(caption: str, prompt: str = CAPTION_PROMPT) -> list[dict[str, str]]:
    """Stage-1 sample as a one-exchange conversation: image + prompt -> caption."""
    return [{"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"}, {"from": "gpt", "value": caption}]


def render_supervision(tokenizer, input_ids: Sequence[int], labels: Sequence[int],
                       collapse_image: bool = True) -> str:
    """HTML showing supervised tokens in green and masked ones in grey (image runs collapsed)."""
    import html
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    parts, i = [], 0
    while i < len(input_ids):
        if collapse_image and input_ids[i] == image_id:
            j = i
            while j < len(input_ids) and input_ids[j] == image_id:
                j += 1
            parts.append(f'<span style="background:#ddd;color:#555">[{j - i} x &lt;image&gt;]</span>')
            i = j
            continue
        tok = html.escape(tokenizer.decode([input_ids[i]]))
        tok = tok.replace("\n", "\u21b5<br>")
        style = "background:#b7f5b7;color:#063" if labels[i] != IGNORE_INDEX else "color:#888"
        parts.append(f'<span style="{style}">{tok}</span>')
        i += 1
    return "<div style='font-family:monospace;line-height:1.8'>" + "".join(parts) + "</div>"
