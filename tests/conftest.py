"""Shared tiny fixtures: a real BPE tokenizer, a tiny GPT-NeoX and a tiny CLIP vision tower.

Everything is built from configs with random weights (no hub, no download) and is small
enough that a forward pass takes milliseconds on one CPU core. Seeds are fixed, so two
calls of a fixture give the same weights.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

TINY_EOS = "<|endoftext|>"
TINY_IMAGE_TOKEN = "<image>"
TINY_IMAGE_SIZE = 32
TINY_PATCH = 8
TINY_N_PATCHES = (TINY_IMAGE_SIZE // TINY_PATCH) ** 2   # 16 patch tokens (CLS dropped)

# ShapesWorld-like sentences in the course's chat format: enough to learn a small BPE.
_COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
_SHAPES = ("circle", "square", "triangle")
_POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")


def tiny_corpus() -> list[str]:
    """A few hundred ShapesWorld-style sentences (captions, questions, answers)."""
    lines = []
    for c in _COLORS:
        for s in _SHAPES:
            for p in _POSITIONS:
                lines.append(f"A {c} {s} in the {p}.")
                lines.append(f"Instruct: <image>\nWhat colour is the {s}?\nOutput: {c}{TINY_EOS}")
                lines.append(f"Instruct: Where is the {c} {s}?\nOutput: in the {p}{TINY_EOS}")
    lines += ["Describe the image.", "How many shapes are there?", "There are 2 shapes: 0 1 2 3"]
    return lines


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE trained on ShapesWorld sentences; eos = pad = <|endoftext|>, plus <image>, no BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[TINY_EOS, TINY_IMAGE_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=TINY_EOS, pad_token=TINY_EOS,
                                   additional_special_tokens=[TINY_IMAGE_TOKEN])


def make_tiny_lm(tokenizer, seed: int = 0, hidden_size: int = 32):
    """A 2-layer GPTNeoXForCausalLM sized to ``tokenizer`` (random weights, eval mode)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=4 * hidden_size, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(config).eval()


def make_tiny_vision(seed: int = 0):
    """A 2-layer CLIPVisionModel (32 px, patch 8 -> 16 patches) and its CLIPImageProcessor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH, hidden_size=24,
                              intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                              projection_dim=24)
    torch.manual_seed(seed)
    tower = CLIPVisionModel(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE},
                                   crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    return tower, processor


@pytest.fixture
def tiny_lm(tiny_tokenizer):
    """Tiny GPTNeoXForCausalLM (hidden 32, 2 layers) with the tokenizer's vocabulary."""
    return make_tiny_lm(tiny_tokenizer)


@pytest.fixture
def tiny_vision():
    """``(CLIPVisionModel, CLIPImageProcessor)``: 32 px images, patch 8, hidden 24."""
    return make_tiny_vision()


@pytest.fixture
def tiny_images():
    """Two small deterministic RGB PIL images (a red and a blue square on grey)."""
    from PIL import Image, ImageDraw

    images = []
    for colour, box in (("red", (4, 4, 20, 20)), ("blue", (12, 10, 30, 28))):
        img = Image.new("RGB", (40, 40), "grey")
        ImageDraw.Draw(img).rectangle(box, fill=colour)
        images.append(img)
    return images


# ----------------------------------------------------------------------------- a second LM family
CHATML_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")


def make_chatml_tokenizer():
    """A byte-level BPE with SmolLM2-Instruct's special tokens: eos = pad = ``<|im_end|>``, plus ``<image>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=list(CHATML_TOKENS[:3]),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    tok.train_from_iterator([line.replace("Instruct: ", "<|im_start|>user\n") for line in tiny_corpus()]
                            + [system] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   bos_token="<|im_start|>", unk_token="<|endoftext|>")


def make_tiny_llama(vocab_size: int, seed: int = 0, hidden_size: int = 32):
    """A 2-layer LlamaForCausalLM with a tied, bias-free head (SmolLM2's architecture), random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def make_tiny_phi(vocab_size: int, seed: int = 0, hidden_size: int = 32):
    """A 2-layer PhiForCausalLM (Phi-2's architecture: its output head has a bias), random weights."""
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=256)
    torch.manual_seed(seed)
    return PhiForCausalLM(config).eval()
