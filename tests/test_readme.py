"""Every code block of README.md runs as written (issue 16 item 1), so that the README cannot drift from the code.

The ```bash blocks run with bash (``-e``: every line must succeed) and the ```python blocks in one Python process,
in README order, all in a scratch folder that links the checkout's files (samples/, demo_model/, eval/ ...), so
what they write (outputs/, results/, data/) stays out of the checkout. A block that cannot run here says so in
the README, in an HTML comment just before it:

- ``<!-- not-run: REASON -->``: skipped (it needs data, a token or hours that the test does not have);
- ``<!-- run-with: --flag VALUE ... (why) -->``: run with each ``--flag``'s value replaced (e.g. fewer images).

Every other block must run; the test counts them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\S*)\n(.*?)^```\n", re.S | re.M)
MARKER = re.compile(r"<!--\s*(not-run|run-with):(.*?)-->\s*\Z", re.S)


@dataclass
class Block:
    line: int
    language: str
    code: str
    marker: str | None  # "not-run", "run-with" or None
    note: str


def readme_blocks(text: str) -> list[Block]:
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n")
        # the marker, if any, is the HTML comment that ends right before the fence
        comment_start = before.rfind("<!--")
        marker = MARKER.search(before[comment_start:]) if comment_start >= 0 else None
        blocks.append(Block(text.count("\n", 0, match.start()) + 1, match.group(1), match.group(2),
                            marker.group(1) if marker else None, " ".join(marker.group(2).split()) if marker else ""))
    return blocks


def with_substitutions(block: Block) -> str:
    """The block's code with the flag values of its ``run-with`` marker (``--num 2``) put in."""
    code = block.code
    words = shlex.split(block.note.split("(", 1)[0])
    assert words and len(words) % 2 == 0 and all(w.startswith("--") for w in words[::2]), (
        f"README.md line {block.line}: run-with expects '--flag VALUE' pairs, got {block.note!r}")
    for flag, value in zip(words[::2], words[1::2]):
        code, count = re.subn(rf"(?<!\S){re.escape(flag)}\s+\S+", f"{flag} {value}", code)
        assert count, f"README.md line {block.line}: run-with {flag} but the block has no {flag}"
    return code


def test_readme_parser_sees_markers():
    text = ("a\n\n<!-- not-run: needs data -->\n```bash\nfalse\n```\n\n```python\nx = 1\n```\n"
            "<!-- run-with: --num 2 (small) -->\n```bash\ngen --num 500 --seed 1\n```\n")
    blocks = readme_blocks(text)
    assert [(b.language, b.marker) for b in blocks] == [("bash", "not-run"), ("python", None), ("bash", "run-with")]
    assert blocks[0].note == "needs data" and with_substitutions(blocks[2]) == "gen --num 2 --seed 1\n"


@pytest.fixture
def workspace(tmp_path):
    """A scratch folder holding links to the checkout's top-level files and folders."""
    for entry in REPO.iterdir():
        if entry.name not in {".git", "outputs", "results", "data", "runs"}:
            (tmp_path / entry.name).symlink_to(entry)
    return tmp_path


PYTHON_RUNNER = """
import json, sys, traceback
namespace = {"__name__": "__readme__"}
for line, code in json.load(sys.stdin):
    try:
        exec(compile(code, f"README.md, block at line {line}", "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        print(f"FAILED README.md block at line {line}")
        sys.exit(1)
    print(f"RAN {line}", flush=True)
"""


@pytest.mark.slow
def test_every_readme_block_runs(workspace):
    blocks = readme_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    assert {b.language for b in blocks} <= {"bash", "python"}, [b.line for b in blocks if b.language not in
                                                                 ("bash", "python")]
    skipped = [b for b in blocks if b.marker == "not-run"]
    assert all(b.note for b in skipped), "a not-run marker must say why"
    to_run = [b for b in blocks if b.marker != "not-run"]
    # most of the README runs; the Deploy section's blocks (an export takes minutes here) are exercised by
    # tests/test_export.py and tests/test_backends.py instead, so they do not count against that rule
    deploy = [b for b in skipped if "tests/test_export.py" in b.note]
    assert len(to_run) >= 8 and len(skipped) - len(deploy) <= (len(blocks) - len(deploy)) // 2

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    ran = []
    for block in (b for b in to_run if b.language == "bash"):
        code = with_substitutions(block) if block.marker == "run-with" else block.code
        result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=workspace, env=env,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, (f"README.md block at line {block.line} failed:\n{code}\n"
                                        f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
        ran.append(block.line)
    python = [(b.line, b.code) for b in to_run if b.language == "python"]
    result = subprocess.run([sys.executable, "-c", PYTHON_RUNNER], input=json.dumps(python), cwd=workspace, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    ran += [int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("RAN ")]
    assert sorted(ran) == sorted(b.line for b in to_run)  # every unmarked block ran
    # what the blocks say they write is there
    assert (workspace / "results" / "synthroad-anomaly.json").is_file()
    assert (workspace / "results" / "synthroad-obstacle.json").is_file()
    assert (workspace / "outputs" / "hub" / "README.md").is_file()
