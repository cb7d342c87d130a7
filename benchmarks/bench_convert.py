"""Benchmark: converting a full-size official Mask2Anomaly checkpoint (the paper's ResNet-50 Cityscapes shapes).

Builds, with the official detectron2 key names, the state dict the released model has: ResNet-50 (BatchNorm
with `num_batches_tracked`), MSDeformAttn pixel decoder (256 channels, 6 encoder layers, FFN 1024), the GMA
transformer decoder (9 layers, 100 queries, hidden 256, 8 heads, FFN 2048, the unused `fusion_layer`), 19 classes
and `criterion.empty_weight`, filled with random values; saves it as detectron2 does (`{"model": ...}`), with
an official-style partial YAML whose `_BASE_` holds a `!!python/object/apply:eval` tag. Then runs the
conversion in fresh subprocesses and reports wall time and peak RSS (median of `--repeats`).

    python benchmarks/bench_convert.py [--repeats 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

# The released Cityscapes configuration (configs/cityscapes/semantic-segmentation/anomaly_inference.yaml and
# its base), as the authors ship it: partial, relying on detectron2 / Mask2Former defaults.
PAPER_BASE_YAML = """\
MODEL:
  BACKBONE:
    FREEZE_AT: 0
    NAME: "build_resnet_backbone"
  WEIGHTS: "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
  PIXEL_MEAN: [123.675, 116.280, 103.530]
  PIXEL_STD: [58.395, 57.120, 57.375]
  RESNETS:
    DEPTH: 50
    STEM_TYPE: "basic"  # not used
    STEM_OUT_CHANNELS: 64
    STRIDE_IN_1X1: False
    OUT_FEATURES: ["res2", "res3", "res4", "res5"]
    NORM: "SyncBN"
    RES5_MULTI_GRID: [1, 1, 1]  # not used
DATASETS:
  TRAIN: ("cityscapes_fine_sem_seg_train",)
  TEST: ("cityscapes_fine_sem_seg_val",)
INPUT:
  MIN_SIZE_TRAIN: !!python/object/apply:eval ["{eval_payload}"]
  MIN_SIZE_TRAIN_SAMPLING: "choice"
  MIN_SIZE_TEST: 1024
  MAX_SIZE_TRAIN: 4096
  MAX_SIZE_TEST: 2048
  CROP:
    ENABLED: True
    TYPE: "absolute"
    SIZE: (512, 1024)
  FORMAT: "RGB"
  DATASET_MAPPER_NAME: "mask_former_semantic"
VERSION: 2
"""

PAPER_YAML = """\
_BASE_: base/Base-Cityscapes-SemanticSegmentation.yaml
MODEL:
  META_ARCHITECTURE: "MaskFormer"
  RESNETS:
    NORM: "BN"
  SEM_SEG_HEAD:
    NAME: "MaskFormerHead"
    IGNORE_VALUE: 255
    NUM_CLASSES: 19
    LOSS_WEIGHT: 1.0
    CONVS_DIM: 256
    MASK_DIM: 256
    NORM: "GN"
    PIXEL_DECODER_NAME: "MSDeformAttnPixelDecoder"
    IN_FEATURES: ["res2", "res3", "res4", "res5"]
    DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES: ["res3", "res4", "res5"]
    COMMON_STRIDE: 4
    TRANSFORMER_ENC_LAYERS: 6
  MASK_FORMER:
    TRANSFORMER_DECODER_NAME: "MultiScaleMaskedTransformerDecoder_GMA"
    TRANSFORMER_IN_FEATURE: "multi_scale_pixel_decoder"
    DEEP_SUPERVISION: True
    NO_OBJECT_WEIGHT: 0.1
    CLASS_WEIGHT: 2.0
    MASK_WEIGHT: 5.0
    DICE_WEIGHT: 5.0
    HIDDEN_DIM: 256
    NUM_OBJECT_QUERIES: 100
    NHEADS: 8
    DROPOUT: 0.0
    DIM_FEEDFORWARD: 2048
    ENC_LAYERS: 0
    PRE_NORM: False
    ENFORCE_INPUT_PROJ: False
    SIZE_DIVISIBILITY: 32
    DEC_LAYERS: 10  # 9 decoder layers, add one for the loss on learnable query
    TRAIN_NUM_POINTS: 12544
    OVERSAMPLE_RATIO: 3.0
    IMPORTANCE_SAMPLE_RATIO: 0.75
