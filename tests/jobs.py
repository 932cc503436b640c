"""Helpers for tests that run real jobs in real processes: the CLI as a
subprocess, a plugin that kills (or pauses) a job at a chosen section, and
readers for what a job leaves behind."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import av
import numpy as np
from PIL import Image

# A plugin loaded through a fake dist-info (the real entry-point path): at the
# end of section KILL_AFTER (after its checkpoint) it sends KILL_SIGNAL to its
# own process, or, with PAUSE_DIR set, writes PAUSE_DIR/ready and waits for
# PAUSE_DIR/go.
KILLER = '''
import os, pathlib, signal, time
from framepack.hookspecs import hookimpl

@hookimpl
def framepack_on_section(event):
    if event.phase != "end" or event.index != int(os.environ.get("KILL_AFTER", "-1")):
        return
    pause = os.environ.get("PAUSE_DIR")
    if pause:
        pathlib.Path(pause, "ready").write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while not pathlib.Path(pause, "go").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return
    os.kill(os.getpid(), getattr(signal, os.environ.get("KILL_SIGNAL", "SIGKILL")))
'''


def write_killer_plugin(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "killer_plugin.py").write_text(textwrap.dedent(KILLER))
    info = root / "killer_plugin-1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: killer-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[framepack]\nkiller = killer_plugin\n")
    return root


def cli_env(env_extra=None, pythonpath=None) -> dict:
    env = dict(os.environ, **(env_extra or {}))
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    return env


def cli(args, env_extra=None, pythonpath=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "framepack", *map(str, args)], capture_output=True, text=True,
                          env=cli_env(env_extra, pythonpath), timeout=600, cwd=cwd)


def start_cli(args, env_extra=None, pythonpath=None, cwd=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "framepack", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(env_extra, pythonpath), cwd=cwd)


def job_args(tiny_model, image, out: Path, variant: str, seconds: float, writers=("mp4", "png"), latents=True):
    args = ["generate", "--image", str(image), "--prompt", "a wave", "--model", str(tiny_model), "--variant", variant,
            "--seconds", str(seconds), "--steps", "2", "--size", "64x64", "--output", str(out), "--profile", "cpu",
            "--set", "writers=[" + ", ".join(f'"{w}"' for w in writers) + "]"]
    if latents:
        args += ["--latents-out", str(out.with_suffix(".safetensors"))]
    return args


def write_plain_video(path: Path, frames: int, fps: int = 30, size=(64, 64), seed=0, rotation: int = 0,
                      audio: bool = False) -> Path:
    """A video not made by framepack (x264 with PyAV's defaults): random pixels scrolling
    sideways, stored at ``size``; ``rotation``: the display matrix's turn, counterclockwise
    (a phone's portrait video is stored landscape with -90); ``audio``: with an AAC track
    of a 440 Hz tone as long as the video."""
    h, w = size
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        sound = out.add_stream("aac", rate=48000, layout="mono") if audio else None
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 2 * i, axis=1), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        if sound is not None:
            samples = round(48000 * frames / fps)
            tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(samples) / 48000)).astype(np.float32)
            for start in range(0, samples, 1024):
                chunk = av.AudioFrame.from_ndarray(tone[None, start:start + 1024], format="fltp", layout="mono")
                chunk.sample_rate, chunk.pts = 48000, start
                for packet in sound.encode(chunk):
                    out.mux(packet)
            for packet in sound.encode():
                out.mux(packet)
    return path


def frames_of(path: Path) -> np.ndarray:
    """Decoded frames of an mp4, or the frames of a png writer's folder."""
    if path.is_dir():
        return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(path.glob("*.png"))])
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def flip_byte(path: Path, offset_from_end: int = 1) -> None:
    """Change one byte of a file (in the tensor data, which safetensors puts last)."""
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x55
    path.write_bytes(bytes(data))
