"""The course's chat formats, their tokenization and their label mask.

Every stage (captions in stage 1, conversations in stage 2, the assistant, the exported
Llava processor) renders text through this module, so training and inference cannot
drift apart. A :class:`ChatFormat` is a handful of strings; the LM's spec
(``capstone_lib.lm_spec``) names which one its LM uses. Two are defined:

``instruct`` (Phi-2's instruct style; the LM you pretrain in notebook 01 learns it)::

    Instruct: <image>\\nWhat colour is the circle?\\nOutput: red<|endoftext|>\\nInstruct: ...

``chatml`` (SmolLM2-Instruct's own template, its default system line included)::

    <|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n<image>\\nWhat ...<|im_end|>\\n<|im_start|>assistant\\nred<|im_end|>

The Jinja template saved with a tokenizer or an exported processor is *generated* from the
same strings (:meth:`ChatFormat.jinja`), so there is no hand-kept twin; a tokenizer carries
its format in ``tokenizer.chat_template`` and :func:`format_of` reads it back.

Human turns and the assistant cue are masked (label -100); every assistant answer and the
end-of-turn token after it are supervised. ``<image>`` is expanded to one placeholder token
per image patch, exactly as transformers' ``LlavaProcessor`` does.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100
CAPTION_PROMPT = "Describe the image."


class TemplateError(ValueError):
    """A conversation or prompt that the template cannot render or tokenizes inconsistently."""


@dataclass(frozen=True)
class ChatFormat:
    """How turns become text: ``system``, then per exchange ``[separator] user_prefix + question +
    assistant_cue`` (masked) and ``answer_prefix + answer + end_of_turn`` (supervised)."""

    name: str
    user_prefix: str
    assistant_cue: str
    answer_prefix: str
    end_of_turn: str                 # the token that ends an answer: generation stops at it
    separator: str = "\n"            # between an answer and the next human turn
    system: str = ""                 # rendered once before the first turn (masked)
    # Strings that mark structure in this format: a turn containing one would be read as structure
    # (a fake end of answer, a fake new turn), so such a turn is refused (``TemplateError``).
    reserved: tuple[str, ...] = ()

    def human(self, text: str, first: bool) -> str:
        """One human turn and the cue that hands over to the assistant."""
        lead = self.system if first else self.separator
        return f"{lead}{self.user_prefix}{text}{self.assistant_cue}"

    def answer(self, text: str) -> str:
        """One assistant answer with its end-of-turn token."""
        return f"{self.answer_prefix}{text}{self.end_of_turn}"

    def jinja(self) -> str:
        """This format as a transformers chat template (messages with text/image content items)."""
        return _jinja(self)


@lru_cache(maxsize=None)
def _jinja(fmt: ChatFormat) -> str:
    """Built once per format: ``format_of`` compares it on every encoded conversation."""
    def lit(s: str) -> str:
        return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"
    return (
        "{% set state = namespace(started=false) %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}"
        "{{ raise_exception('the course chat template has a fixed system line; send user/assistant turns only') }}"
        "{% endif %}"
        "{% if message['content'] is string %}{% set text = message['content'] %}{% else %}"
        "{% set ns = namespace(text='') %}"
        "{% for item in message['content'] %}"
        f"{{% if item['type'] == 'image' %}}{{% set ns.text = ns.text + {lit(IMAGE_TOKEN + chr(10))} %}}"
        "{% elif item['type'] == 'text' %}{% set ns.text = ns.text + item['text'] %}{% endif %}"
        "{% endfor %}{% set text = ns.text %}{% endif %}"
        "{% if message['role'] == 'user' %}"
        f"{{% if not state.started %}}{{{{ {lit(fmt.system)} }}}}{{% set state.started = true %}}"
        f"{{% else %}}{{{{ {lit(fmt.separator)} }}}}{{% endif %}}"
        f"{{{{ {lit(fmt.user_prefix)} + text | trim + {lit(fmt.assistant_cue)} }}}}"
        "{% elif message['role'] == 'assistant' %}"
        f"{{{{ {lit(fmt.answer_prefix)} + text | trim + {lit(fmt.end_of_turn)} }}}}"
        "{% endif %}{% endfor %}"
    )


INSTRUCT = ChatFormat("instruct", user_prefix="Instruct: ", assistant_cue="\nOutput:", answer_prefix=" ",
                      end_of_turn="<|endoftext|>", reserved=("<|endoftext|>", "Instruct:", "Output:"))
# SmolLM2-Instruct's own template (its tokenizer adds this system line when none is given).
CHATML = ChatFormat("chatml", user_prefix="<|im_start|>user\n", assistant_cue="<|im_end|>\n<|im_start|>assistant\n",
                    answer_prefix="", end_of_turn="<|im_end|>",
                    reserved=("<|im_start|>", "<|im_end|>", "<|endoftext|>"),
                    system="<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                           "Hugging Face<|im_end|>\n")
CHAT_FORMATS: dict[str, ChatFormat] = {f.name: f for f in (INSTRUCT, CHATML)}
# Kept for readers of earlier notebooks: the instruct format's template.
JINJA_TEMPLATE = INSTRUCT.jinja()


def get_format(name: str) -> ChatFormat:
    """The chat format called ``name``; a clear error lists the known ones."""
    if name not in CHAT_FORMATS:
        raise TemplateError(f"unknown chat format {name!r}; the course defines {sorted(CHAT_FORMATS)}")
    return CHAT_FORMATS[name]


def set_format(tokenizer, fmt: ChatFormat):
    """Give ``tokenizer`` the format's Jinja template (and so the format itself); returns it."""
    tokenizer.chat_template = fmt.jinja()
    return tokenizer


