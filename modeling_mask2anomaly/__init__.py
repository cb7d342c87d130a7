"""Mask2Anomaly (ICCV 2023) for transformers.

Importing this package registers the model with transformers' Auto classes: `AutoConfig`, `AutoModel` (the
base model), `AutoModelForUniversalSegmentation`, `AutoModelForImageSegmentation` (for the pipeline) and
`AutoImageProcessor`, so that ``AutoModelForUniversalSegmentation.from_pretrained(folder)`` needs no
``trust_remote_code``.

The package loads lazily (PEP 562): ``import modeling_mask2anomaly`` imports neither torch nor transformers, so that
the command lines (`cli`) print ``--help`` at once. The names below are imported on first access, and the Auto
classes are registered as soon as transformers is imported, whichever comes first: at once when transformers
already is, else when it finishes importing (or when the first name of this package is used).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import Any

# public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    "ANOMALY_SCORERS": "scorers",
    "SCORERS": "scorers",
    "Scorer": "scorers",
    "CITYSCAPES_CLASSES": "configuration_mask2anomaly",
    "CITYSCAPES_REFINE_CLASS_IDS": "configuration_mask2anomaly",
    "OUTLIER_LABEL": "configuration_mask2anomaly",
    "Mask2AnomalyConfig": "configuration_mask2anomaly",
    "IMAGE_EXTENSIONS": "image_processing_mask2anomaly",
    "AnomalySemanticOutput": "image_processing_mask2anomaly",
    "Mask2AnomalyImageProcessor": "image_processing_mask2anomaly",
    "load_image": "image_processing_mask2anomaly",
    "Mask2AnomalyForUniversalSegmentation": "modeling_mask2anomaly",
    "Mask2AnomalyModel": "modeling_mask2anomaly",
    "Mask2AnomalyPreTrainedModel": "modeling_mask2anomaly",
    "class_mask_scores": "modeling_mask2anomaly",
    "mask_contrastive_loss": "modeling_mask2anomaly",
    "AnomalyPrediction": "inference",
    "batches_of_equal_size": "inference",
    "iter_predict_anomaly": "inference",
    "load_model_and_processor": "inference",
    "predict_anomaly": "inference",
    "resolve_device": "inference",
}

def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value
    register_auto_classes()
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


# ------------------------------------------------------------------------------------------ Auto registration

_registered = False


def _importing_own_module(finishing: str | None = None) -> bool:
    """Whether one of this package's submodules (other than `finishing`, whose code has just run) is being executed
    now: registering would then import it circularly."""
    prefix = __name__ + "."
    for name, module in list(sys.modules.items()):
        spec = getattr(module, "__spec__", None)
        if name.startswith(prefix) and name != finishing and getattr(spec, "_initializing", False):
            return True
    return False


def register_auto_classes(_finishing: str | None = None) -> bool:
    """Register the config, models and image processor with transformers' Auto classes (once; imports torch and
    transformers). Returns whether they are registered: False while one of this package's own modules is still
    being imported, in which case the registration is made when that import ends."""
    global _registered
    if _registered:
        return True
    if _importing_own_module(_finishing):
        return False
    _registered = True
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForImageSegmentation,
        AutoModelForUniversalSegmentation,
    )

    from .configuration_mask2anomaly import Mask2AnomalyConfig
    from .image_processing_mask2anomaly import Mask2AnomalyImageProcessor
    from .modeling_mask2anomaly import Mask2AnomalyForUniversalSegmentation, Mask2AnomalyModel

    AutoConfig.register(Mask2AnomalyConfig.model_type, Mask2AnomalyConfig, exist_ok=True)
    AutoModel.register(Mask2AnomalyConfig, Mask2AnomalyModel, exist_ok=True)
    AutoModelForUniversalSegmentation.register(Mask2AnomalyConfig, Mask2AnomalyForUniversalSegmentation,
                                               exist_ok=True)
    AutoModelForImageSegmentation.register(Mask2AnomalyConfig, Mask2AnomalyForUniversalSegmentation, exist_ok=True)
    AutoImageProcessor.register(Mask2AnomalyConfig, image_processor_classes={"pil": Mask2AnomalyImageProcessor},
                                exist_ok=True)
    # Every class that travels to the Hub registers with its Auto class: its save_pretrained then writes the
    # `auto_map` entry and copies its module, and every module that imports relatively, through transformers'
    # `custom_object_save`, so a saved folder loads with trust_remote_code=True where this package is not installed.
    # (The pipelines travel through the model's `custom_pipelines`; see `remote_code` for the sync command.)
    Mask2AnomalyConfig.register_for_auto_class("AutoConfig")
    Mask2AnomalyModel.register_for_auto_class("AutoModel")
    Mask2AnomalyForUniversalSegmentation.register_for_auto_class("AutoModelForUniversalSegmentation")
    Mask2AnomalyImageProcessor.register_for_auto_class("AutoImageProcessor")
    _uninstall_import_hook()
    return True


class _RegisterAfterExec:
    """Runs the wrapped loader, then `register_auto_classes`; puts the original loader back on the module. Anything
    else (``get_code`` for ``python -m``, resources) is the wrapped loader's."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        try:
            self.loader.exec_module(module)
        finally:
            module.__loader__ = self.loader
            if module.__spec__ is not None:
                module.__spec__.loader = self.loader
        # a module of this package may end with transformers only half-set-up for it: wait for the next one
        if "transformers" in sys.modules:
            register_auto_classes(_finishing=module.__name__)


class _ImportHook(importlib.abc.MetaPathFinder):
    """Registers the Auto classes when transformers, or one of this package's modules, finishes importing."""

    def find_spec(self, fullname: str, path: Any = None, target: ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "transformers" and not fullname.startswith(__name__ + "."):
            return None
        for finder in sys.meta_path:  # the regular finders decide where the module is
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisterAfterExec(spec.loader)
                return spec
        return None


_hook: _ImportHook | None = None


def _uninstall_import_hook() -> None:
    global _hook
    if _hook is not None and _hook in sys.meta_path:
        sys.meta_path.remove(_hook)
    _hook = None


if "transformers" in sys.modules:
    register_auto_classes()
else:
    _hook = _ImportHook()
    sys.meta_path.insert(0, _hook)


__all__ = sorted(_EXPORTS) + ["register_auto_classes"]
