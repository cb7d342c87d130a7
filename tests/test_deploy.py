"""The container recipes (deploy/) cannot be built here; what can be checked is that both run the tested command
(`mask2anomaly-predict --format fishyscapes` from /input to /output, parsed by the CLI's own parser), copy every
package folder setup.cfg installs, and stay offline."""

from __future__ import annotations

import configparser
import json
import re
import shlex
from pathlib import Path

import pytest

from modeling_mask2anomaly.predict import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _package_folders() -> set[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in config["options"]["package_dir"].splitlines() if line.strip()]
    return {line.split("=")[1].strip() for line in lines}


def _check_command(argv: list[str]) -> None:
    assert argv[0] == "mask2anomaly-predict"
    args = build_parser().parse_args(argv[1:])
    assert args.format == "fishyscapes"
    assert args.output_dir == "/output" and args.inputs == ["/input"]
    assert args.model == "/opt/model" and args.device == "auto"


def test_dockerfile_runs_the_fishyscapes_command_offline():
    text = (DEPLOY / "Dockerfile").read_text()
    entrypoint = re.search(r"^ENTRYPOINT (\[.*?\])\s*$", text.replace("\\\n", ""), re.MULTILINE | re.DOTALL)
    assert entrypoint is not None
    _check_command(json.loads(entrypoint.group(1)))
    copied = set(re.findall(r"^COPY (\S+) \./\S+$", text, re.MULTILINE))
    assert _package_folders() <= copied, _package_folders() - copied
    assert "COPY ${MODEL_DIR} /opt/model" in text
    assert "HF_HUB_OFFLINE=1" in text and "TRANSFORMERS_OFFLINE=1" in text


def test_apptainer_definition_runs_the_same_command():
    text = (DEPLOY / "mask2anomaly.def").read_text()
    runscript = text.split("%runscript", 1)[1].strip().splitlines()[0].strip()
    argv = shlex.split(runscript)
    assert argv[0] == "exec" and argv[-1] == "$@"  # shlex removes the quotes of "$@"
    _check_command(argv[1:-1])
    files = text.split("%files", 1)[1].split("%", 1)[0]
    copied = {line.split()[0] for line in files.strip().splitlines()}
    assert _package_folders() <= copied
    assert "{{ MODEL_DIR }} /opt/model" in files
    assert "HF_HUB_OFFLINE=1" in text.split("%environment", 1)[1].split("%", 1)[0]


@pytest.mark.parametrize("name", ["Dockerfile", "mask2anomaly.def"])
def test_readme_says_the_recipes_are_not_built_here(name):
    readme = (DEPLOY / "README.md").read_text()
    assert name in readme and "Not built here" in readme
