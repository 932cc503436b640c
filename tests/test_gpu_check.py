"""benchmarks/gpu_check.sh: the one prepared GPU check. Its dry run takes every
code path on the CPU with tiny shapes, so a run on a rare GPU lease meets no
trivial bug; gpu_env.py makes a bare torch machine able to run it."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_env  # noqa: E402


@pytest.mark.slow
def test_dry_run_measures_everything_without_an_error(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "FRAMEPACK_GPU_DEPS": str(tmp_path / "deps")}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry-run", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out/gpu-check.json").read_text())
    assert report["dry_run"] is True
    assert report["errors"] == [], report["errors"]
    assert report["skipped"] == []
    f = report["figures"]
    assert f["environment"]["info"]["versions"]["torch"]
    assert f["peak"]["measured_tflops"] > 0 and f["peak"]["forward_flops"] > 0
    assert f["kernels"]["sdpa"]["s_per_step"] > 0 and f["kernels"]["sdpa"]["tflops"] > 0
    steps = report["settings"]["steps"]
    for label in ("none", "teacache 0.15", "magcache defaults"):
        row = f["caches"][label]
        assert row["computed"] + row["skipped"] == steps and row["computed"] >= 1 and row["section_s"] > 0
    for label in ("untiled", "tiled"):
        assert f["vae"][label]["seconds"] > 0 and f["vae"][label]["planner_estimate_above_weights_gb"] > 0
    assert f["formats"]["fp8"]["s_per_step"] > 0
    assert f["formats"]["nf4"]["linears_quantised"] > 0
    offload = f["offload"]["results"]
    for policy in ("sequential", "dynamic_swap", "model_swap"):
        assert offload[f"{policy} @ 6 GB"]["s_per_step"] > 0
    assert "CUDA" in offload["stream_prefetch @ 6 GB"]["skipped"]
    table = (tmp_path / "out/gpu-check.md").read_text()
    assert "| sdpa |" in table and "| teacache 0.15 |" in table and "| sequential @ 6 GB |" in table
    assert (tmp_path / "out/gpu-check.log").read_text().count("[gpu_check]") > 10


def _wheel(path: Path, name: str, version: str, files: dict[str, str]) -> Path:
    wheel = path / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for member, text in files.items():
            z.writestr(member, text)
        z.writestr(f"{name}-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return wheel


def test_wheels_the_machine_lacks_are_unpacked_and_the_others_kept(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "fpdemo", "1.2", {"fpdemo/__init__.py": "VALUE = 42\n",
                                      "fpdemo-1.2.data/purelib/fpdemo_extra.py": "EXTRA = 1\n",
                                      "fpdemo-1.2.data/scripts/tool": "#!/bin/sh\n"})
    _wheel(wheels, "pluggy", "0.0.1", {"pluggy/__init__.py": "raise ImportError('the carried copy was used')\n"})
    target = tmp_path / "deps"
    target.mkdir()
    assert gpu_env.install_wheels(wheels, target) == ["fpdemo"]
    assert not (target / "pluggy").exists() and not (target / "tool").exists()
    code = "import fpdemo, fpdemo_extra, importlib.metadata as m; print(fpdemo.VALUE, fpdemo_extra.EXTRA, m.version('fpdemo'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(target)}).stdout.split()
    assert out == ["42", "1", "1.2"]


def test_a_wheel_with_an_escaping_path_is_refused(tmp_path):
    wheel = _wheel(tmp_path, "evil", "1.0", {"../outside.py": "x = 1\n"})
    with pytest.raises(ValueError, match="unsafe path"):
        gpu_env.unpack_wheel(wheel, tmp_path / "deps")
    assert not (tmp_path / "outside.py").exists()


def test_the_source_tree_is_linked_with_pyprojects_entry_points(tmp_path):
    info = gpu_env.link_source_tree(tmp_path)
    dist = metadata.PathDistribution(info)
    assert dist.metadata["Name"] == "framepack"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = pyproject["project"]["entry-points"]["framepack"]
    found = {ep.name: ep.value for ep in dist.entry_points if ep.group == "framepack"}
    assert found == declared
    assert (tmp_path / "framepack_plugins").resolve() == (ROOT / "plugins").resolve()
    assert (tmp_path / "framepack" / "api.py").exists()
    gpu_env.link_source_tree(tmp_path)  # again: the links are replaced, not nested


def test_fetch_script_targets_the_gpu_machines_python_and_checks_the_carry_limit():
    script = (ROOT / "scripts/fetch-gpu-wheels.sh").read_text()
    subprocess.run(["bash", "-n", str(ROOT / "scripts/fetch-gpu-wheels.sh")], check=True)
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks/gpu_check.sh")], check=True)
    assert 'FRAMEPACK_GPU_PYTHON:-3.12' in script and "64 * 1048576" in script
    for needed in ("diffusers==", "bitsandbytes", "sageattention", "pluggy", "requests"):
        assert needed in script
