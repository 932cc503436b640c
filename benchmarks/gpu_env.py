"""Make this checkout runnable on a machine that has torch and nothing else of ours.

    python benchmarks/gpu_env.py --target DIR [--wheels DIR]

The GPU machine has CUDA torch, transformers and triton, but no diffusers,
bitsandbytes or the small packages framepack imports, no internet, and no
framepack install. So, into ``--target`` (which then goes first on PYTHONPATH):

* every wheel in ``--wheels`` whose distribution this Python lacks is unpacked
  (a wheel is a zip laid out for site-packages; unpacking needs no pip, no
  network and no build step). Distributions the machine has are kept: its
  torch-matched builds are the ones to measure;
* when framepack itself is not installed, the source tree is linked in
  (``framepack`` and ``framepack_plugins`` -> ``plugins/``, as pyproject.toml
  maps them) with a ``.dist-info`` carrying pyproject's entry points, because
  the built-in plugins load through the ``framepack`` entry-point group.

Prints one line per decision, for the log the check leaves.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import shutil
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def wheel_distribution(wheel: Path) -> tuple[str, str]:
    """(name, version) from a wheel's file name (PEP 427: name-version-...whl)."""
    parts = wheel.name[: -len(".whl")].split("-")
    if len(parts) < 5:
        raise ValueError(f"{wheel.name}: not a wheel file name (name-version-python-abi-platform.whl)")
    return parts[0], parts[1]


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def unpack_wheel(wheel: Path, target: Path) -> None:
    """Lay a wheel out under ``target`` as pip would for purelib and platlib."""
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            name = member.filename
            if name.endswith("/"):
                continue
            parts = Path(name).parts
            if ".." in parts or Path(name).is_absolute():
                raise ValueError(f"{wheel.name}: unsafe path {name!r} in the archive")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue  # scripts, headers, data: nothing the check needs
                parts = parts[2:]
            dest = target.joinpath(*parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
            mode = member.external_attr >> 16
            if mode & 0o111:
                dest.chmod(0o755)


def install_wheels(wheels: Path, target: Path) -> list[str]:
    done = []
    files = sorted(wheels.glob("*.whl"))
    if not files:
        raise SystemExit(f"gpu_env: no .whl files in {wheels}")
    for wheel in files:
        name, version = wheel_distribution(wheel)
        have = installed_version(name)
        if have is not None:
            print(f"gpu_env: keep {name} {have} (this machine's; carried {version})")
            continue
        unpack_wheel(wheel, target)
        print(f"gpu_env: unpacked {name} {version}")
        done.append(name)
    return done


def entry_points_text(pyproject: dict) -> str:
    project = pyproject["project"]
    groups = dict(project.get("entry-points", {}))
    if project.get("scripts"):
        groups["console_scripts"] = project["scripts"]
    lines = []
    for group, entries in groups.items():
        lines.append(f"[{group}]")
        lines += [f"{key} = {value}" for key, value in entries.items()]
        lines.append("")
    return "\n".join(lines)


def link_source_tree(target: Path, repo: Path = REPO) -> Path:
    """framepack and framepack_plugins importable from ``target``, with their entry points."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    pyproject = tomllib.loads((repo / "pyproject.toml").read_text(encoding="utf-8"))
    package_dir = pyproject["tool"]["setuptools"]["package-dir"]
    for package, folder in package_dir.items():
        link = target / package
        if link.is_symlink() or link.exists():
            link.unlink() if link.is_symlink() else shutil.rmtree(link)
        link.symlink_to((repo / folder).resolve(), target_is_directory=True)
    version = pyproject["project"]["version"]
    info = target / f"framepack-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: framepack\nVersion: {version}\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(entry_points_text(pyproject), encoding="utf-8")
    (info / "top_level.txt").write_text("\n".join(package_dir) + "\n", encoding="utf-8")
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", type=Path, required=True)
    p.add_argument("--wheels", type=Path)
    args = p.parse_args(argv)
    args.target.mkdir(parents=True, exist_ok=True)
    if args.wheels:
        install_wheels(args.wheels, args.target)
    if installed_version("framepack") is None:
        info = link_source_tree(args.target)
        print(f"gpu_env: framepack from the source tree ({info.name})")
    else:
        print(f"gpu_env: keep the installed framepack {installed_version('framepack')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
