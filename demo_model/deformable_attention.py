"""A faster multi-scale deformable attention for the pixel decoder, swapped into transformers' Mask2Former.

transformers' `multi_scale_deformable_attention` samples every level with `grid_sample` into a
`(batch * heads, head_dim, queries, points)` tensor, stacks the levels, multiplies by the attention weights and
sums: the stacked samples (`levels * points` values per query, head and channel) are written and read several
times, and `grid_sample` reads a value tensor whose channel stride is 1. On a CPU that is two thirds of the
model's time at 1024x2048 (benchmarks/RESULTS.md). Here the mathematics are the same, in one of two forms:

- `"embedding_bag"` (the default for eager PyTorch and `torch.compile`): bilinear sampling with zero padding is
  a weighted sum of at most four value rows per sampling point, so the whole attention of one query and head is
  a weighted sum of `levels * points * 4` rows of the projected value, read where `value_proj` wrote them
  (`(batch, tokens, heads, head_dim)`, one row of `head_dim` contiguous numbers per token and head). The
  corner indices and the weights (bilinear weight x attention weight, zero outside the feature map) are
  computed once, and `torch.nn.functional.embedding_bag(mode="sum", per_sample_weights=...)` does the gather
  and the weighted sum in one pass, writing `(batch, queries, heads * head_dim)` directly. Nothing of the size
  of the stacked samples is materialised. Gradients flow to the value (through the gather) and to the sampling
  locations and attention weights (through the corner weights), which is what `grid_sample`'s backward
  computes, so it trains the same.
- `"grid_sample"` (what `mask2anomaly-export` uses: ONNX has a standard `GridSample`, and no embedding bag):
  the level-by-level `grid_sample` form, accumulating the weighted sum of each level instead of stacking the
  levels, with the value laid out `(batch * heads, head_dim, height, width)` contiguously (which is also
  what the CPU bfloat16 `grid_sample` kernel needs to be correct in torch 2.13) and the sampling grid in the
  value's dtype (a float64 grid next to float32 values is what made an ONNX Runtime refuse an earlier
  export: `GridSample` has no mixed-type kernel).
- `"transformers"`: transformers' own function, bit for bit what `Mask2FormerForUniversalSegmentation` computes
  (for exact comparisons and as the benchmarks' reference).

The two fast forms agree with transformers' to float32 rounding (about 1e-6 on random inputs).

[`Mask2AnomalyMultiscaleDeformableAttention`] subclasses transformers'
`Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention` (same parameters, same state dict) and replaces
its forward; [`set_deformable_attention_backend`] swaps it into a built model (or changes its form).

This file travels to the Hub as remote code: it imports only torch and transformers.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention,
)
from transformers.models.mask2former.modeling_mask2former import (
    multi_scale_deformable_attention as transformers_multi_scale_deformable_attention,
)

DeformableAttentionBackend = Literal["embedding_bag", "grid_sample", "transformers"]
DEFORMABLE_ATTENTION_BACKENDS: tuple[str, ...] = ("embedding_bag", "grid_sample", "transformers")


def _level_sizes(spatial_shapes_list: list[tuple[int, int]], like: Tensor) -> Tensor:
    """`(levels, 2)` tensor of `(width, height)` per level, in `like`'s dtype and device."""
    return torch.tensor([[width, height] for height, width in spatial_shapes_list], dtype=like.dtype, device=like.device)


def _check_backend(backend: str) -> None:
    if backend not in DEFORMABLE_ATTENTION_BACKENDS:
        raise ValueError(
            f"deformable attention backend {backend!r} is not known; expected one of {DEFORMABLE_ATTENTION_BACKENDS}"
        )


def _padded_value_table(value: Tensor, spatial_shapes_list: list[tuple[int, int]]) -> tuple[Tensor, list[int]]:
    """The value rows with a border of zeros around each level, as a `(rows, head_dim)` table.

    Row `((b * padded_tokens + padded_start[l] + (y + 1) * (width + 2) + (x + 1)) * heads + h)` holds
    `value[b, start[l] + y * width + x, h]` for `-1 <= x <= width`, `-1 <= y <= height` (zero on the border);
    `width + 4` zero tokens follow each image, so that the corners one past a clamped coordinate (which weigh 0)
    stay inside the table. Returns the table and `padded_start`.
    """
    batch, tokens, heads, head_dim = value.shape
    padded_start = [0]
    for height, width in spatial_shapes_list:
        padded_start.append(padded_start[-1] + (height + 2) * (width + 2))
    padded_tokens = padded_start[-1] + max(width for _, width in spatial_shapes_list) + 4
    table = value.new_zeros(batch, padded_tokens, heads, head_dim)
    start = 0
    for level, (height, width) in enumerate(spatial_shapes_list):
        block = table[:, padded_start[level] : padded_start[level + 1]].view(batch, height + 2, width + 2, heads, head_dim)
        block[:, 1:-1, 1:-1] = value[:, start : start + height * width].view(batch, height, width, heads, head_dim)
        start += height * width
    return table.view(batch * padded_tokens * heads, head_dim), padded_start[:-1] + [padded_tokens]


