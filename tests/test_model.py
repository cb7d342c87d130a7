"""Tests of the Mask2Anomaly model: global masked attention, parity with Mask2Former when GMA is off, loss
terms, training steps, gradient checkpointing and determinism."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.nn import functional as F
from transformers import Mask2FormerForUniversalSegmentation

from modeling_mask2anomaly import Mask2AnomalyConfig, Mask2AnomalyForUniversalSegmentation, mask_contrastive_loss
from modeling_mask2anomaly.deformable_attention import set_deformable_attention_backend
from modeling_mask2anomaly.modeling_mask2anomaly import (
    Mask2AnomalyMaskedAttentionDecoderLayer,
    Mask2AnomalyMaskPredictor,
    _reset_fully_blocked_rows,
    mask2former_config_from_mask2anomaly,
)


def _tiny(**kwargs) -> Mask2AnomalyConfig:
    return Mask2AnomalyConfig.tiny(**kwargs)


# ----------------------------------------------------------------------------------------------------------
# Naive references
# ----------------------------------------------------------------------------------------------------------
def naive_mha(mha: torch.nn.MultiheadAttention, query, key, value, block):
    """Multi-head attention from its weights with matmul/softmax; `block` (batch*heads, Q, K) True = blocked.
    Inputs are (length, batch, dim) as nn.MultiheadAttention takes them."""
    dim = mha.embed_dim
    heads = mha.num_heads
    head_dim = dim // heads
    w_q, w_k, w_v = mha.in_proj_weight.split(dim)
    b_q, b_k, b_v = mha.in_proj_bias.split(dim)
    q = query @ w_q.T + b_q
    k = key @ w_k.T + b_k
    v = value @ w_v.T + b_v
    length_q, batch, _ = q.shape
    out = torch.zeros(length_q, batch, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            sl = slice(h * head_dim, (h + 1) * head_dim)
            scores = (q[:, b, sl].double() @ k[:, b, sl].double().T) / math.sqrt(head_dim)
            scores = scores.masked_fill(block[b * heads + h], float("-inf"))
            out[:, b, sl] = scores.softmax(-1) @ v[:, b, sl].double()
    return out.float() @ mha.out_proj.weight.T + mha.out_proj.bias


def _gma_inputs(config, batch=2, queries=None, pixels=15, seed=0):
    g = torch.Generator().manual_seed(seed)
    queries = queries or config.num_queries
    dim = config.hidden_dim
    heads = config.num_attention_heads
    hidden = torch.randn(queries, batch, dim, generator=g)
    qpos = torch.randn(queries, batch, dim, generator=g)
    memory = [torch.randn(pixels, batch, dim, generator=g) for _ in range(3)]
    mpos = [torch.randn(pixels, batch, dim, generator=g) for _ in range(3)]
    logits = torch.randn(batch, queries, pixels, generator=g)
    logits[:, 0] = -5.0  # query 0: fully blocked foreground
    logits[:, 1] = 5.0  # query 1: fully blocked background
    logits[:, 2, :3] = 0.0  # sigmoid exactly 0.5: open to both
    probs = logits.sigmoid().unsqueeze(1).expand(batch, heads, queries, pixels).flatten(0, 1)
    return hidden, qpos, memory, mpos, probs


def test_gma_layer_matches_naive_reference():
    config = _tiny()
    torch.manual_seed(0)
    layer = Mask2AnomalyMaskedAttentionDecoderLayer(config).eval()
    for p in layer.parameters():  # non-trivial biases and norms
        torch.nn.init.normal_(p, std=0.3)
    hidden, qpos, memory, mpos, probs = _gma_inputs(config)
    fg = _reset_fully_blocked_rows(probs < 0.5)
    bg = _reset_fully_blocked_rows(probs > 0.5)
    level = 1
    with torch.no_grad():
        out = layer(hidden, level, None, mpos, qpos, memory, encoder_attention_mask=(fg, bg))[0]

        # reference: GMA, residual, post-norm; then Mask2Former's self-attention and FFN written out
        q = hidden + qpos
        k = memory[level] + mpos[level]
        raw_fg, raw_bg = probs < 0.5, probs > 0.5
        fg_ref = torch.where(raw_fg.all(-1, keepdim=True), torch.zeros_like(raw_fg), raw_fg)
        bg_ref = torch.where(raw_bg.all(-1, keepdim=True), torch.zeros_like(raw_bg), raw_bg)
        assert raw_fg.all(-1).any() and raw_bg.all(-1).any()  # the reset is exercised
        attended = naive_mha(layer.cross_attn, q, k, memory[level], fg_ref) + naive_mha(
            layer.cross_attn_background, q, k, memory[level], bg_ref
        )
        x = F.layer_norm(hidden + attended, (config.hidden_dim,), layer.cross_attn_layer_norm.weight,
                         layer.cross_attn_layer_norm.bias)
        sa = layer.self_attn
        qk = x + qpos
        qs, ks, vs = sa.q_proj(qk), sa.k_proj(qk), sa.v_proj(x)
        heads, hd = config.num_attention_heads, config.hidden_dim // config.num_attention_heads
        attn = torch.zeros_like(x)
        for b in range(x.shape[1]):
            for h in range(heads):
                sl = slice(h * hd, (h + 1) * hd)
                w = (qs[:, b, sl] @ ks[:, b, sl].T / math.sqrt(hd)).softmax(-1)
                attn[:, b, sl] = w @ vs[:, b, sl]
        x = F.layer_norm(x + sa.out_proj(attn), (config.hidden_dim,), layer.self_attn_layer_norm.weight,
                         layer.self_attn_layer_norm.bias)
        y = layer.fc2(F.relu(layer.fc1(x)))
        ref = F.layer_norm(x + y, (config.hidden_dim,), layer.final_layer_norm.weight, layer.final_layer_norm.bias)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_gma_uses_both_attentions():
    """Zeroing the background attention's output changes the result: both branches contribute."""
    config = _tiny()
    torch.manual_seed(1)
    layer = Mask2AnomalyMaskedAttentionDecoderLayer(config).eval()
    hidden, qpos, memory, mpos, probs = _gma_inputs(config)
    masks = (_reset_fully_blocked_rows(probs < 0.5), _reset_fully_blocked_rows(probs > 0.5))
    with torch.no_grad():
        a = layer(hidden, 0, None, mpos, qpos, memory, encoder_attention_mask=masks)[0]
        layer.cross_attn_background.out_proj.weight.zero_()
        layer.cross_attn_background.out_proj.bias.zero_()
        b = layer(hidden, 0, None, mpos, qpos, memory, encoder_attention_mask=masks)[0]
    assert (a - b).abs().max() > 1e-3


