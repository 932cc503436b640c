"""framepack.models.heap.enable_huge_pages: PyTorch's THP switch, set only where it can still act."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from framepack.models import heap

ROOT = Path(__file__).resolve().parents[1]

_FRESH = """
import os, sys
from framepack.models.heap import THP_ENV, enable_huge_pages
assert "torch" not in sys.modules
print(enable_huge_pages(), os.environ.get(THP_ENV))
"""


def _fresh(env_extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k != heap.THP_ENV}
    env.update(env_extra)
    proc = subprocess.run([sys.executable, "-c", _FRESH], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PyTorch's THP allocator is Linux-only")
def test_set_before_torch_is_imported():
    assert _fresh({}) == "True 1"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PyTorch's THP allocator is Linux-only")
def test_the_users_setting_wins():
    assert _fresh({heap.THP_ENV: "0"}) == "False 0"


def test_left_alone_once_torch_is_imported(monkeypatch):
    import torch  # noqa: F401  (this process has it, as any test process does)

    monkeypatch.delenv(heap.THP_ENV, raising=False)
    assert heap.enable_huge_pages() is False
    assert heap.THP_ENV not in os.environ


def test_loop_threshold_still_gives_2_mb_blocks_their_own_mmaps():
    # tests/test_length.py frees 2 MB blocks inside the loop's setting and expects them back at once.
    assert heap.LOOP_THRESHOLD <= 2 * 2**20


_CLI = """
import os, sys
from framepack.cli import main
from framepack.models.heap import THP_ENV
code = main(["profiles"])
print(code, os.environ.get(THP_ENV), file=sys.stderr)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PyTorch's THP allocator is Linux-only")
def test_the_cli_switches_it_on_before_torch_loads():
    env = {k: v for k, v in os.environ.items() if k != heap.THP_ENV}
    proc = subprocess.run([sys.executable, "-c", _CLI], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.stderr.strip().splitlines()[-1] == "0 1", proc.stderr[-2000:]
