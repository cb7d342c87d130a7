"""Mask2Anomaly model: transformers' Mask2Former with global masked attention and the mask contrastive loss.

Only the parts that differ from Mask2Former are written here; everything else (backbone, pixel decoder,
matcher, mask/class/dice losses) is transformers' own, imported and subclassed.

- Global masked attention (GMA): every masked cross-attention of the transformer decoder becomes a
  foreground attention (blocked where sigmoid(mask) < 0.5, transformers' `cross_attn`) plus a background
  attention with its own weights (blocked where sigmoid(mask) > 0.5, `cross_attn_background`), summed before
  the residual and LayerNorm. Fully blocked rows are reset to "attend everywhere" for each mask separately.
- `mask_contrastive_loss`: the official `loss_ood`, added on the final and every auxiliary prediction when
  `outlier_labels` are passed to `Mask2AnomalyForUniversalSegmentation.forward`.
- Losses and matching in float32 under any autocast (`Mask2AnomalyLoss`): transformers' matcher goes wrong
  in float16 and bfloat16.

This file travels to the Hub as remote code: it imports only torch, transformers and the other remote-code modules
(relatively: `.configuration_mask2anomaly`, `.deformable_attention`, and in `save_pretrained` the processor and
pipeline modules).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerForUniversalSegmentation,
    Mask2FormerForUniversalSegmentationOutput,
    Mask2FormerLoss,
    Mask2FormerMaskedAttentionDecoder,
    Mask2FormerMaskedAttentionDecoderLayer,
    Mask2FormerMaskedAttentionDecoderOutput,
    Mask2FormerMaskPredictor,
    Mask2FormerModel,
    Mask2FormerPixelLevelModule,
    Mask2FormerPreTrainedModel,
    Mask2FormerTransformerModule,
)
from transformers.utils import logging

from .configuration_mask2anomaly import CITYSCAPES_CLASSES, CITYSCAPES_REFINE_CLASS_IDS, Mask2AnomalyConfig
from .deformable_attention import set_deformable_attention_backend

logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Mask-level class scores and the mask contrastive loss
# --------------------------------------------------------------------------------------------------------------
def float32_region(device_type: str) -> contextlib.AbstractContextManager:
    """A context in which autocast is off on `device_type` (so ops run in their inputs' dtype, float32 for the
    losses); a no-op where autocast does not exist for that device type."""
    available = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4; before, cpu/cuda only
    if available(device_type) if available is not None else device_type in ("cpu", "cuda"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def class_mask_scores(class_queries_logits: Tensor, masks_queries_logits: Tensor) -> Tensor:
    """Per-pixel class scores of a mask classifier, `S_c(x) = sum_q softmax(class_q)[c] * sigmoid(mask_q(x))`.

    Args:
        class_queries_logits: `(batch, queries, num_labels + 1)`; the last column is "no object". It takes part
            in the softmax and is then dropped.
        masks_queries_logits: `(batch, queries, height, width)` mask logits.

    Returns:
        `(batch, num_labels, height, width)`. Not normalised: several queries voting for one class can push
        `S_c` above 1.
    """
    class_probs = class_queries_logits.softmax(dim=-1)[..., :-1]
    return torch.einsum("bqc,bqhw->bchw", class_probs, masks_queries_logits.sigmoid())


def mask_contrastive_loss(
    class_queries_logits: Tensor,
    masks_queries_logits: Tensor,
    outlier_labels: Tensor,
    margin: float = 1.0,
    form: str = "margin",
    label_sizes: Sequence[tuple[int, int]] | None = None,
) -> Tensor:
    """The mask contrastive loss of Mask2Anomaly, equal to the official `SetCriterion.loss_ood`.

    With `S_c` from [`class_mask_scores`], the official score is `s(x) = -max_c S_c(x)`, bilinearly resized
    (`align_corners=True`) from the whole mask grid to the label resolution: `label_sizes[b]` = (h, w) for
    image b, compared with `outlier_labels[b, :h, :w]` (the official code resizes onto the *un-padded* label
    size, see `Mask2AnomalyConfig.contrastive_loss_alignment`), or the full `outlier_labels` grid when
    `label_sizes` is None. Pixels with `outlier_labels == 1` are outliers, `== 0` inliers; any other value
    (e.g. 255) is ignored. Means run over all such pixels of the batch. Computed in float32, also under
    autocast.

    - `form="margin"` (official default, which produced the released weights):
      `L = 0.5 * (mean_inlier s^2 + mean_outlier max(0, margin - s)^2)`; without outlier pixels in the batch
      the second term is dropped but the factor 0.5 stays (as in the official code).
    - `form="bce"` (the official alternative): `L = 0.5 * (BCE(s_inlier, 0) + BCE(s_outlier, 1))`, `s` used as
      a logit; the outlier term is dropped when there are no outliers.

    **Sign quirk of the official form.** `S_c >= 0`, so `s <= 0` everywhere and `margin - s >= margin > 0`:
    the hinge never clips, and both terms push `max_c S_c` *down*: on inliers towards 0 (the opposite of
    what a confident known class should do), on outliers more strongly (the gradient there is
    `margin + max_c S_c` instead of `max_c S_c`). The contrast between the two comes only from that
    difference in strength. This is what trained the released checkpoints, so it stays the default here.
    (Unlike what one may read elsewhere, the official code keeps the factor 0.5 also when a batch has no
    outlier pixel; the official fixtures confirm it.)

    Args:
        class_queries_logits: `(batch, queries, num_labels + 1)`.
        masks_queries_logits: `(batch, queries, h, w)`.
        outlier_labels: `(batch, H, W)`, 1 outlier, 0 inlier, other values ignored. In official training void
            pixels are passed as 0 (inliers).
        margin: the margin `m` of the `margin` form.
        form: `"margin"` or `"bce"`.
        label_sizes: per image, the (height, width) of its labels inside the (padded) `outlier_labels`.

    Returns:
        A scalar tensor.
    """
    if form not in ("margin", "bce"):
        raise ValueError(f"form={form!r} is not a mask contrastive loss form; expected 'margin' or 'bce'")
    batch = masks_queries_logits.shape[0]
    if outlier_labels.dim() != 3 or outlier_labels.shape[0] != batch:
        raise ValueError(
            f"outlier_labels must have shape (batch={batch}, height, width); got {tuple(outlier_labels.shape)}"
        )
    full_size = tuple(outlier_labels.shape[-2:])
    if label_sizes is None:
        label_sizes = [full_size] * batch
    label_sizes = [(int(h), int(w)) for h, w in label_sizes]
    if len(label_sizes) != batch or any(not (0 < h <= full_size[0] and 0 < w <= full_size[1]) for h, w in label_sizes):
        raise ValueError(
            f"label_sizes must give one (height, width) per image within the outlier_labels grid {full_size}; "
            f"got {label_sizes} for a batch of {batch}"
        )
    with float32_region(masks_queries_logits.device.type):
        scores = class_mask_scores(class_queries_logits.float(), masks_queries_logits.float())
        score = -scores.max(dim=1).values[:, None]
        if all(size == full_size for size in label_sizes):
            score = F.interpolate(score, size=full_size, mode="bilinear", align_corners=True)
            pixel_scores, labels = score.flatten(), outlier_labels.flatten()
        else:
            # image by image, in batch order: the same pixels in the same order as one batched resize would give
            pixel_scores = torch.cat([
                F.interpolate(score[b : b + 1], size=size, mode="bilinear", align_corners=True).flatten()
                for b, size in enumerate(label_sizes)
            ])
            labels = torch.cat([outlier_labels[b, :h, :w].flatten() for b, (h, w) in enumerate(label_sizes)])
        return _contrastive_terms(pixel_scores, labels, margin, form)


def _contrastive_terms(score: Tensor, outlier_labels: Tensor, margin: float, form: str) -> Tensor:
    """The loss of [`mask_contrastive_loss`] from the resized score and the labels of the same pixels, both `(P,)`."""
    outlier = outlier_labels == 1
    inlier = outlier_labels == 0
    inlier_score = score[inlier]
    outlier_score = score[outlier]
    if form == "margin":
        loss = inlier_score.pow(2).mean()
        if outlier_score.numel() > 0:
            loss = loss + (margin - outlier_score).clamp(min=0.0).pow(2).mean()
    else:
        loss = F.binary_cross_entropy_with_logits(inlier_score, torch.zeros_like(inlier_score))
        if outlier_score.numel() > 0:
            loss = loss + F.binary_cross_entropy_with_logits(outlier_score, torch.ones_like(outlier_score))
    return 0.5 * loss


class Mask2AnomalyLoss(Mask2FormerLoss):
    """Mask2Former's losses with the mask count normalised as detectron2 does across processes, computed in
    float32 under any autocast.

    transformers' `Mask2FormerLoss.get_num_masks` averages the count over processes and then divides by the
    number of processes again, so with N processes the mask and dice losses come out N times too large
    (relative to the class and contrastive terms). Here: the count is summed over processes and divided once,
    i.e. the mean number of target masks per process, as in the official criterion. One process: unchanged.

    Mixed precision: the logits are cast to float32 and autocast is switched off for the Hungarian matching
    (which `forward` runs) and every loss, so a float16/bfloat16 forward gets the matching and the loss values
    a float32 criterion gives for the same logits. Under autocast transformers' matcher builds its cost matrix
    in low precision: in float16 its sums can overflow (and non-finite costs become `finfo(float16).max`), in
    either dtype close costs are reordered and the assignment changes.
    """

    def forward(
        self,
        masks_queries_logits: Tensor,
        class_queries_logits: Tensor,
        mask_labels: list[Tensor],
        class_labels: list[Tensor],
        auxiliary_predictions: list[dict[str, Tensor]] | None = None,
    ) -> dict[str, Tensor]:
        """[`Mask2FormerLoss.forward`] in float32: masks `(batch, queries, h, w)`, classes `(batch, queries,
        num_labels + 1)`, per-image `mask_labels` `(K_i, H, W)` and `class_labels` `(K_i,)`."""
        if auxiliary_predictions is not None:
            auxiliary_predictions = [{key: value.float() for key, value in aux.items()} for aux in auxiliary_predictions]
        with float32_region(masks_queries_logits.device.type):
            return super().forward(
                masks_queries_logits.float(),
                class_queries_logits.float(),
                [labels.float() for labels in mask_labels],
                class_labels,
                auxiliary_predictions,
            )

    def get_num_masks(self, class_labels: list[Tensor], device: torch.device) -> Tensor:
        num_masks = torch.as_tensor(float(sum(len(classes) for classes in class_labels)), device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(num_masks)
            num_masks = num_masks / torch.distributed.get_world_size()
        return num_masks.clamp(min=1)


# --------------------------------------------------------------------------------------------------------------
# Global masked attention
# --------------------------------------------------------------------------------------------------------------
def _reset_fully_blocked_rows(block: Tensor) -> Tensor:
    # A query whose mask blocks every pixel would get NaN attention; Mask2Former lets it attend everywhere.
    return block & ~block.all(dim=-1, keepdim=True)


class Mask2AnomalyMaskPredictor(Mask2FormerMaskPredictor):
    """Mask head that returns the foreground and the background attention masks of global masked attention.

    Returns `(mask_logits, (foreground_block, background_block))`: mask logits `(batch, queries, H, W)` and two
    boolean masks `(batch * heads, queries, h * w)` at `attention_mask_target_size`, True = blocked. The
    foreground attention is blocked where sigmoid(mask) < 0.5, the background attention where it is > 0.5;
    pixels at exactly 0.5 are open to both (as in the official code).
    """

    def forward(
        self, outputs: Tensor, pixel_embeddings: Tensor, attention_mask_target_size: int | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        mask_embeddings = self.mask_embedder(outputs.transpose(0, 1))
        mask_logits = torch.einsum("bqc,bchw->bqhw", mask_embeddings, pixel_embeddings)
        resized = F.interpolate(mask_logits, size=attention_mask_target_size, mode="bilinear", align_corners=False)
        probs = resized.detach().sigmoid().flatten(2)
        batch, queries, pixels = probs.shape

        def per_head(block: Tensor) -> Tensor:
            return block.unsqueeze(1).expand(batch, self.num_heads, queries, pixels).flatten(0, 1)

        return mask_logits, (per_head(probs < 0.5), per_head(probs > 0.5))


class Mask2AnomalyMaskedAttentionDecoderLayer(Mask2FormerMaskedAttentionDecoderLayer):
    """Decoder layer with global masked attention: `cross_attn` (foreground) + `cross_attn_background`.

    `encoder_attention_mask` is the pair `(foreground_block, background_block)` made by
    [`Mask2AnomalyMaskPredictor`]. Self-attention and FFN are Mask2Former's.
    """

    def __init__(self, config: Mask2AnomalyConfig):
        super().__init__(config)
        self.cross_attn_background = nn.MultiheadAttention(self.embed_dim, config.num_attention_heads, config.dropout)

    def global_masked_attention(
        self,
        hidden_states: Tensor,
        memory: Tensor,
        memory_position_embeddings: Tensor | None,
        query_position_embeddings: Tensor | None,
        attention_masks: tuple[Tensor, Tensor],
    ) -> tuple[Tensor, tuple[Tensor | None, Tensor | None]]:
        """Sum of the foreground and background attentions, `(queries, batch, dim)`, and their weights."""
        foreground_block, background_block = attention_masks
        query = self.with_pos_embed(hidden_states, query_position_embeddings)
        key = self.with_pos_embed(memory, memory_position_embeddings)
        foreground, foreground_weights = self.cross_attn(query, key, memory, attn_mask=foreground_block)
        background, background_weights = self.cross_attn_background(query, key, memory, attn_mask=background_block)
        return foreground + background, (foreground_weights, background_weights)

    def _self_attention_and_ffn(self, hidden_states: Tensor, query_position_embeddings: Tensor | None, pre_norm: bool):
        residual = hidden_states
        if pre_norm:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        hidden_states, self_attn_weights = self.self_attn(
            hidden_states=hidden_states,
            position_embeddings=query_position_embeddings,
            attention_mask=None,
            output_attentions=True,
        )
        hidden_states = residual + F.dropout(hidden_states, p=self.dropout, training=self.training)
        if not pre_norm:
            hidden_states = self.self_attn_layer_norm(hidden_states)

        residual = hidden_states
        if pre_norm:
            hidden_states = self.final_layer_norm(hidden_states)
        hidden_states = self.activation_fn(self.fc1(hidden_states))
        hidden_states = F.dropout(hidden_states, p=self.activation_dropout, training=self.training)
        hidden_states = self.fc2(hidden_states)
        hidden_states = residual + F.dropout(hidden_states, p=self.dropout, training=self.training)
        if not pre_norm:
            hidden_states = self.final_layer_norm(hidden_states)
        return hidden_states, self_attn_weights

    def _forward(self, pre_norm: bool, hidden_states, level_index, position_embeddings, query_position_embeddings,
                 encoder_hidden_states, encoder_attention_mask, output_attentions):
        residual = hidden_states
        attended = self.cross_attn_layer_norm(hidden_states) if pre_norm else hidden_states
        attended, cross_attn_weights = self.global_masked_attention(
            attended,
            encoder_hidden_states[level_index],
            position_embeddings[level_index],
            query_position_embeddings,
            encoder_attention_mask,
        )
        hidden_states = residual + F.dropout(attended, p=self.dropout, training=self.training)
        if not pre_norm:
            hidden_states = self.cross_attn_layer_norm(hidden_states)
        hidden_states, self_attn_weights = self._self_attention_and_ffn(hidden_states, query_position_embeddings, pre_norm)
        outputs = (hidden_states,)
        if output_attentions:
            outputs += (self_attn_weights, cross_attn_weights)
        return outputs

    def forward_post(self, hidden_states, level_index=None, attention_mask=None, position_embeddings=None,
                     query_position_embeddings=None, encoder_hidden_states=None, encoder_attention_mask=None,
                     output_attentions=False):
        return self._forward(False, hidden_states, level_index, position_embeddings, query_position_embeddings,
                             encoder_hidden_states, encoder_attention_mask, output_attentions)

    def forward_pre(self, hidden_states, level_index=None, attention_mask=None, position_embeddings=None,
                    query_position_embeddings=None, encoder_hidden_states=None, encoder_attention_mask=None,
                    output_attentions=False):
        # The official GMA layer has no working pre-norm path; this is the natural one (norm, GMA, residual).
        return self._forward(True, hidden_states, level_index, position_embeddings, query_position_embeddings,
                             encoder_hidden_states, encoder_attention_mask, output_attentions)


class Mask2AnomalyMaskedAttentionDecoder(Mask2FormerMaskedAttentionDecoder):
    """Mask2Former's transformer decoder; with `global_masked_attention` its layers use GMA."""

    def __init__(self, config: Mask2AnomalyConfig):
        super().__init__(config)
        if config.global_masked_attention:
            self.layers = nn.ModuleList(
                [Mask2AnomalyMaskedAttentionDecoderLayer(config) for _ in range(self.decoder_layers)]
            )
            self.mask_predictor = Mask2AnomalyMaskPredictor(
                hidden_size=config.hidden_dim,
                num_heads=config.num_attention_heads,
                mask_feature_size=self.mask_feature_size,
            )

    def forward(
        self,
        inputs_embeds: Tensor | None = None,
        multi_stage_positional_embeddings: list[Tensor] | None = None,
        pixel_embeddings: Tensor | None = None,
        encoder_hidden_states: list[Tensor] | None = None,
        query_position_embeddings: Tensor | None = None,
        feature_size_list: list | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ):
        """Same inputs and outputs as [`Mask2FormerMaskedAttentionDecoder.forward`]."""
        if not self.config.global_masked_attention:
            return super().forward(
                inputs_embeds=inputs_embeds,
                multi_stage_positional_embeddings=multi_stage_positional_embeddings,
                pixel_embeddings=pixel_embeddings,
                encoder_hidden_states=encoder_hidden_states,
                query_position_embeddings=query_position_embeddings,
                feature_size_list=feature_size_list,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=return_dict,
            )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        attentions = () if output_attentions else None

        normed = self.layernorm(hidden_states)
        intermediate = (normed,)
        mask_logits, attention_masks = self.mask_predictor(normed, pixel_embeddings, feature_size_list[0])
        intermediate_mask_predictions = (mask_logits,)

        for idx, decoder_layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            level_index = idx % self.num_feature_levels
            attention_masks = tuple(_reset_fully_blocked_rows(block) for block in attention_masks)
            layer_outputs = decoder_layer(
                hidden_states,
                level_index,
                None,
                multi_stage_positional_embeddings,
                query_position_embeddings,
                encoder_hidden_states,  # positional, for gradient checkpointing
                encoder_attention_mask=attention_masks,
                output_attentions=output_attentions,
            )
            hidden_states = layer_outputs[0]
            normed = self.layernorm(hidden_states)
            mask_logits, attention_masks = self.mask_predictor(
                normed, pixel_embeddings, feature_size_list[(idx + 1) % self.num_feature_levels]
            )
            intermediate += (normed,)
            intermediate_mask_predictions += (mask_logits,)
            if output_attentions:
                attentions += (layer_outputs[1],)

        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        hidden_states = hidden_states.transpose(1, 0)
        if not return_dict:
            outputs = [hidden_states, all_hidden_states, attentions, intermediate, intermediate_mask_predictions]
            return tuple(v for v in outputs if v is not None)
        return Mask2FormerMaskedAttentionDecoderOutput(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=attentions,
            intermediate_hidden_states=intermediate,
            masks_queries_logits=intermediate_mask_predictions,
        )