def deformable_attention_embedding_bag(
    value: Tensor,
    spatial_shapes_list: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention as one weighted gather (`embedding_bag`) of value rows.

    Args:
        value: `(batch, tokens, heads, head_dim)`, the levels' tokens concatenated in `spatial_shapes_list` order
            (row-major within a level).
        spatial_shapes_list: `(height, width)` of each level; their areas sum to `tokens`.
        sampling_locations: `(batch, queries, heads, levels, points, 2)`, `(x, y)` in `[0, 1]` of each level
            (outside is zero padding), as transformers' form takes them.
        attention_weights: `(batch, queries, heads, levels, points)`.

    Returns:
        `(batch, queries, heads * head_dim)`, equal to transformers' `multi_scale_deformable_attention`
        (`grid_sample` with `align_corners=False`, zero padding). Non-finite locations weigh nothing.
    """
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    table, padded_start = _padded_value_table(value, spatial_shapes_list)
    padded_tokens = padded_start.pop()
    device = value.device
    sizes = _level_sizes(spatial_shapes_list, sampling_locations)[:, None, :]  # (levels, 1, 2): (width, height)
    # pixel coordinates, computed as grid_sample does for align_corners=False from the grid 2 * loc - 1; clamped
    # to [-1, size] (beyond that both corners are zero padding, and the gradient is zero there as well)
    coordinates = (2 * sampling_locations - 1 + 1) * (sizes / 2) - 0.5
    coordinates = torch.nan_to_num(coordinates, nan=-1.0).clamp(min=sizes.new_full((), -1.0), max=sizes)
    low = coordinates.floor()
    frac = coordinates - low
    index_dtype = torch.int64 if table.shape[0] + 2 * padded_tokens * heads >= 2**31 else torch.int32
    # row of corner (low_x, low_y): low_x * heads + low_y * (width + 2) * heads + base[b, h, level]
    widths = [width for _, width in spatial_shapes_list]
    axis_strides = torch.tensor([[heads, (width + 2) * heads] for width in widths], dtype=index_dtype, device=device)
    level_base = torch.tensor(
        [(start + width + 3) * heads for start, width in zip(padded_start, widths)], dtype=index_dtype, device=device
    )
    base = (
        torch.arange(batch, dtype=index_dtype, device=device)[:, None, None, None, None] * (padded_tokens * heads)
        + torch.arange(heads, dtype=index_dtype, device=device)[:, None, None]
        + level_base[:, None]
    )  # (batch, 1, heads, levels, 1) against (batch, queries, heads, levels, points)
    corner_offsets = torch.tensor(
        [[0, heads, (width + 2) * heads, (width + 3) * heads] for width in widths], dtype=index_dtype, device=device
    )[:, None, :]  # (levels, 1, 4): corners (x0, y0), (x1, y0), (x0, y1), (x1, y1)
    index = (low.to(index_dtype) * axis_strides[:, None, :]).sum(-1, dtype=index_dtype) + base
    index = (index[..., None] + corner_offsets).view(batch * queries * heads, levels * points * 4)
    axis_weights = torch.stack((1 - frac, frac), dim=-1)  # (..., 2 axes, 2 corners)
    weight_y = axis_weights[..., 1, :] * attention_weights[..., None].to(axis_weights.dtype)
    weights = (weight_y[..., :, None] * axis_weights[..., 0, None, :]).view(batch * queries * heads, -1)
    output = F.embedding_bag(index, table, per_sample_weights=weights.to(table.dtype), mode="sum")
    return output.view(batch, queries, heads * head_dim)


def deformable_attention_grid_sample(
    value: Tensor,
    spatial_shapes_list: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention with one `grid_sample` per level, accumulated level by level.

    Same arguments, shapes and result as [`deformable_attention_embedding_bag`]; only standard ONNX operators
    (`GridSample`, `Mul`, `ReduceSum`, `Add`, reshapes) when exported.
    """
    batch, tokens, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    # (batch, tokens, heads, head_dim) -> (batch, heads, head_dim, tokens), contiguous: each level's slice is
    # then a (batch * heads, head_dim, height, width) map whose planes are contiguous
    value = value.permute(0, 2, 3, 1).contiguous()
    grids = (2 * sampling_locations - 1).to(value.dtype).transpose(1, 2)  # (batch, heads, queries, levels, points, 2)
    weights = attention_weights.to(value.dtype).transpose(1, 2)  # (batch, heads, queries, levels, points)
    output = None
    start = 0
    for level, (height, width) in enumerate(spatial_shapes_list):
        value_level = value[..., start : start + height * width].reshape(batch * heads, head_dim, height, width)
        start += height * width
        grid = grids[:, :, :, level].reshape(batch * heads, queries, points, 2)
        sampled = F.grid_sample(value_level, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # (batch * heads, head_dim, queries, points) x (batch * heads, 1, queries, points) -> sum over points
        level_output = (sampled * weights[:, :, :, level].reshape(batch * heads, 1, queries, points)).sum(-1)
        output = level_output if output is None else output + level_output
    return output.view(batch, heads * head_dim, queries).transpose(1, 2)


def multi_scale_deformable_attention(
    value: Tensor,
    spatial_shapes_list: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    backend: DeformableAttentionBackend = "embedding_bag",
) -> Tensor:
    """Multi-scale deformable attention, `(batch, queries, heads * head_dim)`, by `backend` (see module doc).

    Drop-in for transformers' function of the same name (same arguments; `value` `(batch, tokens, heads,
    head_dim)`, `sampling_locations` `(batch, queries, heads, levels, points, 2)` in `[0, 1]`,
    `attention_weights` `(batch, queries, heads, levels, points)`).
    """
    _check_backend(backend)
    if backend == "embedding_bag":
        return deformable_attention_embedding_bag(value, spatial_shapes_list, sampling_locations, attention_weights)
    if backend == "transformers":
        return transformers_multi_scale_deformable_attention(
            value, spatial_shapes_list, sampling_locations, attention_weights
        )
    return deformable_attention_grid_sample(value, spatial_shapes_list, sampling_locations, attention_weights)


class Mask2AnomalyMultiscaleDeformableAttention(Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention):
    """transformers' pixel-decoder deformable attention (same parameters) with [`multi_scale_deformable_attention`].

    `backend` (an attribute, not a parameter: it does not change the state dict) chooses the form;
    `mask2anomaly-export` sets `"grid_sample"`.
    """

    backend: DeformableAttentionBackend = "embedding_bag"

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        position_embeddings: Tensor | None = None,
        reference_points: Tensor | None = None,
        spatial_shapes_list: list[tuple[int, int]] | None = None,
        level_start_index: Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Same signature and outputs as transformers' forward: `(batch, queries, embed_dim)` and the attention
        weights `(batch, queries, heads, levels, points)`.

        `hidden_states` `(batch, queries, embed_dim)` are the queries, `encoder_hidden_states` `(batch, tokens,
        embed_dim)` the flattened levels, `attention_mask` `(batch, tokens)` True where a token is padding,
        `reference_points` `(batch, queries, levels, 2)` (or `4` for boxes).
        """
        if position_embeddings is not None:
            hidden_states = hidden_states + position_embeddings
        batch, queries, _ = hidden_states.shape
        _, tokens, _ = encoder_hidden_states.shape
        if sum(height * width for height, width in spatial_shapes_list) != tokens:
            raise ValueError(
                f"spatial shapes {spatial_shapes_list} cover "
                f"{sum(height * width for height, width in spatial_shapes_list)} tokens; the encoder states have {tokens}"
            )
        value = self.value_proj(encoder_hidden_states)
        if attention_mask is not None:
            value = value.masked_fill(attention_mask[..., None], 0.0)
        value = value.view(batch, tokens, self.n_heads, self.d_model // self.n_heads)
        sampling_offsets = self.sampling_offsets(hidden_states).view(
            batch, queries, self.n_heads, self.n_levels, self.n_points, 2
        )
        attention_weights = F.softmax(
            self.attention_weights(hidden_states).view(batch, queries, self.n_heads, self.n_levels * self.n_points), -1
        ).view(batch, queries, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            # a float normaliser in the offsets' dtype (transformers' is int64, which the legacy ONNX exporter
            # turned into float64 arithmetic)
            normalizer = _level_sizes(spatial_shapes_list, sampling_offsets)
            sampling_locations = (
                reference_points[:, :, None, :, None, :] + sampling_offsets / normalizer[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            sampling_locations = (
                reference_points[:, :, None, :, None, :2]
                + sampling_offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(f"the last dimension of reference_points must be 2 or 4; got {reference_points.shape[-1]}")
        output = multi_scale_deformable_attention(
            value, spatial_shapes_list, sampling_locations, attention_weights, backend=self.backend
        )
        return self.output_proj(output), attention_weights


def set_deformable_attention_backend(module: nn.Module, backend: DeformableAttentionBackend = "embedding_bag") -> int:
    """Make every transformers pixel-decoder deformable attention inside `module` a
    [`Mask2AnomalyMultiscaleDeformableAttention`] with `backend` (in place: same parameters, same state dict);
    our model classes call it with the default, `mask2anomaly-export` with `"grid_sample"`.

    Returns the number of attention modules set.
    """
    _check_backend(backend)
    count = 0
    for submodule in module.modules():
        if isinstance(submodule, Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention):
            submodule.__class__ = Mask2AnomalyMultiscaleDeformableAttention
            submodule.backend = backend
            count += 1
    return count
