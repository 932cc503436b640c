"""One-line notes for the user on stderr: something the engine did that the
user did not ask for in so many words (a new output name, a cropped prompt,
an alpha channel composited), as ``framepack: note: ...``."""

from __future__ import annotations

import sys


def note(text: str) -> None:
    print(f"framepack: note: {text}", file=sys.stderr, flush=True)