class Mask2AnomalyTransformerModule(Mask2FormerTransformerModule):
    """Mask2Former's transformer module with the Mask2Anomaly decoder."""

    def __init__(self, in_features: int, config: Mask2AnomalyConfig):
        super().__init__(in_features, config)
        self.decoder = Mask2AnomalyMaskedAttentionDecoder(config=config)


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------
# The Auto classes a saved model's config.json routes to this remote code. Each class registers with its main Auto
# class (`register_for_auto_class`, in the package's `__init__`), so that transformers' `custom_object_save`
# copies its module and every module it imports relatively; this map adds the second routes (the base model, the
# image-segmentation Auto class, the processor of a folder saved without one).
REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_mask2anomaly.Mask2AnomalyConfig",
    "AutoModel": "modeling_mask2anomaly.Mask2AnomalyModel",
    "AutoModelForUniversalSegmentation": "modeling_mask2anomaly.Mask2AnomalyForUniversalSegmentation",
    "AutoModelForImageSegmentation": "modeling_mask2anomaly.Mask2AnomalyForUniversalSegmentation",
    "AutoImageProcessor": "image_processing_mask2anomaly.Mask2AnomalyImageProcessor",
}
# `pipeline("image-segmentation" | "anomaly-segmentation", model=folder, trust_remote_code=True)` finds these in
# config.json before transformers' own task list.
REMOTE_CODE_CUSTOM_PIPELINES = {
    "image-segmentation": {
        "impl": "pipeline_mask2anomaly.Mask2AnomalySegmentationPipeline",
        "pt": ["AutoModelForImageSegmentation"],
        "type": "image",
    },
    "anomaly-segmentation": {
        "impl": "pipeline_mask2anomaly.Mask2AnomalyMapPipeline",
        "pt": ["AutoModelForImageSegmentation"],
        "type": "image",
    },
}