def test_mask_predictor_blocks_and_reset():
    config = _tiny()
    predictor = Mask2AnomalyMaskPredictor(config.hidden_dim, config.num_attention_heads, config.mask_feature_size)
    torch.manual_seed(2)
    queries = torch.randn(config.num_queries, 2, config.hidden_dim)
    pixel_embeddings = torch.randn(2, config.mask_feature_size, 8, 12)
    logits, (fg, bg) = predictor(queries, pixel_embeddings, (4, 6))
    expected_logits = torch.einsum("bqc,bchw->bqhw", predictor.mask_embedder(queries.transpose(0, 1)), pixel_embeddings)
    torch.testing.assert_close(logits, expected_logits)
    resized = F.interpolate(expected_logits, size=(4, 6), mode="bilinear", align_corners=False).sigmoid().flatten(2)
    heads = config.num_attention_heads
    for b in range(2):
        for h in range(heads):
            assert torch.equal(fg[b * heads + h], resized[b] < 0.5)
            assert torch.equal(bg[b * heads + h], resized[b] > 0.5)
    block = torch.tensor([[True, True, True], [True, False, True], [False, False, False]])
    assert _reset_fully_blocked_rows(block).tolist() == [[False] * 3, [True, False, True], [False] * 3]


# ----------------------------------------------------------------------------------------------------------
# GMA off is Mask2Former
# ----------------------------------------------------------------------------------------------------------
def test_gma_off_equals_stock_mask2former():
    config = _tiny(global_masked_attention=False)
    torch.manual_seed(3)
    stock = Mask2FormerForUniversalSegmentation(mask2former_config_from_mask2anomaly(config)).eval()
    ours = Mask2AnomalyForUniversalSegmentation(config).eval()
    ours.load_state_dict(stock.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 96)
    # bit for bit with transformers' deformable attention; our faster default form agrees to float32 rounding
    set_deformable_attention_backend(ours, "transformers")
    with torch.no_grad():
        a = stock(x, output_auxiliary_logits=True)
        b = ours(x, output_auxiliary_logits=True)
    assert torch.equal(a.class_queries_logits, b.class_queries_logits)
    assert torch.equal(a.masks_queries_logits, b.masks_queries_logits)
    for aux_a, aux_b in zip(a.auxiliary_logits, b.auxiliary_logits):
        assert torch.equal(aux_a["masks_queries_logits"], aux_b["masks_queries_logits"])
    set_deformable_attention_backend(ours)
    with torch.no_grad():
        c = ours(x, output_auxiliary_logits=True)
    torch.testing.assert_close(c.class_queries_logits, a.class_queries_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(c.masks_queries_logits, a.masks_queries_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", ["tiny", "paper"])
def test_parameter_count_is_one_attention_per_layer(which):
    config = getattr(Mask2AnomalyConfig, which)()
    with torch.device("meta"):
        ours = Mask2AnomalyForUniversalSegmentation(config)
        stock = Mask2FormerForUniversalSegmentation(mask2former_config_from_mask2anomaly(config))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    d = config.hidden_dim
    layers = config.decoder_layers - 1
    # nn.MultiheadAttention: packed q/k/v projection (3d x d + 3d) and output projection (d x d + d)
    assert count(ours) - count(stock) == layers * (4 * d * d + 4 * d)


# ----------------------------------------------------------------------------------------------------------
# Losses through the model
# ----------------------------------------------------------------------------------------------------------
def _labels(batch_sizes=((3, 64, 96), (1, 64, 96)), seed=0):
    g = torch.Generator().manual_seed(seed)
    mask_labels = [(torch.rand(n, h, w, generator=g) > 0.5).float() for n, h, w in batch_sizes]
    class_labels = [torch.randint(0, 19, (n,), generator=g) for n, _, _ in batch_sizes]
    outlier = torch.zeros(len(batch_sizes), 64, 96)
    outlier[0, 10:30, 20:50] = 1
    outlier[1, :, :5] = 255  # ignored
    return mask_labels, class_labels, outlier


def test_deep_supervision_adds_one_contrastive_term_per_auxiliary_output():
    config = _tiny(contrastive_weight=0.7)
    torch.manual_seed(4)
    model = Mask2AnomalyForUniversalSegmentation(config).eval()
    x = torch.randn(2, 3, 64, 96)
    mask_labels, class_labels, outlier = _labels()
    with torch.no_grad():
        out = model(x, mask_labels=mask_labels, class_labels=class_labels, outlier_labels=outlier,
                    output_auxiliary_logits=True)
    keys = sorted(k for k in out.loss_dict if k.startswith("loss_contrastive"))
    assert keys == ["loss_contrastive"] + [f"loss_contrastive_{i}" for i in range(config.decoder_layers - 1)]
    expected = 0.7 * mask_contrastive_loss(out.class_queries_logits, out.masks_queries_logits, outlier)
    torch.testing.assert_close(out.loss_dict["loss_contrastive"], expected)
    for i, aux in enumerate(out.auxiliary_logits):
        expected = 0.7 * mask_contrastive_loss(aux["class_queries_logits"], aux["masks_queries_logits"], outlier)
        torch.testing.assert_close(out.loss_dict[f"loss_contrastive_{i}"], expected)
    torch.testing.assert_close(out.loss, sum(out.loss_dict.values()))
    assert {"loss_cross_entropy", "loss_mask", "loss_dice", "loss_dice_0"} <= set(out.loss_dict)


def test_contrastive_off_and_without_outlier_labels():
    torch.manual_seed(5)
    x = torch.randn(1, 3, 64, 64)
    mask_labels, class_labels = [torch.ones(1, 64, 64)], [torch.tensor([0])]
    outlier = torch.zeros(1, 64, 64)
    model = Mask2AnomalyForUniversalSegmentation(_tiny(contrastive_loss="none"))
    out = model(x, mask_labels=mask_labels, class_labels=class_labels, outlier_labels=outlier)
    assert not any(k.startswith("loss_contrastive") for k in out.loss_dict)
    out = Mask2AnomalyForUniversalSegmentation(_tiny())(x, mask_labels=mask_labels, class_labels=class_labels)
    assert not any(k.startswith("loss_contrastive") for k in out.loss_dict)


def test_return_dict_false_puts_scalar_loss_first():
    torch.manual_seed(6)
    model = Mask2AnomalyForUniversalSegmentation(_tiny())
    mask_labels, class_labels, outlier = _labels()
    out = model(torch.randn(2, 3, 64, 96), mask_labels=mask_labels, class_labels=class_labels,
                outlier_labels=outlier, return_dict=False)
    assert out[0].dim() == 0 and out[0].requires_grad
    out[0].backward()


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(7)
    model = Mask2AnomalyForUniversalSegmentation(_tiny(train_num_points=512)).train()
    x = torch.randn(2, 3, 64, 96)
    mask_labels, class_labels, outlier = _labels()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(15):
        torch.manual_seed(0)  # same point sampling every step: the loss is a fixed function of the weights
        loss = model(x, mask_labels=mask_labels, class_labels=class_labels, outlier_labels=outlier).loss
        optimizer.zero_grad()
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(8)
    model = Mask2AnomalyForUniversalSegmentation(_tiny()).train()
    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in checkpointed.model.transformer_module.decoder.layers)
    x = torch.randn(2, 3, 64, 96)
    mask_labels, class_labels, outlier = _labels()
    for m in (model, checkpointed):
        torch.manual_seed(0)
        m(x, mask_labels=mask_labels, class_labels=class_labels, outlier_labels=outlier).loss.backward()
    for (name, a), b in zip(model.named_parameters(), checkpointed.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_eval_mode_is_deterministic():
    torch.manual_seed(9)
    model = Mask2AnomalyForUniversalSegmentation(_tiny()).eval()
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a.masks_queries_logits, b.masks_queries_logits)
    assert torch.equal(a.class_queries_logits, b.class_queries_logits)


def _num_masks_worker(rank: int, init_file: str, counts: list[int], results) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(counts))
    try:
        model = Mask2AnomalyForUniversalSegmentation(_tiny())
        class_labels = [torch.zeros(counts[rank], dtype=torch.long)]
        results[rank] = float(model.criterion.get_num_masks(class_labels, torch.device("cpu")))
    finally:
        torch.distributed.destroy_process_group()


def test_mask_count_is_the_mean_over_processes(tmp_path):
    """detectron2 normalises the mask losses by the mean number of target masks per process (transformers
    divides by the number of processes twice); checked with two real gloo processes."""
    counts = [3, 6]
    with torch.multiprocessing.Manager() as manager:
        results = manager.dict()
        torch.multiprocessing.spawn(
            _num_masks_worker, args=(str(tmp_path / "rendezvous"), counts, results), nprocs=len(counts)
        )
        assert dict(results) == {0: 4.5, 1: 4.5}
    single = Mask2AnomalyForUniversalSegmentation(_tiny()).criterion
    assert float(single.get_num_masks([torch.zeros(3), torch.zeros(2)], torch.device("cpu"))) == 5.0
    assert float(single.get_num_masks([torch.zeros(0)], torch.device("cpu"))) == 1.0
