"""Shared fixtures: one tiny random-weight model and a test image per session."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from framepack.models.tiny import make_tiny_model

# pytest-xdist's workers ignore SIGINT, and an ignored signal stays ignored in
# every child process: the CLI under test would then never see its Ctrl-C. The
# default handler here lets children start with SIGINT's default disposition.
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch, tmp_path_factory):
    """No user profile files, no simulated hardware, no plugin switches leak
    in, and caches go to a temporary folder per test."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg")))
    monkeypatch.setenv("FRAMEPACK_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    for var in ("FRAMEPACK_HARDWARE", "FRAMEPACK_DISABLE_PLUGIN_AUTOLOAD"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


def write_test_image(path: Path, width: int = 200, height: int = 190) -> Path:
    """A deterministic picture with structure (not flat colour)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), ((x + y) % 64) * 4], axis=-1)
    Image.fromarray(rgb.astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="session")
def test_image(tmp_path_factory) -> Path:
    return write_test_image(tmp_path_factory.mktemp("images") / "input.png")


@pytest.fixture
def run_in_tmp(tmp_path, monkeypatch) -> Path:
    """Run with the working directory in a temp folder (./framepack.toml is read from it)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def pytest_report_header(config):
    return f"framepack tests; torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}"