def format_of(tokenizer) -> ChatFormat:
    """The course format a tokenizer carries: ``instruct`` when it has no chat template.

    A template that is not one of the course's (e.g. a hub tokenizer's own, never set by
    ``set_format``) is an error: training and inference would render different prompts.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return INSTRUCT
    if isinstance(template, dict):
        template = template.get("default")
    for fmt in CHAT_FORMATS.values():
        if template == fmt.jinja():
            return fmt
    raise TemplateError("the tokenizer's chat_template is not one of the course's formats "
                        f"{sorted(CHAT_FORMATS)}; load it with capstone_lib.tokenizer.load_tokenizer(..., spec)")


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


def segments(conversations: Sequence[dict[str, Any]], fmt: ChatFormat = INSTRUCT) -> list[tuple[str, bool]]:
    """Render turns to ``(text, supervised)`` segments in ``fmt``; turns must alternate human/gpt."""
    out: list[tuple[str, bool]] = []
    for i, turn in enumerate(conversations):
        speaker, value = turn.get("from"), turn.get("value")
        expected = "human" if i % 2 == 0 else "gpt"
        if speaker != expected:
            raise TemplateError(f"turn {i}: expected from={expected!r}, got {speaker!r}")
        if not isinstance(value, str) or not value.strip():
            raise TemplateError(f"turn {i}: empty or non-text value")
        marker = next((m for m in fmt.reserved if m in value), None)
        if marker is None and IMAGE_TOKEN in value and (i > 0 or value.count(IMAGE_TOKEN) > 1):
            marker = IMAGE_TOKEN          # only the first human turn holds the image, once
        if marker is not None:
            raise TemplateError(f"turn {i}: the text contains {marker!r}, which the {fmt.name!r} chat format "
                                "uses as structure")
        if speaker == "human":
            out.append((fmt.human(value.strip(), first=i == 0), False))
        else:
            out.append((fmt.answer(value.strip()), True))
    return out


def render_prompt(history: Sequence[dict[str, Any]], question: str, fmt: ChatFormat = INSTRUCT) -> str:
    """The text the model continues: earlier turns, then the new question and the assistant cue."""
    turns = list(history) + [{"from": "human", "value": question}]
    return "".join(text for text, _ in segments(turns, fmt))


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
    segs = segments(conversations, format_of(tokenizer))
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
    text = expand_image_token(render_prompt(history, question, format_of(tokenizer)), n_image_tokens)
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
