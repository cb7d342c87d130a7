"""The error every conversion step raises for a checkpoint that does not fit, and how its messages list keys."""

from __future__ import annotations

from collections.abc import Iterable

# How many keys an error message lists before it summarises the rest.
LISTED_KEYS = 12


class ConversionError(ValueError):
    """A checkpoint that does not match the model its config describes (the message names the keys)."""


def key_list(keys: Iterable[str]) -> str:
    """`keys` sorted and comma-separated, the first `LISTED_KEYS` of them and a count of the rest."""
    keys = sorted(keys)
    shown = ", ".join(keys[:LISTED_KEYS])
    return shown + (f" ... and {len(keys) - LISTED_KEYS} more" if len(keys) > LISTED_KEYS else "")
