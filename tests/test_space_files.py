"""The Space folder on its own (issue 16.6): copied alone it still finds its examples; its requirements resolve
torch only to the CPU build; every module the app imports is in its requirements."""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

from packaging.requirements import Requirement
from test_handler import _load_module

APP = Path(__file__).resolve().parent.parent / "app"


def _requirements() -> tuple[list[str], dict[str, Requirement]]:
    options, requirements = [], {}
    for line in (APP / "requirements.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            options.append(line)
        else:
            requirement = Requirement(line)
            requirements[requirement.name.lower()] = requirement
    return options, requirements


def test_app_folder_copied_alone_shows_its_examples(tmp_path):
    copy = tmp_path / "space"
    shutil.copytree(APP, copy)
    app = _load_module(copy / "app.py", "mask2anomaly_space_copy")
    examples = app.example_images()
    assert len(examples) >= 3
    assert all(Path(path).parent == copy / "examples" and Path(path).is_file() for path in examples)


def test_requirements_allow_only_a_cpu_torch():
    options, requirements = _requirements()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in options
    torch = requirements["torch"]
    # PyPI's Linux wheels carry no local version (they are the CUDA build); the CPU index's carry "+cpu"
    assert not torch.specifier.contains("2.13.0", prereleases=True)
    assert torch.specifier.contains("2.13.0+cpu", prereleases=True)
    assert not any(name.startswith("nvidia") for name in requirements)


def test_every_import_of_the_app_is_in_its_requirements():
    tree = ast.parse((APP / "app.py").read_text(encoding="utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    third_party = roots - sys.stdlib_module_names - {"__future__"}
    distributions = {"PIL": "pillow"}
    _, requirements = _requirements()
    assert {"gradio", "transformers", "numpy", "PIL"} <= third_party, "the parser above missed imports"
    assert {distributions.get(name, name) for name in third_party} <= set(requirements)
    assert "torch" in requirements  # transformers' model code needs it, though the app does not import it