class Mask2AnomalyPreTrainedModel(Mask2FormerPreTrainedModel):
    config: Mask2AnomalyConfig
    config_class = Mask2AnomalyConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    # The transformer decoder layers are transformers' GradientCheckpointingLayer; Mask2Former leaves the
    # switch off, Mask2Anomaly turns it on (tested against un-checkpointed gradients).
    supports_gradient_checkpointing = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        if isinstance(module, Mask2AnomalyMaskedAttentionDecoderLayer):
            # Mask2Former zeroes the foreground attention's input bias; do the same for the background one.
            nn.init.zeros_(module.cross_attn_background.in_proj_bias)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """[`PreTrainedModel.save_pretrained`], plus the remote-code files, an `auto_map` for every Auto class
        and the custom pipelines, so the folder loads (and serves `pipeline(...)`) with `trust_remote_code=True`
        where this package is not installed."""
        # config.json names the processor and the pipelines too, so their files must travel with this one: these
        # relative imports are what transformers' custom_object_save follows (it reads them from the source).
        from .image_processing_mask2anomaly import Mask2AnomalyImageProcessor  # noqa: F401
        from .pipeline_mask2anomaly import Mask2AnomalySegmentationPipeline  # noqa: F401

        self.config.auto_map = dict(REMOTE_CODE_AUTO_MAP)
        self.config.custom_pipelines = copy.deepcopy(REMOTE_CODE_CUSTOM_PIPELINES)
        if not self.is_remote_code():
            # a class loaded from remote code by its own name, not through an Auto class
            type(self).register_for_auto_class(
                "AutoModel" if isinstance(self, Mask2AnomalyModel) else "AutoModelForUniversalSegmentation"
            )
        super().save_pretrained(save_directory, *args, **kwargs)


