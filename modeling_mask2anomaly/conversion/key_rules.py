"""Where each official (detectron2) checkpoint key lands in transformers' Mask2Former / Mask2Anomaly.

One `KeyRule` per family of keys: a regex over official names and the target name(s) a match becomes. Keys with
no counterpart are listed in `DROPPED` (with why); Swin's `relative_position_index` buffers are recomputed by
transformers and only checked.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

# Where each part of the official model lands in transformers' Mask2Former / Mask2Anomaly.
BACKBONE = "model.pixel_level_module.encoder."
PIXEL_DECODER = "model.pixel_level_module.decoder."
TRANSFORMER = "model.transformer_module."
DECODER_LAYERS = TRANSFORMER + "decoder.layers."


@dataclass(frozen=True)
class KeyRule:
    """A regex over official keys and the target key(s) a match becomes; `split` cuts a fused projection
    (`nn.MultiheadAttention.in_proj_*`, Swin `qkv`) into that many equal row blocks, one per target."""

    pattern: re.Pattern
    targets: Callable[[re.Match], list[str]]
    split: int = 1


def _rule(pattern: str, *targets: str | Callable[[re.Match], str], split: int = 1) -> KeyRule:
    def expand(match: re.Match) -> list[str]:
        return [t(match) if callable(t) else match.expand(t) for t in targets]

    return KeyRule(re.compile(pattern + r"\Z"), expand, split)


_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_WB = r"(weight|bias)"


def _stage(match: re.Match, group: int = 1) -> str:
    # detectron2 names stages res2..res5, transformers counts them from 0
    return str(int(match.group(group)) - 2)


def resnet_rules() -> list[KeyRule]:
    stage = BACKBONE + "encoder.stages."
    return [
        _rule(r"backbone\.stem\.conv1\.weight", BACKBONE + "embedder.embedder.convolution.weight"),
        _rule(r"backbone\.stem\.conv1\.norm\." + _BN, BACKBONE + r"embedder.embedder.normalization.\1"),
        _rule(
            r"backbone\.res([2-5])\.(\d+)\.conv([1-3])\.weight",
            lambda m: f"{stage}{_stage(m)}.layers.{m[2]}.layer.{int(m[3]) - 1}.convolution.weight",
        ),
        _rule(
            r"backbone\.res([2-5])\.(\d+)\.conv([1-3])\.norm\." + _BN,
            lambda m: f"{stage}{_stage(m)}.layers.{m[2]}.layer.{int(m[3]) - 1}.normalization.{m[4]}",
        ),
        _rule(
            r"backbone\.res([2-5])\.(\d+)\.shortcut\.weight",
            lambda m: f"{stage}{_stage(m)}.layers.{m[2]}.shortcut.convolution.weight",
        ),
        _rule(
            r"backbone\.res([2-5])\.(\d+)\.shortcut\.norm\." + _BN,
            lambda m: f"{stage}{_stage(m)}.layers.{m[2]}.shortcut.normalization.{m[3]}",
        ),
    ]


def swin_rules() -> list[KeyRule]:
    swin = BACKBONE + "swin."
    block = r"backbone\.layers\.(\d+)\.blocks\.(\d+)\."
    target = swin + r"encoder.layers.\1.blocks.\2."
    return [
        _rule(r"backbone\.patch_embed\.proj\." + _WB, swin + r"embeddings.patch_embeddings.projection.\1"),
        _rule(r"backbone\.patch_embed\.norm\." + _WB, swin + r"embeddings.norm.\1"),
        _rule(block + r"norm1\." + _WB, target + r"layernorm_before.\3"),
        _rule(block + r"norm2\." + _WB, target + r"layernorm_after.\3"),
        # qkv rows: [0:C] query, [C:2C] key, [2C:3C] value
        _rule(
            block + r"attn\.qkv\." + _WB,
            target + r"attention.q_proj.\3",
            target + r"attention.k_proj.\3",
            target + r"attention.v_proj.\3",
            split=3,
        ),
        _rule(block + r"attn\.proj\." + _WB, target + r"attention.o_proj.\3"),
        _rule(
            block + r"attn\.relative_position_bias_table",
            target + "attention.relative_position_bias.relative_position_bias_table",
        ),
        _rule(block + r"mlp\.(fc1|fc2)\." + _WB, target + r"mlp.\3.\4"),
        _rule(r"backbone\.layers\.(\d+)\.downsample\.reduction\.weight", swin + r"encoder.layers.\1.downsample.reduction.weight"),
        _rule(r"backbone\.layers\.(\d+)\.downsample\.norm\." + _WB, swin + r"encoder.layers.\1.downsample.norm.\2"),
        # D2SwinTransformer's per-output norms norm0..norm3 are transformers' hidden_states_norms stage1..4
        _rule(r"backbone\.norm([0-3])\." + _WB, lambda m: f"{BACKBONE}hidden_states_norms.stage{int(m[1]) + 1}.{m[2]}"),
    ]


def _renamed(source_prefix: str, target_prefix: str, names: Mapping[str, str]) -> list[KeyRule]:
    """Rules for `weight`/`bias` of modules that only change name under a prefix with one index group."""
    return [
        _rule(source_prefix + re.escape(old) + r"\." + _WB, target_prefix + new + r".\2") for old, new in names.items()
    ]


def head_rules() -> list[KeyRule]:
    pd = r"sem_seg_head\.pixel_decoder\."
    enc = pd + r"transformer\.encoder\.layers\.(\d+)\."
    enc_t = PIXEL_DECODER + r"encoder.layers.\1."
    pr = r"sem_seg_head\.predictor\."
    sa = pr + r"transformer_self_attention_layers\.(\d+)\."
    ca = pr + r"transformer_cross_attention_layers\.(\d+)\."
    ffn = pr + r"transformer_ffn_layers\.(\d+)\."
    layer = DECODER_LAYERS + r"\1."
    return [
        # pixel decoder; input_proj is ordered res5, res4, res3 in both implementations
        _rule(pd + r"input_proj\.(\d+)\.([01])\." + _WB, PIXEL_DECODER + r"input_projections.\1.\2.\3"),
        _rule(pd + r"transformer\.level_embed", PIXEL_DECODER + "level_embed"),
        _rule(
            enc + r"self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\." + _WB,
            enc_t + r"self_attn.\2.\3",
        ),
        *_renamed(enc, enc_t, {"norm1": "self_attn_layer_norm", "linear1": "fc1", "linear2": "fc2", "norm2": "final_layer_norm"}),
        _rule(pd + r"mask_features\." + _WB, PIXEL_DECODER + r"mask_projection.\1"),
        # extra FPN levels: detectron2 Conv2d(norm=GN) -> Sequential(Conv2d, GroupNorm, ...)
        _rule(pd + r"(adapter_\d+|layer_\d+)\.weight", PIXEL_DECODER + r"\1.0.weight"),
        _rule(pd + r"(adapter_\d+|layer_\d+)\.norm\." + _WB, PIXEL_DECODER + r"\1.1.\2"),
        # transformer decoder
        _rule(
            sa + r"self_attn\.in_proj_(weight|bias)",
            layer + r"self_attn.q_proj.\2",
            layer + r"self_attn.k_proj.\2",
            layer + r"self_attn.v_proj.\2",
            split=3,
        ),
        _rule(sa + r"self_attn\.out_proj\." + _WB, layer + r"self_attn.out_proj.\2"),
        _rule(sa + r"norm\." + _WB, layer + r"self_attn_layer_norm.\2"),
        # GMA: foreground attention = transformers' cross_attn, background = cross_attn_background;
        # plain Mask2Former checkpoints call the single one multihead_attn
        _rule(
            ca + r"(?:multihead_attn_foreground|multihead_attn)\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
            layer + r"cross_attn.\2",
        ),
        _rule(
            ca + r"multihead_attn_background\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
            layer + r"cross_attn_background.\2",
        ),
        _rule(ca + r"norm\." + _WB, layer + r"cross_attn_layer_norm.\2"),
        *_renamed(ffn, layer, {"linear1": "fc1", "linear2": "fc2", "norm": "final_layer_norm"}),
        _rule(pr + r"decoder_norm\." + _WB, TRANSFORMER + r"decoder.layernorm.\1"),
        _rule(pr + r"query_feat\.weight", TRANSFORMER + "queries_features.weight"),
        _rule(pr + r"query_embed\.weight", TRANSFORMER + "queries_embedder.weight"),
        _rule(pr + r"level_embed\.weight", TRANSFORMER + "level_embed.weight"),
        _rule(pr + r"input_proj\.(\d+)\." + _WB, TRANSFORMER + r"input_projections.\1.\2"),
        _rule(pr + r"class_embed\." + _WB, r"class_predictor.\1"),
        _rule(pr + r"mask_embed\.layers\.(\d+)\." + _WB, TRANSFORMER + r"decoder.mask_predictor.mask_embedder.\1.0.\2"),
    ]


# Official keys with no counterpart, dropped on purpose (why, in the comment of each).
DROPPED = [
    # GlobalCrossAttentionLayer owns a Conv2d(200, 100, 1) that its forward never calls
    re.compile(r"sem_seg_head\.predictor\.transformer_cross_attention_layers\.\d+\.fusion_layer\.(weight|bias)\Z"),
    # the no-object class weight of the loss: rebuilt from config.no_object_weight (checked below)
    re.compile(r"criterion\.empty_weight\Z"),
]
SWIN_INDEX = re.compile(r"backbone\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_index\Z")


def relative_position_index(window: int) -> torch.Tensor:
    """Swin's relative position index for a `window` x `window` window: (dh + w - 1) * (2w - 1) + (dw + w - 1)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]



__all__ = [
    "BACKBONE",
    "DECODER_LAYERS",
    "DROPPED",
    "PIXEL_DECODER",
    "SWIN_INDEX",
    "TRANSFORMER",
    "KeyRule",
    "head_rules",
    "relative_position_index",
    "resnet_rules",
    "swin_rules",
]
