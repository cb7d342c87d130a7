"""Starting weights for the ResNet backbone: the checkpoints the authors' models start from, in any common layout.

The released Mask2Anomaly models start from a Barlow Twins ResNet-50 (facebookresearch/barlowtwins'
`resnet50.pth`, a torchvision-layout state dict). People hold it, or any other torchvision-shaped ResNet, in one
of three layouts; all three are read here and mapped onto transformers' `ResNetBackbone` names:

- **torchvision**: `conv1.weight`, `bn1.*`, `layer{1-4}.{i}.conv{1-3}.weight`, `layer*.bn{1-3}.*`,
  `layer*.downsample.{0,1}.*` (and `fc.*`, the classifier, dropped);
- **detectron2**: the `.pkl` that detectron2's `tools/convert-torchvision-to-d2.py` writes, numpy arrays under
  `"model"` beside `"__author__"` and `"matching_heuristics"`: `stem.conv1.weight`, `stem.conv1.norm.*`,
  `res{2-5}.{i}.conv{1-3}[.norm].*`, `res*.shortcut[.norm].*` (and `stem.fc.*`, dropped); also as `.pth`;
- **transformers**: `ResNetBackbone` names, optionally prefixed `model.pixel_level_module.encoder.`, e.g. the
  `.safetensors` file this module's command writes.

Every other key, every backbone key left empty and every shape mismatch is an error naming the keys. Checkpoints
are read with `torch.load(weights_only=True)`, `.pkl` with the conversion's numpy-only unpickler, `.safetensors`
with safetensors: nothing in a checkpoint can run code. The weights must come from a ResNet with the stride in
the 3x3 convolution (torchvision's, Barlow Twins'; detectron2 `STRIDE_IN_1X1: False`), which is the layout of
[`resnet_backbone`]; MSRA's original `R-50.pkl` (stride in the 1x1 convolution) has the same shapes but is a
different network.

Command: `mask2anomaly-backbone --checkpoint resnet50.pth --output
backbone.safetensors` checks a checkpoint against a ResNet-50 (or `--depths`) and writes it in transformers'
names; `training.model.backbone_checkpoint` then loads either file.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from transformers.utils import logging

from ..cli import build_backbone_parser
from ..configuration_mask2anomaly import resnet_backbone
from .checkpoint import load_official_state_dict
from .errors import ConversionError, key_list
from .key_rules import BACKBONE, resnet_rules

logger = logging.get_logger(__name__)

Layout = Literal["torchvision", "detectron2", "transformers"]

# torchvision -> detectron2 names, the renaming of detectron2's torchvision converter (applied in this order)
_TORCHVISION_TO_DETECTRON2 = (
    (re.compile(r"^(?!layer)"), "stem."),  # everything outside the four stages belongs to the stem
    (re.compile(r"layer([1-4])"), lambda m: f"res{int(m[1]) + 1}"),
    (re.compile(r"bn([1-3])"), r"conv\1.norm"),
    (re.compile(r"downsample\.0"), "shortcut"),
    (re.compile(r"downsample\.1"), "shortcut.norm"),
)
# Classifier heads of ImageNet checkpoints: no place in a backbone, dropped on purpose.
_CLASSIFIER = re.compile(r"(stem\.)?(fc|linear)\.(weight|bias)\Z")


def _layout(keys: Sequence[str]) -> Layout:
    if any(key.startswith(("embedder.", "encoder.stages.", BACKBONE)) for key in keys):
        return "transformers"
    if any(key.startswith(("stem.", "res2.", "res3.", "res4.", "res5.")) for key in keys):
        return "detectron2"
    if any(key.startswith(("conv1.", "bn1.", "layer1.")) for key in keys):
        return "torchvision"
    raise ConversionError(
        f"not a ResNet backbone checkpoint in torchvision, detectron2 or transformers names (keys: {key_list(keys)})"
    )


def _detectron2_name(torchvision_key: str) -> str:
    key = torchvision_key
    for pattern, replacement in _TORCHVISION_TO_DETECTRON2:
        key = pattern.sub(replacement, key)
    return key


def to_transformers_names(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A torchvision, detectron2 or transformers ResNet state dict in `ResNetBackbone` names.

    Classifier weights (`fc.*`) are dropped; any key that is not part of a ResNet is a `ConversionError` naming it.
    """
    layout = _layout(list(state))
    if layout == "transformers":
        return {key[len(BACKBONE):] if key.startswith(BACKBONE) else key: value for key, value in state.items()}
    rules = resnet_rules()
    renamed: dict[str, torch.Tensor] = {}
    dropped, unknown = [], []
    for key, value in state.items():
        d2_key = _detectron2_name(key) if layout == "torchvision" else key
        if _CLASSIFIER.match(d2_key):
            dropped.append(key)
            continue
        match, rule = next(((m, r) for r in rules if (m := r.pattern.match("backbone." + d2_key))), (None, None))
        if match is None:
            unknown.append(key)
            continue
        renamed[rule.targets(match)[0][len(BACKBONE):]] = value
    if unknown:
        raise ConversionError(f"{source}: {len(unknown)} keys are not part of a {layout} ResNet: {key_list(unknown)}")
    if dropped:
        logger.info(f"{source}: dropped the classifier ({', '.join(dropped)})")
    return renamed


