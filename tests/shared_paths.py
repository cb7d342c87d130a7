"""Paths the tests share: the checkout's root and the `shared/fixtures` folder beside the checkout
(`../shared/fixtures`, wherever the checkout is), which holds the official reference outputs. A test that needs one
of them fails when it is missing; nothing skips."""

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"

# Tests that use conftest's `demo_onnx` export carry this mark: under pytest-xdist (`--dist loadgroup`, as `make test`
# runs the suite) they all run on one worker, so the demo model is exported once per run.
SHARES_DEMO_EXPORT = pytest.mark.xdist_group("demo_onnx")
# Tests that start `accelerate launch` (torch's rendezvous on its default port, 29500) carry this mark, so that under
# pytest-xdist they run one after the other on one worker instead of racing for the port.
LAUNCHES_ACCELERATE = pytest.mark.xdist_group("accelerate_launch")
