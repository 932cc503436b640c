"""scripts/render.sh writes the README's outputs/demo.mp4 whichever model it
renders with, and says which. The script runs for real in a copy of the repo
layout; only its two outside commands are stand-ins: setup-venv.sh (no pip)
and `framepack` (records its arguments), and for the hub case the venv's
python that asks the hub (no network)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_SETUP = """VENV="$FAKE_VENV"
export PATH="$FAKE_BIN:$PATH"
"""
FAKE_FRAMEPACK = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_LOG.$1"
if [ "$1" = make-tiny-model ]; then mkdir -p "$2"; fi
"""

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def render(tmp_path: Path, *args: str, hub: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """hub: 'offline' (HF_HUB_OFFLINE=1, the real python), 'up' (the hub check passes)."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "render.sh", repo / "scripts" / "render.sh")
    (repo / "scripts" / "setup-venv.sh").write_text(FAKE_SETUP)
    bin_dir, venv_bin = tmp_path / "bin", tmp_path / "venv" / "bin"
    bin_dir.mkdir()
    venv_bin.mkdir(parents=True)
    (bin_dir / "framepack").write_text(FAKE_FRAMEPACK)
    (bin_dir / "framepack").chmod(0o755)
    if hub == "up":
        (venv_bin / "python").write_text("#!/usr/bin/env bash\ncat > /dev/null\nexit 0\n")
    else:  # a wrapper, not a symlink: a symlinked venv python loses its venv
        (venv_bin / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (venv_bin / "python").chmod(0o755)
    env = {**os.environ, "FAKE_VENV": str(tmp_path / "venv"), "FAKE_BIN": str(bin_dir),
           "FAKE_LOG": str(tmp_path / "called"), "HF_HUB_OFFLINE": "1" if hub == "offline" else "0"}
    proc = subprocess.run(["bash", str(repo / "scripts" / "render.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=60)
    log = tmp_path / "called.generate"
    return proc, (log.read_text().splitlines() if log.exists() else [])


def output_of(argv: list[str]) -> str:
    outputs = [argv[i + 1] for i, a in enumerate(argv) if a == "--output"]
    return outputs[-1]  # argparse: the last one wins


@pytest.mark.parametrize("args, hub, why", [(("--tiny",), "up", "--tiny"), ((), "offline", "HF_HUB_OFFLINE=1")])
def test_the_tiny_model_renders_to_demo_mp4_and_says_so(tmp_path, args, hub, why):
    proc, argv = render(tmp_path, *args, hub=hub)
    assert proc.returncode == 0, proc.stderr
    assert argv[0] == "generate"
    assert output_of(argv) == "outputs/demo.mp4"
    assert argv[argv.index("--model") + 1] == ".cache/tiny-model"
    assert (tmp_path / "called.make-tiny-model").exists()
    lines = proc.stderr.splitlines()
    assert lines[0] == f"render: model: the tiny random-weight model in .cache/tiny-model ({why}; the video is noise)"
    assert lines[-1].startswith("render: wrote outputs/demo.mp4 with the tiny random-weight model")


def test_the_hub_model_renders_to_demo_mp4_and_says_so(tmp_path):
    proc, argv = render(tmp_path, hub="up")
    assert proc.returncode == 0, proc.stderr
    assert output_of(argv) == "outputs/demo.mp4" and "--model" not in argv
    assert proc.stderr.splitlines()[-1] == "render: wrote outputs/demo.mp4 with the original FramePack weights from the Hugging Face hub"


def test_extra_arguments_go_to_generate_and_an_own_output_is_named(tmp_path):
    proc, argv = render(tmp_path, "--tiny", "--seed", "7", "--output", "outputs/mine.mp4", hub="up")
    assert proc.returncode == 0, proc.stderr
    assert argv[-4:] == ["--seed", "7", "--output", "outputs/mine.mp4"] and output_of(argv) == "outputs/mine.mp4"
    assert proc.stderr.splitlines()[-1].startswith("render: wrote outputs/mine.mp4 with the tiny")
