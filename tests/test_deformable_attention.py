"""The pixel decoder's deformable attention: our two forms against transformers' own, values and gradients.

The reference is transformers' `multi_scale_deformable_attention` and its
`Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention` module (independent code: `grid_sample` per level,
stacked), on random inputs with odd level sizes, several levels, batch > 1 and sampling locations that reach
beyond the maps (zero padding).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention,
)
from transformers.models.mask2former.modeling_mask2former import (
    multi_scale_deformable_attention as transformers_attention,
)

from modeling_mask2anomaly import Mask2AnomalyConfig, Mask2AnomalyForUniversalSegmentation
from modeling_mask2anomaly.deformable_attention import (
    Mask2AnomalyMultiscaleDeformableAttention,
    multi_scale_deformable_attention,
    set_deformable_attention_backend,
)

ATOL = 1e-5
FAST_BACKENDS = ("embedding_bag", "grid_sample")  # "transformers" is transformers' function itself
SHAPES = [(7, 9), (4, 5), (2, 3)]  # odd sizes, three levels


def _inputs(batch=2, queries=11, heads=4, head_dim=8, shapes=SHAPES, points=4, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(h * w for h, w in shapes)
    value = torch.randn(batch, tokens, heads, head_dim, generator=generator, dtype=dtype)
    # locations from -0.3 to 1.3: many corners fall outside the maps
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=generator, dtype=dtype) * 1.6 - 0.3
    weights = torch.rand(batch, queries, heads, len(shapes) * points, generator=generator, dtype=dtype).softmax(-1)
    return value, locations, weights.view(batch, queries, heads, len(shapes), points)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize(
    "case",
    [
        dict(),
        dict(batch=3, queries=1, heads=2, head_dim=3, shapes=[(5, 3)], points=1),
        dict(batch=1, queries=40, heads=8, head_dim=32, shapes=[(16, 24), (8, 12), (4, 6), (3, 3)], points=4, seed=3),
    ],
    ids=["odd-3-levels", "one-level-one-point", "4-levels-wide"],
)
def test_equals_transformers_form(backend, case):
    value, locations, weights = _inputs(**case)
    shapes = case.get("shapes", SHAPES)
    expected = transformers_attention(value, shapes, locations, weights)
    got = multi_scale_deformable_attention(value, shapes, locations, weights, backend=backend)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_locations_on_pixel_edges_and_beyond(backend):
    """Locations exactly on map borders, pixel centres and far outside (where everything is zero padding)."""
    value, locations, weights = _inputs(queries=6)
    width, height = SHAPES[0][1], SHAPES[0][0]
    special = torch.tensor([0.0, 1.0, 0.5 / width, 1 - 0.5 / width, -5.0, 7.0, 0.5, -0.5 / width])
    locations[..., 0] = special[torch.randint(len(special), locations[..., 0].shape, generator=torch.Generator().manual_seed(1))]
    locations[..., 1] = special[torch.randint(len(special), locations[..., 1].shape, generator=torch.Generator().manual_seed(2))]
    del height
    expected = transformers_attention(value, SHAPES, locations, weights)
    got = multi_scale_deformable_attention(value, SHAPES, locations, weights, backend=backend)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_gradients_equal_transformers_form(backend):
    value, locations, weights = _inputs(batch=2, queries=13, heads=2, head_dim=4, seed=5)
    grad_output = torch.randn(2, 13, 8, generator=torch.Generator().manual_seed(6))

    def grads(function):
        leaves = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
        (function(*leaves) * grad_output).sum().backward()
        return [t.grad for t in leaves]

    expected = grads(lambda v, loc, w: transformers_attention(v, SHAPES, loc, w))
    got = grads(lambda v, loc, w: multi_scale_deformable_attention(v, SHAPES, loc, w, backend=backend))
    for name, g, e in zip(("value", "sampling_locations", "attention_weights"), got, expected):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-5, msg=lambda m, name=name: f"d/d{name}: {m}")


def _module_pair(seed=0, embed_dim=32, heads=4):
    torch.manual_seed(seed)
    stock = Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention(embed_dim, heads, n_levels=3, n_points=4)
    for parameter in stock.parameters():  # transformers initialises some of these to zero
        torch.nn.init.normal_(parameter, std=0.2)
    ours = copy.deepcopy(stock)
    assert set_deformable_attention_backend(ours) == 1
    assert ours.backend == "embedding_bag"
    assert type(ours) is Mask2AnomalyMultiscaleDeformableAttention
    return stock, ours


def _module_inputs(batch=2, embed_dim=32, reference_dim=2, padded=False, seed=1):
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(h * w for h, w in SHAPES)
    hidden = torch.randn(batch, tokens, embed_dim, generator=generator)
    position = torch.randn(batch, tokens, embed_dim, generator=generator)
    reference = torch.rand(batch, tokens, len(SHAPES), reference_dim, generator=generator)
    mask = torch.rand(batch, tokens, generator=generator) < 0.2 if padded else None
    return dict(
        hidden_states=hidden, attention_mask=mask, encoder_hidden_states=hidden, position_embeddings=position,
        reference_points=reference, spatial_shapes_list=SHAPES,
    )


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("reference_dim,padded", [(2, False), (2, True), (4, False)], ids=["points", "padding", "boxes"])
def test_module_forward_and_parameter_gradients_equal_transformers(backend, reference_dim, padded):
    stock, ours = _module_pair()
    set_deformable_attention_backend(ours, backend=backend)
    inputs = _module_inputs(reference_dim=reference_dim, padded=padded)
    expected, expected_weights = stock(**inputs)
    got, got_weights = ours(**inputs)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_weights, expected_weights, atol=0, rtol=0)
    grad_output = torch.randn_like(expected)
    (expected * grad_output).sum().backward()
    (got * grad_output).sum().backward()
    for (name, p_stock), p_ours in zip(stock.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p_ours.grad, p_stock.grad, atol=1e-4, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_bfloat16_on_cpu_is_close_to_float32(backend):
    """torch 2.13's CPU bfloat16 grid_sample is wrong for a channel-stride-1 value (transformers' layout); both
    our forms must give what float32 gives, to bfloat16 precision."""
    value, locations, weights = _inputs(batch=1, queries=64, heads=8, head_dim=32, shapes=[(32, 64), (16, 32)], seed=7)
    shapes = [(32, 64), (16, 32)]
    expected = transformers_attention(value, shapes, locations, weights)
    got = multi_scale_deformable_attention(
        value.bfloat16(), shapes, locations.bfloat16(), weights.bfloat16(), backend=backend
    )
    assert got.dtype == torch.bfloat16
    # bfloat16 locations are coarse (8 bits): a pixel of a 64-wide map is 1/64, so compare loosely but finitely
    assert torch.isfinite(got).all()
    assert (got.float() - expected).abs().max() < 0.25
    assert (got.float() - expected).abs().mean() < 0.02


def test_transformers_backend_is_bit_for_bit_transformers():
    stock, ours = _module_pair()
    set_deformable_attention_backend(ours, backend="transformers")
    inputs = _module_inputs(padded=True)
    assert torch.equal(ours(**inputs)[0], stock(**inputs)[0])


def test_non_finite_locations_weigh_nothing():
    value, locations, weights = _inputs(queries=4)
    locations[0, 0] = float("nan")
    locations[1, 2, :, 0] = float("inf")
    got = multi_scale_deformable_attention(value, SHAPES, locations, weights, backend="embedding_bag")
    assert torch.isfinite(got).all()


def test_unknown_backend_is_refused():
    value, locations, weights = _inputs()
    with pytest.raises(ValueError, match="backend 'cuda_kernel' is not known.*embedding_bag"):
        multi_scale_deformable_attention(value, SHAPES, locations, weights, backend="cuda_kernel")


def test_spatial_shapes_must_cover_the_tokens():
    _, ours = _module_pair()
    inputs = _module_inputs()
    inputs["spatial_shapes_list"] = [(7, 9), (4, 5)]
    with pytest.raises(ValueError, match=r"spatial shapes .* cover 83 tokens; the encoder states have 89"):
        ours(**inputs)


def test_models_use_it_and_keep_transformers_state_dict():
    config = Mask2AnomalyConfig.tiny()
    model = Mask2AnomalyForUniversalSegmentation(config)
    attentions = [m for m in model.modules() if isinstance(m, Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention)]
    assert attentions and all(type(m) is Mask2AnomalyMultiscaleDeformableAttention for m in attentions)
    assert len(attentions) == config.encoder_layers
    stock = Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention(config.feature_size, config.num_attention_heads, 3, 4)
    assert set(attentions[0].state_dict()) == set(stock.state_dict())