def _backbone_of(module: torch.nn.Module) -> torch.nn.Module:
    """The ResNet backbone inside `module` (a Mask2Anomaly model, its base model, a DDP wrapper) or `module`."""
    module = getattr(module, "module", module)
    for path in ("model.pixel_level_module.encoder", "pixel_level_module.encoder"):
        found = module
        for name in path.split("."):
            found = getattr(found, name, None)
        if found is not None:
            return found
    return module


def backbone_state_dict(checkpoint_path: str | Path, backbone: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of `backbone` (a transformers `ResNetBackbone`) read from a checkpoint in any layout.

    Raises `ConversionError` naming the checkpoint keys the backbone has no place for, the backbone keys the
    checkpoint leaves empty (BatchNorm `num_batches_tracked`, absent from detectron2's FrozenBN layout, is filled
    with 0), and the shapes that differ.
    """
    path = Path(checkpoint_path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise ConversionError(f"backbone checkpoint {path} does not exist")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            raw = load_file(path)
        except (SafetensorError, OSError) as error:
            raise ConversionError(f"{path} is not a readable safetensors file: {error}") from None
    else:
        raw = load_official_state_dict(path)
    state = to_transformers_names(raw, str(path))
    target = backbone.state_dict()
    unknown = [key for key in state if key not in target]
    if unknown:
        raise ConversionError(f"{path}: {len(unknown)} keys have no place in this backbone: {key_list(unknown)}")
    for key, value in target.items():
        if key not in state and key.endswith(".num_batches_tracked"):
            state[key] = torch.zeros(value.shape, dtype=value.dtype)
    missing = [key for key in target if key not in state]
    if missing:
        raise ConversionError(f"{path}: {len(missing)} backbone keys are missing: {key_list(missing)}")
    wrong = [f"{key} {list(state[key].shape)} (expected {list(value.shape)})"
             for key, value in target.items() if state[key].shape != value.shape]
    if wrong:
        raise ConversionError(f"{path}: {len(wrong)} shapes differ: {'; '.join(wrong[:12])}")
    return {key: state[key].to(target[key].dtype) for key in target}


def load_backbone_checkpoint(model: torch.nn.Module, checkpoint_path: str | Path) -> None:
    """Load a torchvision / detectron2 / transformers ResNet checkpoint into the backbone of `model` (a Mask2Anomaly
    model or the backbone itself), strictly; errors are `ConversionError`s naming the keys."""
    backbone = _backbone_of(model)
    backbone.load_state_dict(backbone_state_dict(checkpoint_path, backbone), strict=True)


def main(argv: Sequence[str] | None = None) -> int:
    """`mask2anomaly-backbone` (parser: `modeling_mask2anomaly.cli.build_backbone_parser`)."""
    return run(build_backbone_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """The command once its arguments are parsed."""
    from safetensors.torch import save_file
    from transformers import ResNetBackbone

    if args.output.suffix != ".safetensors":
        print(f"error: --output {args.output} must end in .safetensors", file=sys.stderr)
        return 2
    if args.output.exists() and not args.overwrite:
        print(f"error: {args.output} already exists; pass --overwrite to replace it", file=sys.stderr)
        return 1
    with torch.device("meta"):
        backbone = ResNetBackbone(resnet_backbone(depths=list(args.depths)))
    try:
        state = backbone_state_dict(args.checkpoint, backbone)
    except (ConversionError, OSError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in state.items()}, str(args.output))
    count = sum(value.numel() for key, value in state.items() if not key.endswith("num_batches_tracked"))
    print(f"wrote {args.output}: ResNet {'-'.join(map(str, args.depths))} backbone, {len(state)} entries, "
          f"{count / 1e6:.1f} M values")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["backbone_state_dict", "load_backbone_checkpoint", "main", "to_transformers_names"]
