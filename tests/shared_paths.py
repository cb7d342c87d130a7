"""Paths the tests share: the checkout's root and the `shared/fixtures` folder beside the checkout
(`../shared/fixtures`, wherever the checkout is), which holds the official reference outputs. A test that needs one
of them fails when it is missing; nothing skips."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"
