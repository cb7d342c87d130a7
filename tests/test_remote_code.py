"""Remote code has one source, the package: what `save_pretrained`, `demo_model/` and `mask2anomaly-publish` carry
is byte-for-byte the package's files, the sync command regenerates a folder, and the travelling files import only
what a machine without this package has.

The set of travelling files is computed here independently of the code under test: the modules a folder's
`config.json` / `preprocessor_config.json` name, closed over the relative imports found by parsing each file
(`ast`, including imports inside functions).
"""

from __future__ import annotations

import ast
import json
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

import modeling_mask2anomaly
from mask2anomaly_model_cards.publish import assemble_hub_folder
from modeling_mask2anomaly import Mask2AnomalyConfig, Mask2AnomalyForUniversalSegmentation
from modeling_mask2anomaly.remote_code import main as remote_code_main

PACKAGE_DIR = Path(modeling_mask2anomaly.__file__).resolve().parent
DEMO_MODEL = Path(__file__).resolve().parents[1] / "demo_model"
# What a Hub machine with only transformers (and its own dependencies) installed can import.
ALLOWED_IMPORTS = {"torch", "numpy", "PIL", "transformers", "huggingface_hub", "safetensors"} | set(
    sys.stdlib_module_names
)


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(top-level names imported absolutely, sibling modules imported relatively) by the file at `path`."""
    absolute, relative = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            absolute |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            absolute.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 1 and node.module and "." not in node.module, (
                f"{path.name} imports {'.' * node.level}{node.module}: remote code can only import sibling modules"
            )
            relative.add(node.module)
    return absolute, relative


def _named_modules(folder: Path) -> set[str]:
    names = set()
    for config_name in ("config.json", "preprocessor_config.json"):
        if config_name != "config.json" and not (folder / config_name).exists():
            continue
        config = json.loads((folder / config_name).read_text(encoding="utf-8"))
        names |= {value.split(".")[0] for value in config.get("auto_map", {}).values()}
        names |= {pipeline["impl"].split(".")[0] for pipeline in config.get("custom_pipelines", {}).values()}
    return names


def _travelling(folder: Path) -> set[str]:
    """File names of the modules `folder`'s configs name and, recursively, of what the package's files import."""
    pending, seen = sorted(_named_modules(folder)), set()
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        pending += sorted(_imports(PACKAGE_DIR / f"{module}.py")[1] - seen)
    return {f"{module}.py" for module in seen}


def _assert_same_as_package(folder: Path) -> set[str]:
    names = _travelling(folder)
    assert {"configuration_mask2anomaly.py", "modeling_mask2anomaly.py", "image_processing_mask2anomaly.py",
            "pipeline_mask2anomaly.py"} <= names
    for name in sorted(names):
        assert (folder / name).is_file(), f"{folder / name} is missing"
        assert (folder / name).read_bytes() == (PACKAGE_DIR / name).read_bytes(), f"{folder / name} differs from the package"
    return names


@pytest.fixture
def saved_model(tiny_model_dir) -> Path:
    return tiny_model_dir


def test_demo_model_remote_code_is_the_packages():
    _assert_same_as_package(DEMO_MODEL)


def test_save_pretrained_copies_every_travelling_module(saved_model):
    names = _assert_same_as_package(saved_model)
    assert {p.name for p in saved_model.glob("*.py")} == names
    auto_map = json.loads((saved_model / "config.json").read_text())["auto_map"]
    assert {"AutoConfig", "AutoModel", "AutoModelForUniversalSegmentation", "AutoModelForImageSegmentation",
            "AutoImageProcessor"} <= set(auto_map)
    processor_map = json.loads((saved_model / "preprocessor_config.json").read_text())["auto_map"]
    assert processor_map == {"AutoImageProcessor": "image_processing_mask2anomaly.Mask2AnomalyImageProcessor"}


def test_travelling_files_import_only_what_a_hub_machine_has(saved_model):
    for name in sorted(_travelling(saved_model)):
        absolute, relative = _imports(PACKAGE_DIR / name)
        assert absolute <= ALLOWED_IMPORTS, f"{name} imports {sorted(absolute - ALLOWED_IMPORTS)}"
        assert {f"{m}.py" for m in relative} <= _travelling(saved_model), name


def test_sync_regenerates_a_stale_folder_and_check_names_each_file(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json", *(p.name for p in DEMO_MODEL.glob("*.py"))):
        shutil.copyfile(DEMO_MODEL / name, folder / name)
    weights = b"not touched"
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "modeling_mask2anomaly.py").write_text("# an old copy\n")
    (folder / "visualize.py").unlink()
    assert remote_code_main(["check", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "modeling_mask2anomaly.py differs" in err and "visualize.py is missing" in err
    assert "configuration_mask2anomaly.py" not in err

    assert remote_code_main(["sync", str(folder)]) == 0
    _assert_same_as_package(folder)
    assert (folder / "model.safetensors").read_bytes() == weights
    assert remote_code_main(["check", str(folder)]) == 0


def test_check_refuses_a_folder_that_names_foreign_code(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "my_model.MyModel"}}))
    assert remote_code_main(["check", str(folder)]) == 1
    assert "'my_model' is not a module of this package" in capsys.readouterr().err
    (folder / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "../../evil.Model"}}))
    assert remote_code_main(["sync", str(folder)]) == 1
    assert "names remote code '../../evil.Model'" in capsys.readouterr().err


def test_publish_ships_the_packages_remote_code_not_the_folders(saved_model, tmp_path):
    stale = tmp_path / "stale"
    shutil.copytree(saved_model, stale)
    (stale / "modeling_mask2anomaly.py").write_text("raise RuntimeError('stale copy')\n")
    (stale / "pipeline_mask2anomaly.py").unlink()
    widget = tmp_path / "road.png"
    Image.new("RGB", (96, 64), (90, 90, 90)).save(widget)
    out = tmp_path / "hub"
    out.mkdir()
    assemble_hub_folder(stale, out, "org/tiny", widget_images=[widget])
    _assert_same_as_package(out)


def test_a_model_class_used_without_its_auto_class_still_saves_its_code(tmp_path, monkeypatch):
    """Remote code loaded by class name (not through an Auto class) is not registered; saving it still carries
    the code and the full auto_map."""
    import torch

    from modeling_mask2anomaly import Mask2AnomalyModel

    monkeypatch.setattr(Mask2AnomalyForUniversalSegmentation, "_auto_class", None)
    monkeypatch.setattr(Mask2AnomalyModel, "_auto_class", None)
    torch.manual_seed(0)
    for cls in (Mask2AnomalyForUniversalSegmentation, Mask2AnomalyModel):
        folder = tmp_path / cls.__name__
        cls(Mask2AnomalyConfig.tiny()).save_pretrained(folder)
        auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
        assert auto_map["AutoModel"] == "modeling_mask2anomaly.Mask2AnomalyModel"
        assert auto_map["AutoModelForUniversalSegmentation"] == "modeling_mask2anomaly.Mask2AnomalyForUniversalSegmentation"
        assert {p.name for p in folder.glob("*.py")} == _travelling(folder)
