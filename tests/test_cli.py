"""The command lines as a new user meets them (issue 16 items 7, 8, 12): ``--help`` of every console entry point
imports neither torch nor transformers, the lazy package still registers its Auto classes whatever the import
order, every default is shown in ``--help``, and ``--threads`` sets torch's thread count."""

from __future__ import annotations

import argparse
import configparser
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers")


def console_scripts() -> dict[str, str]:
    """name -> "module:function" of every console entry point, read from setup.cfg (what `pip install` makes)."""
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(part.strip() for part in line.split("=", 1)) for line in lines if line.strip())


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, **env})


def test_every_entry_point_is_checked():
    assert set(console_scripts()) >= {"mask2anomaly-predict", "mask2anomaly-convert", "mask2anomaly-train",
                                      "mask2anomaly-synthroad", "mask2anomaly-eval", "mask2anomaly-publish"}


@pytest.mark.parametrize("name", sorted(console_scripts()))
def test_help_imports_neither_torch_nor_transformers(name):
    module, function = console_scripts()[name].split(":")
    code = (f"import sys\nfrom {module} import {function} as main\ntry:\n    main(['--help'])\n"
            f"except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "--help" in result.stdout, result.stdout
    last = result.stdout.strip().splitlines()[-1]
    assert last == "HEAVY []", f"{name} --help imported {last}"


def test_package_import_is_light_and_names_load_on_access():
    result = run_python("import sys, modeling_mask2anomaly as m\nprint(sorted(x for x in ('torch', 'transformers') "
                        "if x in sys.modules))\nprint(m.OUTLIER_LABEL, m.Mask2AnomalyConfig.model_type)\n"
                        "print('torch' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["[]", "254 mask2anomaly", "True"], result.stdout


# Whatever is imported first, the Auto classes know the model without trust_remote_code: the folder's config.json
# has an auto_map, so an unregistered model type would need remote code (or fail without it).
AUTO_CHECK = """
import sys
from transformers import AutoConfig, AutoImageProcessor, AutoModelForUniversalSegmentation
config = AutoConfig.from_pretrained("demo_model")
model = AutoModelForUniversalSegmentation.from_config(config)
processor = AutoImageProcessor.from_pretrained("demo_model")
print(type(config).__module__, type(model).__module__, type(processor).__module__,
      any(name.startswith("transformers_modules") for name in sys.modules))
"""
EXPECTED = ("modeling_mask2anomaly.configuration_mask2anomaly modeling_mask2anomaly.modeling_mask2anomaly "
            "modeling_mask2anomaly.image_processing_mask2anomaly False")


@pytest.mark.parametrize("first", [
    "import modeling_mask2anomaly",                               # the package, then transformers
    "import transformers\nimport modeling_mask2anomaly",          # transformers first
    "from modeling_mask2anomaly.image_processing_mask2anomaly import Mask2AnomalyImageProcessor",  # a submodule
])
def test_auto_classes_registered_whatever_is_imported_first(first):
    result = run_python(first + "\n" + AUTO_CHECK)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == EXPECTED


def test_from_pretrained_after_package_import():
    result = run_python("import modeling_mask2anomaly\nfrom transformers import AutoModelForUniversalSegmentation\n"
                        "m = AutoModelForUniversalSegmentation.from_pretrained('demo_model')\nprint(type(m).__name__)")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "Mask2AnomalyForUniversalSegmentation"


# ------------------------------------------------------------------------------------------------ --help texts


def all_parsers() -> dict[str, argparse.ArgumentParser]:
    from mask2anomaly_eval.cli import build_parser as eval_parser
    from mask2anomaly_model_cards.cli import build_parser as publish_parser
    from mask2anomaly_training.cli import build_parser as train_parser
    from modeling_mask2anomaly.cli import build_predict_parser

    return {"predict": build_predict_parser(), "train": train_parser(), "eval": eval_parser(),
            "publish": publish_parser()}


@pytest.mark.parametrize("name", ["predict", "train", "eval", "publish"])
def test_help_shows_every_default(name):
    parser = all_parsers()[name]
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        default = action.default
        if default in (None, False, argparse.SUPPRESS) or (isinstance(default, list) and not default):
            continue
        option = action.option_strings[0]
        # the option's help block: from its flag to the next option flag
        block = re.search(re.escape(option) + r"\b(.*?)(?= --?[a-z][\w-]* |$)", text.split("options:", 1)[1])
        assert block and f"default: {default}" in block.group(1), f"{name} {option}: default {default!r} not shown"


def test_synthroad_default_size_is_the_recipe_size():
    import yaml

    from mask2anomaly_training.synthroad import main

    recipe = yaml.safe_load((REPO / "training" / "configs" / "synthroad.yaml").read_text())["data"]["train"]
    result = run_python("from mask2anomaly_training.synthroad import main\nmain(['--help'])")
    text = " ".join(result.stdout.split())
    assert f"--height HEIGHT image height in pixels (the synthroad recipe's) (default: {recipe['height']})" in text
    assert f"(default: {recipe['width']})" in text.split("--width", 1)[1]
    assert callable(main)


def test_eval_track_choices_are_the_metric_tracks():
    from mask2anomaly_eval.cli import TRACKS
    from mask2anomaly_eval.metrics import TRACK_SIZE_THRESHOLDS

    assert TRACKS == tuple(TRACK_SIZE_THRESHOLDS)


# ------------------------------------------------------------------------------------------------ threads


def test_default_threads(monkeypatch):
    from modeling_mask2anomaly import cli

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cli.default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    for cpus, expected in ((1, 1), (2, 1), (6, 3), (64, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)), raising=False)
        assert cli.default_threads() == expected


def test_threads_flag_sets_torch_threads(tmp_path):
    # `--threads N` of predict is torch's thread count during the run (checked in a fresh process, so that this
    # test process keeps its own setting)
    code = ("import torch\nfrom modeling_mask2anomaly.cli import predict_main\n"
            f"status = predict_main(['samples', '--model', 'demo_model', '--output-dir', {str(tmp_path)!r}, "
            "'--threads', '2', '--no-flip'])\nprint('THREADS', status, torch.get_num_threads())")
    result = run_python(code, OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "THREADS 0 2"
    assert len(list(tmp_path.glob("*_anomaly.npy"))) == len(list((REPO / "samples").glob("*.png")))


@pytest.mark.parametrize("cli_module, work_module, argv", [
    ("mask2anomaly_training.cli", "mask2anomaly_training.train", ["--output-dir", "unused"]),
    ("mask2anomaly_eval.cli", "mask2anomaly_eval.run", ["--model", "m", "--benchmark", "b", "--data-dir", "d"]),
])
def test_threads_flag_on_train_and_eval(monkeypatch, cli_module, work_module, argv):
    # the thread count is set before the command's work starts (its `run`, replaced here by a probe)
    from importlib import import_module

    import torch

    seen = []
    monkeypatch.setattr(import_module(work_module), "run", lambda *args: seen.append(torch.get_num_threads()) or 0)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # restored afterwards
    before = torch.get_num_threads()
    try:
        assert import_module(cli_module).main([*argv, "--threads", "3"]) == 0
    finally:
        torch.set_num_threads(before)
    assert seen == [3]
    with pytest.raises(SystemExit):
        import_module(cli_module).build_parser().parse_args([*argv, "--threads", "0"])


# ------------------------------------------------------------------------------------------------ --model errors


@pytest.mark.parametrize("value, message", [
    ("./demo_modl", "model folder not found: ./demo_modl"),
    ("runs/a/b/missing", "model folder not found: runs/a/b/missing"),
    ("demo_model/config.json", "is a file; expected a model folder or a Hub id"),
    ("bad id!", "is neither a folder nor a Hub id"),
])
def test_model_values_that_are_not_models(value, message):
    from modeling_mask2anomaly.inference import ModelNotFoundError, resolve_model_source

    with pytest.raises(ModelNotFoundError, match=re.escape(message)):
        resolve_model_source(REPO / value if value.startswith("demo_model/") else value)


def test_folder_without_config(tmp_path):
    from modeling_mask2anomaly.inference import ModelNotFoundError, resolve_model_source

    with pytest.raises(ModelNotFoundError, match="holds no config.json"):
        resolve_model_source(tmp_path)


def _fake_hub_cache(cache: Path, repo_id: str) -> None:
    """`repo_id` in a Hub cache laid out as huggingface_hub lays it out (refs/main -> snapshots/<commit>/files)."""
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in (REPO / "demo_model").iterdir():
        if path.is_file():
            (snapshot / path.name).write_bytes(path.read_bytes())


LOAD_BOTH = """
import sys
from modeling_mask2anomaly.inference import ModelNotFoundError, load_model_and_processor
try:
    load_model_and_processor("someone/not-cached")
except ModelNotFoundError as err:
    print("ERROR", err)
model, processor = load_model_and_processor("someone/cached-demo")
print("LOADED", type(model).__name__, type(processor).__name__)
"""


@pytest.mark.parametrize("offline", [True, False])
def test_hub_id_without_network(tmp_path, offline):
    # no network: HF_HUB_OFFLINE, or an endpoint nobody listens on (port 9, "discard", refuses at once). A Hub id
    # in the cache loads from it; one that is not fails in one line at once, saying why (no retries: a refused
    # connection would otherwise be retried five times by huggingface_hub)
    _fake_hub_cache(tmp_path / "hub", "someone/cached-demo")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.update({"HF_HUB_OFFLINE": "1"} if offline else {"HF_HUB_OFFLINE": "0"})
    result = run_python(LOAD_BOTH, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    error = next(line for line in lines if line.startswith("ERROR"))
    assert "'someone/not-cached' is not a folder, and as a Hub id it is not in the local cache" in error
    assert ("HF_HUB_OFFLINE is set" if offline else "http://127.0.0.1:9 cannot be reached") in error
    assert lines[-1] == "LOADED Mask2AnomalyForUniversalSegmentation Mask2AnomalyImageProcessor"


def test_predict_reports_a_missing_hub_model_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "modeling_mask2anomaly.cli", "samples", "--model",
                             "nonexistent_model", "--output-dir", str(tmp_path)], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"),
                                           "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "mask2anomaly-predict: --model: model 'nonexistent_model' is not a folder, and as a Hub id it is not in the "
        f"local cache ({tmp_path / 'hub'}) and http://127.0.0.1:9 cannot be reached (Connection refused)"]