"""

# What the official base evaluates to; the converter must never run it.
OFFICIAL_EVAL_PAYLOAD = "[int(x * 0.1 * 1024) for x in range(5, 21)]"


def write_paper_config(folder: Path, eval_payload: str = OFFICIAL_EVAL_PAYLOAD) -> Path:
    """Write the released inference config and its `_BASE_` (with the eval tag) under `folder`; returns the
    path of the config to convert with."""
    (folder / "base").mkdir(parents=True, exist_ok=True)
    (folder / "base" / "Base-Cityscapes-SemanticSegmentation.yaml").write_text(
        PAPER_BASE_YAML.format(eval_payload=eval_payload)
    )
    path = folder / "anomaly_inference.yaml"
    path.write_text(PAPER_YAML)
    return path


Filler = Callable[[tuple[int, ...]], torch.Tensor]


def paper_state_dict(fill: Filler | None = None, frozen_bn: bool = False) -> dict[str, torch.Tensor]:
    """State dict of the official MaskFormer module with the released Cityscapes shapes, official key names.

    `fill(shape)` makes each float tensor (default: standard normal); `frozen_bn` leaves out the
    `num_batches_tracked` counters, as FrozenBatchNorm2d checkpoints do.
    """
    generator = torch.Generator().manual_seed(0)
    fill = fill or (lambda shape: torch.randn(shape, generator=generator))
    sd: dict[str, torch.Tensor] = {}

    def conv_bn(prefix: str, out_ch: int, in_ch: int, k: int) -> None:
        sd[f"{prefix}.weight"] = fill((out_ch, in_ch, k, k))
        for name in ("weight", "bias", "running_mean", "running_var"):
            sd[f"{prefix}.norm.{name}"] = fill((out_ch,))
        if not frozen_bn:
            sd[f"{prefix}.norm.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)

    def linear(prefix: str, out_f: int, in_f: int) -> None:
        sd[f"{prefix}.weight"] = fill((out_f, in_f))
        sd[f"{prefix}.bias"] = fill((out_f,))

    def norm(prefix: str, dim: int) -> None:
        sd[f"{prefix}.weight"] = fill((dim,))
        sd[f"{prefix}.bias"] = fill((dim,))

    def mha(prefix: str, dim: int) -> None:
        sd[f"{prefix}.in_proj_weight"] = fill((3 * dim, dim))
        sd[f"{prefix}.in_proj_bias"] = fill((3 * dim,))
        linear(f"{prefix}.out_proj", dim, dim)

    # ResNet-50, detectron2 layout: res2 out 256, bottleneck 64, doubling per stage; a block-0 shortcut
    # wherever in and out channels differ (all four stages here, 64 -> 256 included)
    conv_bn("backbone.stem.conv1", 64, 3, 7)
    in_ch, out_ch, mid = 64, 256, 64
    for stage, blocks in zip(range(2, 6), (3, 4, 6, 3)):
        for block in range(blocks):
            prefix = f"backbone.res{stage}.{block}"
            if block == 0 and in_ch != out_ch:
                conv_bn(f"{prefix}.shortcut", out_ch, in_ch, 1)
            conv_bn(f"{prefix}.conv1", mid, in_ch if block == 0 else out_ch, 1)
            conv_bn(f"{prefix}.conv2", mid, mid, 3)
            conv_bn(f"{prefix}.conv3", out_ch, mid, 1)
        in_ch, out_ch, mid = out_ch, out_ch * 2, mid * 2

    # MSDeformAttnPixelDecoder: input_proj for res5, res4, res3 (low to high resolution)
    conv_dim, heads, levels, points = 256, 8, 3, 4
    pd = "sem_seg_head.pixel_decoder"
    for i, channels in enumerate((2048, 1024, 512)):
        sd[f"{pd}.input_proj.{i}.0.weight"] = fill((conv_dim, channels, 1, 1))
        sd[f"{pd}.input_proj.{i}.0.bias"] = fill((conv_dim,))
        norm(f"{pd}.input_proj.{i}.1", conv_dim)
    sd[f"{pd}.transformer.level_embed"] = fill((levels, conv_dim))
    for layer in range(6):
        prefix = f"{pd}.transformer.encoder.layers.{layer}"
        linear(f"{prefix}.self_attn.sampling_offsets", heads * levels * points * 2, conv_dim)
        linear(f"{prefix}.self_attn.attention_weights", heads * levels * points, conv_dim)
        linear(f"{prefix}.self_attn.value_proj", conv_dim, conv_dim)
        linear(f"{prefix}.self_attn.output_proj", conv_dim, conv_dim)
        norm(f"{prefix}.norm1", conv_dim)
        linear(f"{prefix}.linear1", 1024, conv_dim)
        linear(f"{prefix}.linear2", conv_dim, 1024)
        norm(f"{prefix}.norm2", conv_dim)
    sd[f"{pd}.mask_features.weight"] = fill((256, conv_dim, 1, 1))
    sd[f"{pd}.mask_features.bias"] = fill((256,))
    sd[f"{pd}.adapter_1.weight"] = fill((conv_dim, 256, 1, 1))
    norm(f"{pd}.adapter_1.norm", conv_dim)
    sd[f"{pd}.layer_1.weight"] = fill((conv_dim, conv_dim, 3, 3))
    norm(f"{pd}.layer_1.norm", conv_dim)

    # MultiScaleMaskedTransformerDecoder_GMA: 9 layers, 100 queries, hidden 256, FFN 2048, 19 classes
    hidden, queries, classes = 256, 100, 19
    pr = "sem_seg_head.predictor"
    for layer in range(9):
        mha(f"{pr}.transformer_self_attention_layers.{layer}.self_attn", hidden)
        norm(f"{pr}.transformer_self_attention_layers.{layer}.norm", hidden)
        cross = f"{pr}.transformer_cross_attention_layers.{layer}"
        mha(f"{cross}.multihead_attn_foreground", hidden)
        mha(f"{cross}.multihead_attn_background", hidden)
        norm(f"{cross}.norm", hidden)
        sd[f"{cross}.fusion_layer.weight"] = fill((100, 200, 1, 1))
        sd[f"{cross}.fusion_layer.bias"] = fill((100,))
        linear(f"{pr}.transformer_ffn_layers.{layer}.linear1", 2048, hidden)
        linear(f"{pr}.transformer_ffn_layers.{layer}.linear2", hidden, 2048)
        norm(f"{pr}.transformer_ffn_layers.{layer}.norm", hidden)
    norm(f"{pr}.decoder_norm", hidden)
    sd[f"{pr}.query_feat.weight"] = fill((queries, hidden))
    sd[f"{pr}.query_embed.weight"] = fill((queries, hidden))
    sd[f"{pr}.level_embed.weight"] = fill((levels, hidden))
    linear(f"{pr}.class_embed", classes + 1, hidden)
    for i in range(3):
        linear(f"{pr}.mask_embed.layers.{i}", 256 if i == 2 else hidden, hidden)
    empty_weight = torch.ones(classes + 1)
    empty_weight[-1] = 0.1
    sd["criterion.empty_weight"] = empty_weight
    return sd


_CHILD = """
import json, resource, sys, time
start = time.perf_counter()
from modeling_mask2anomaly.conversion import convert_checkpoint
imported = time.perf_counter()
baseline_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
convert_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3])
done = time.perf_counter()
print(json.dumps({"convert_s": done - imported, "import_s": imported - start, "baseline_peak_rss_mib": baseline_mib,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(checkpoint: Path, config: Path, workdir: Path, repeats: int) -> dict[str, float]:
    """Median of `repeats` conversions, each in a fresh interpreter (so peak RSS is this conversion's)."""
    runs = []
    for index in range(repeats):
        output = workdir / f"converted-{index}"
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-c", _CHILD, str(checkpoint), str(config), str(output)],
            capture_output=True, text=True, check=False,
        )
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"conversion failed:\n{result.stderr}")
        run = json.loads(result.stdout.strip().splitlines()[-1])
        run["process_wall_s"] = wall
        runs.append(run)
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="write the checkpoint and outputs here instead of a temp dir")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        config = write_paper_config(workdir)
        checkpoint = workdir / "best_contrastive.pth"
        state = paper_state_dict()
        parameters = sum(v.numel() for k, v in state.items() if v.is_floating_point() and "fusion_layer" not in k)
        torch.save({"model": state}, checkpoint)
        del state
        size_mib = checkpoint.stat().st_size / 2**20
        stats = measure(checkpoint, config, workdir, args.repeats)
        print(f"paper-size R-50 checkpoint: {size_mib:.0f} MiB on disk, {parameters / 1e6:.1f} M values kept "
              f"(median of {args.repeats} runs, torch {torch.__version__}, {torch.get_num_threads()} threads)")
        print(f"  conversion (load, map, write folder): {stats['convert_s']:.2f} s")
        print(f"  whole process incl. interpreter start and imports: {stats['process_wall_s']:.2f} s "
              f"(imports {stats['import_s']:.2f} s)")
        print(f"  peak RSS: {stats['peak_rss_mib']:.0f} MiB (after imports, before converting: "
              f"{stats['baseline_peak_rss_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
