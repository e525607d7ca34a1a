"""The multimodal model: image patches spliced into a language model's input embeddings.

How a "visual" language model reads an image, in three steps:

1. The prompt is tokenized with ``<image>`` expanded to one placeholder token per image
   patch (``chat.expand_image_token``): ``Instruct: <image><image>...<image>\\nWhat ...``.
2. A frozen vision tower (CLIP) turns the image into one feature vector per patch, and the
   projector maps each one to the language model's embedding width.
3. The prompt's token embeddings are looked up as usual, and the rows at the placeholder
   positions are *replaced* by the projected patch vectors. The language model then runs on
   these ``inputs_embeds`` instead of on token ids; it never sees the placeholder token.

This is exactly what transformers' ``LlavaForConditionalGeneration`` does (``masked_scatter``
over the placeholder mask), so a model trained here exports to a standard Llava checkpoint
with identical outputs (``capstone_lib.export``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import CausalLMOutputWithPast

IGNORE_INDEX = -100


class VisionLanguageModel(nn.Module):
    """A causal LM (plain or peft) + projector (+ optional CLIP vision tower), Llava-style."""

    # Set True only by the seed-bug lesson (notebook 04b) to re-create "labels not masked".
    allow_image_labels: bool = False

    def __init__(self, lm: nn.Module, projector: nn.Module, image_token_id: int,
                 vision_tower: nn.Module | None = None, feature_layer: int = -2):
        super().__init__()
        self.lm = lm                        # any HF causal LM, or a peft model wrapping one
        self.projector = projector          # (B, N, D_vision) -> (B, N, D_text)
        self.vision_tower = vision_tower    # only needed when pixel_values are passed
        self.image_token_id = int(image_token_id)
        self.feature_layer = feature_layer  # LLaVA uses the second-to-last CLIP layer

    @property
    def config(self):
        """The language model's config (vocab size, eos id, ...)."""
        return self.lm.config

    @property
    def device(self) -> torch.device:
        """Device of the input embedding table (where input ids must live)."""
        return self.lm.get_input_embeddings().weight.device

    # ------------------------------------------------------------------ images
    def image_features(self, pixel_values: Tensor) -> Tensor:
        """Run the vision tower: patch features ``hidden_states[feature_layer][:, 1:]`` (CLS dropped)."""
        if self.vision_tower is None:
            raise ValueError("pixel_values given but this model has no vision_tower; pass cached "
                             "image_features instead, or build it with vision_tower=...")
        params = list(self.vision_tower.parameters())
        # A frozen tower (the usual case) needs no autograd graph: that saves a lot of memory.
        track = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        with torch.set_grad_enabled(track):
            out = self.vision_tower(pixel_values.to(params[0].dtype), output_hidden_states=True)
        # hidden_states[0] is the patch embedding, [-1] the last layer; position 0 is CLS.
        return out.hidden_states[self.feature_layer][:, 1:]

    def project(self, image_features: Tensor) -> Tensor:
        """Map ``(n_images, N, D_vision)`` features to ``(n_images, N, D_text)`` with the projector."""
        proj_dtype = next(self.projector.parameters()).dtype
        return self.projector(image_features.to(proj_dtype))

    # ------------------------------------------------------------------ splice
    def embed(self, input_ids: Tensor, image_features: Tensor | None = None,
              pixel_values: Tensor | None = None) -> Tensor:
        """Token embeddings with the projected patches written over the ``<image>`` placeholders."""
        if image_features is not None and pixel_values is not None:
            raise ValueError("pass either image_features (cached) or pixel_values, not both")
        inputs_embeds = self.lm.get_input_embeddings()(input_ids)          # (B, T, D_text)
        is_placeholder = input_ids == self.image_token_id                   # (B, T) bool

        if pixel_values is not None:
            image_features = self.image_features(pixel_values)
        if image_features is None:
            if is_placeholder.any():
                raise ValueError(f"the prompt has {int(is_placeholder.sum())} <image> placeholder "
                                 "tokens but no image_features or pixel_values were given")
            return inputs_embeds
        if image_features.dim() != 3:
            raise ValueError(f"image_features must be (n_images, n_patches, dim), got {tuple(image_features.shape)}")

        self._check_counts(is_placeholder, image_features)
        patches = self.project(image_features)                              # (n_images, N, D_text)

        # masked_scatter fills the True positions of the mask, in row-major order, with the
        # values of `patches`: image 0's N vectors go to the first N placeholders, and so on.
        mask = is_placeholder.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, patches.to(inputs_embeds.dtype))

    @staticmethod
    def _check_counts(is_placeholder: Tensor, image_features: Tensor) -> None:
        """Every placeholder needs exactly one patch vector (per sample when there is one image per sample)."""
        n_images, n_patches = image_features.shape[:2]
        n_placeholders = int(is_placeholder.sum())
        if n_placeholders != n_images * n_patches:
            raise ValueError(
                f"image token count mismatch: the prompt has {n_placeholders} <image> placeholder tokens "
                f"but there are {n_images} image(s) x {n_patches} patches = {n_images * n_patches} features; "
                f"expand '<image>' to {n_patches} placeholders per image (chat.expand_image_token)")
        if n_images == is_placeholder.shape[0]:       # one image per sample: check each row
            per_row = is_placeholder.sum(dim=1).tolist()
            for row, count in enumerate(per_row):
                if count != n_patches:
                    raise ValueError(f"image token count mismatch in sample {row}: {count} <image> "
                                     f"placeholder tokens but its image has {n_patches} features")

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                image_features: Tensor | None = None, pixel_values: Tensor | None = None,
                labels: Tensor | None = None, inputs_embeds: Tensor | None = None,
                past_key_values=None, use_cache: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        """Splice the image into the embeddings (unless ``inputs_embeds`` is given) and run the LM.

        ``labels`` are aligned with ``input_ids`` (-100 = ignored); the LM shifts them itself.
        During generation with a KV cache, pass only the new token's ``inputs_embeds``.
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (with image_features or pixel_values) or inputs_embeds")
            if labels is not None:
                self._check_labels(input_ids, labels)
            inputs_embeds = self.embed(input_ids, image_features=image_features, pixel_values=pixel_values)
        elif image_features is not None or pixel_values is not None:
            raise ValueError("inputs_embeds already contain the image; do not pass image_features/pixel_values too")
        return self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels,
                       past_key_values=past_key_values, use_cache=use_cache, return_dict=True, **kwargs)

    def _check_labels(self, input_ids: Tensor, labels: Tensor) -> None:
        """Guard against training the model to predict placeholders (an earlier attempt's bug)."""
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
        supervised = (input_ids == self.image_token_id) & (labels != IGNORE_INDEX)
        if supervised.any() and not self.allow_image_labels:
            raise ValueError(f"{int(supervised.sum())} <image> placeholder positions carry labels; "
                             f"set labels to {IGNORE_INDEX} there (only answer tokens are supervised)")