class Mask2AnomalyModel(Mask2AnomalyPreTrainedModel, Mask2FormerModel):
    """Mask2Anomaly's backbone, pixel decoder and transformer decoder (no class head); see [`Mask2FormerModel`]."""

    def __init__(self, config: Mask2AnomalyConfig):
        Mask2AnomalyPreTrainedModel.__init__(self, config)
        self.pixel_level_module = Mask2FormerPixelLevelModule(config)
        # the pixel decoder's deformable attention in a faster form, same parameters and results
        set_deformable_attention_backend(self.pixel_level_module)
        self.transformer_module = Mask2AnomalyTransformerModule(in_features=config.feature_size, config=config)
        self.post_init()


@dataclass
class Mask2AnomalyForUniversalSegmentationOutput(Mask2FormerForUniversalSegmentationOutput):
    """[`Mask2FormerForUniversalSegmentationOutput`] plus `loss_dict`, every weighted loss term by name
    (`loss_cross_entropy`, `loss_mask`, `loss_dice`, `loss_contrastive`, and `_{i}` for auxiliary layer i)."""

    loss_dict: dict[str, Tensor] | None = None


class Mask2AnomalyForUniversalSegmentation(Mask2AnomalyPreTrainedModel, Mask2FormerForUniversalSegmentation):
    """Mask2Anomaly with the class head: predicts `class_queries_logits` `(batch, queries, num_labels + 1)` and
    `masks_queries_logits` `(batch, queries, height / 4, width / 4)`; with labels it returns the Mask2Former
    losses plus the mask contrastive loss on the final and every auxiliary prediction."""

    def __init__(self, config: Mask2AnomalyConfig):
        Mask2AnomalyPreTrainedModel.__init__(self, config)
        self.model = Mask2AnomalyModel(config)
        self.weight_dict: dict[str, float] = {
            "loss_cross_entropy": config.class_weight,
            "loss_mask": config.mask_weight,
            "loss_dice": config.dice_weight,
        }
        self.class_predictor = nn.Linear(config.hidden_dim, config.num_labels + 1)
        self.criterion = Mask2AnomalyLoss(config=config, weight_dict=self.weight_dict)
        self.post_init()

    def contrastive_label_sizes(self, outlier_labels: Tensor, pixel_mask: Tensor | None) -> list[tuple[int, int]] | None:
        """Per image, the (height, width) of `outlier_labels` the contrastive loss compares with, or None for the
        whole grid.

        With `contrastive_loss_alignment="official"` this is the un-padded image size, read from `pixel_mask`
        `(batch, H, W)` (1 on the image, 0 on padding; the image processor's, a top-left rectangle): the
        processor pads `outlier_labels` together with the image, and the mask says where the image ends.
        (`pixel_mask` already travels with every processor batch and training collator; a fill value for padding
        in `outlier_labels` would change their 0/1 meaning for every caller, and a new input would repeat what
        `pixel_mask` says.) Without a `pixel_mask`, `outlier_labels` are taken as un-padded (None).
        """
        if self.config.contrastive_loss_alignment == "padded" or pixel_mask is None:
            return None
        if pixel_mask.shape != outlier_labels.shape:
            raise ValueError(
                f"pixel_mask of shape {tuple(pixel_mask.shape)} does not match outlier_labels "
                f"{tuple(outlier_labels.shape)}; expected the image processor's pixel_mask for the same batch"
            )
        valid = pixel_mask.bool()
        heights = valid.any(dim=2).sum(dim=1)
        widths = valid.any(dim=1).sum(dim=1)
        sizes = [(int(h), int(w)) for h, w in zip(heights.tolist(), widths.tolist())]
        for index, (h, w) in enumerate(sizes):
            if h == 0 or w == 0 or not bool(valid[index, :h, :w].all()) or int(valid[index].sum()) != h * w:
                raise ValueError(
                    f"pixel_mask of image {index} is not a non-empty top-left rectangle of ones; the official "
                    f"contrastive loss needs each image's un-padded size (or set contrastive_loss_alignment='padded')"
                )
        return sizes

    def contrastive_loss_dict(
        self,
        class_queries_logits: tuple[Tensor, ...],
        masks_queries_logits: tuple[Tensor, ...],
        outlier_labels: Tensor,
        pixel_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Weighted mask contrastive loss of the final prediction (`loss_contrastive`) and of every auxiliary
        one (`loss_contrastive_{i}`, i = 0 for the prediction made before the first decoder layer).
        `pixel_mask` `(batch, H, W)` gives each image's un-padded size (see [`contrastive_label_sizes`])."""
        config = self.config
        label_sizes = self.contrastive_label_sizes(outlier_labels, pixel_mask)

        def term(classes: Tensor, masks: Tensor) -> Tensor:
            loss = mask_contrastive_loss(
                classes, masks, outlier_labels, config.contrastive_margin, config.contrastive_loss, label_sizes
            )
            return config.contrastive_weight * loss

        losses = {"loss_contrastive": term(class_queries_logits[-1], masks_queries_logits[-1])}
        if config.use_auxiliary_loss:
            for idx, (classes, masks) in enumerate(zip(class_queries_logits[:-1], masks_queries_logits[:-1])):
                losses[f"loss_contrastive_{idx}"] = term(classes, masks)
        return losses

    def forward(
        self,
        pixel_values: Tensor,
        mask_labels: list[Tensor] | None = None,
        class_labels: list[Tensor] | None = None,
        outlier_labels: Tensor | None = None,
        pixel_mask: Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_auxiliary_logits: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> Mask2AnomalyForUniversalSegmentationOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch, 3, height, width)`): normalised, padded images.
        mask_labels (`list[torch.Tensor]`, *optional*): per image, `(num_masks, height, width)` binary masks.
        class_labels (`list[torch.LongTensor]`, *optional*): per image, `(num_masks,)` class ids of `mask_labels`.
        outlier_labels (`torch.Tensor` of shape `(batch, height, width)`, *optional*): 1 where a pixel is a pasted
            outlier, 0 elsewhere (void counts as non-outlier, as in the official code; other values are ignored).
            When given and `config.contrastive_loss != "none"`, the mask contrastive loss is added.
        pixel_mask (`torch.Tensor` of shape `(batch, height, width)`, *optional*): 1 on the image, 0 on padding (the
            image processor's). The official contrastive loss (`config.contrastive_loss_alignment="official"`)
            reads each image's un-padded size from it; without it `outlier_labels` count as un-padded.

        The returned `loss` is the sum of every term of `loss_dict`; with `return_dict=False` it comes first
        in the tuple.
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        outputs = self.model(
            pixel_values=pixel_values,
            pixel_mask=pixel_mask,
            # the per-layer decoder states are needed for the class head of every layer
            output_hidden_states=True,
            output_attentions=output_attentions,
            return_dict=True,
        )
        class_queries_logits = tuple(
            self.class_predictor(state.transpose(0, 1)) for state in outputs.transformer_decoder_intermediate_states
        )
        masks_queries_logits = outputs.masks_queries_logits
        auxiliary_logits = self.get_auxiliary_logits(class_queries_logits, masks_queries_logits)

        loss_dict: dict[str, Tensor] = {}
        if mask_labels is not None and class_labels is not None:
            loss_dict.update(
                self.get_loss_dict(
                    masks_queries_logits=masks_queries_logits[-1],
                    class_queries_logits=class_queries_logits[-1],
                    mask_labels=mask_labels,
                    class_labels=class_labels,
                    auxiliary_predictions=auxiliary_logits if self.config.use_auxiliary_loss else None,
                )
            )
        if outlier_labels is not None and self.config.contrastive_loss != "none":
            loss_dict.update(
                self.contrastive_loss_dict(class_queries_logits, masks_queries_logits, outlier_labels, pixel_mask)
            )
        loss = self.get_loss(loss_dict) if loss_dict else None

        output_auxiliary_logits = (
            self.config.output_auxiliary_logits if output_auxiliary_logits is None else output_auxiliary_logits
        )
        output = Mask2AnomalyForUniversalSegmentationOutput(
            loss=loss,
            class_queries_logits=class_queries_logits[-1],
            masks_queries_logits=masks_queries_logits[-1],
            auxiliary_logits=auxiliary_logits if output_auxiliary_logits else None,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            pixel_decoder_last_hidden_state=outputs.pixel_decoder_last_hidden_state,
            transformer_decoder_last_hidden_state=outputs.transformer_decoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states if output_hidden_states else None,
            pixel_decoder_hidden_states=outputs.pixel_decoder_hidden_states if output_hidden_states else None,
            transformer_decoder_hidden_states=(
                outputs.transformer_decoder_hidden_states if output_hidden_states else None
            ),
            attentions=outputs.attentions,
            loss_dict=loss_dict or None,
        )
        if not return_dict:
            return output.to_tuple()
        return output

    @classmethod
    def from_mask2former(
        cls, folder_or_model: str | os.PathLike | Mask2FormerForUniversalSegmentation, **from_pretrained_kwargs
    ) -> Mask2AnomalyForUniversalSegmentation:
        """Start a Mask2Anomaly model from a transformers Mask2Former (a folder, a Hub id, or a loaded model).

        Every Mask2Former weight is copied; each decoder layer's new background attention
        (`cross_attn_background`) starts as a copy of its foreground attention (`cross_attn`), which is how GMA
        fine-tuning starts from a closed-set Mask2Former. `from_pretrained_kwargs` go to
        `Mask2FormerForUniversalSegmentation.from_pretrained`.
        """
        if isinstance(folder_or_model, Mask2FormerForUniversalSegmentation):
            source = folder_or_model
        else:
            source = Mask2FormerForUniversalSegmentation.from_pretrained(folder_or_model, **from_pretrained_kwargs)
        model = cls(mask2anomaly_config_from_mask2former(source.config))
        weights = source.state_dict()
        background = {
            key: weights[key.replace(".cross_attn_background.", ".cross_attn.")]
            for key in model.state_dict()
            if ".cross_attn_background." in key
        }
        result = model.load_state_dict({**weights, **background}, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"Mask2Former weights do not fit Mask2Anomaly: missing {sorted(result.missing_keys)[:12]}; "
                f"unexpected {sorted(result.unexpected_keys)[:12]}"
            )
        layers = len(model.model.transformer_module.decoder.layers)
        logger.warning(
            f"Initialised Mask2Anomaly from Mask2Former: the background attention (cross_attn_background) of each of "
            f"the {layers} decoder layers is a copy of its foreground attention (cross_attn); fine-tune before use"
        )
        return model.to(next(source.parameters()).dtype)


# --------------------------------------------------------------------------------------------------------------
# Mask2Former <-> Mask2Anomaly configs
# --------------------------------------------------------------------------------------------------------------
def mask2former_config_from_mask2anomaly(config: Mask2AnomalyConfig) -> Mask2FormerConfig:
    """The same architecture as a plain transformers `Mask2FormerConfig` (no global masked attention), e.g. to
    compare a Mask2Anomaly model with the Mask2Former it extends."""
    fields = {k: v for k, v in config.to_dict().items() if k in Mask2FormerConfig.__dataclass_fields__}
    fields.pop("model_type", None)
    fields["backbone_config"] = config.backbone_config
    return Mask2FormerConfig(**fields)


def mask2anomaly_config_from_mask2former(mask2former_config: Mask2FormerConfig) -> Mask2AnomalyConfig:
    """A `Mask2AnomalyConfig` with the architecture, classes and loss weights of a Mask2Former config and
    global masked attention switched on."""
    values = mask2former_config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "auto_map", "_name_or_path"):
        values.pop(key, None)
    values["global_masked_attention"] = True
    # Refinement suppresses anomalies under confident Cityscapes "stuff" masks (train ids 2..10); it only
    # means something for a model with the Cityscapes classes.
    names = [str(name).lower() for _, name in sorted((int(i), n) for i, n in values.get("id2label", {}).items())]
    if tuple(names) == CITYSCAPES_CLASSES:
        values.update(refine=True, refine_class_ids=list(CITYSCAPES_REFINE_CLASS_IDS))
    else:
        logger.info("the Mask2Former's classes are not Cityscapes': mask refinement is switched off")
        values.update(refine=False, refine_class_ids=[])
    return Mask2AnomalyConfig(**values)


__all__ = [
    "REMOTE_CODE_AUTO_MAP",
    "REMOTE_CODE_CUSTOM_PIPELINES",
    "Mask2AnomalyForUniversalSegmentation",
    "Mask2AnomalyLoss",
    "Mask2AnomalyModel",
    "Mask2AnomalyPreTrainedModel",
    "class_mask_scores",
    "mask2anomaly_config_from_mask2former",
    "mask2former_config_from_mask2anomaly",
    "float32_region",
    "mask_contrastive_loss",
]
