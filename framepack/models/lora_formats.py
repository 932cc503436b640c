"""LoRA files: where they are, refusing pickle, reading the three key layouts
people have, and mapping them onto the modules of diffusers'
``HunyuanVideoFramepackTransformer3DModel``.

The layouts (detected from the keys, never from the file name):

* ``diffusers``: ``transformer.<module>.lora_A.weight`` / ``.lora_B.weight``,
  optional ``.alpha`` (diffusers' and PEFT's own saves; ``base_model.model.``
  or no prefix are accepted too).
* ``musubi``: Musubi-tuner's FramePack LoRAs, ``lora_unet_<module path with
  dots as underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.
  Its HunyuanVideo LoRAs (``lora_unet_double_blocks_0_img_attn_qkv``) are
  read as the next layout.
* ``hunyuan``: the original HunyuanVideo module names as diffusion-pipe and
  ComfyUI write them (``diffusion_model.`` or ``transformer.`` prefix,
  ``double_blocks.N.img_attn_qkv``, ``single_blocks.N.linear1``, ...). The
  renaming and the q/k/v split are diffusers' own converter; this module adds
  what it lacks: the single blocks' fused ``linear1`` split at the model's real
  width (the converter assumes 3072), ``alpha`` keys, and the final AdaLN's
  (shift, scale) -> (scale, shift) order applied to B only.

A fused projection's update B·A splits by rows of B: the q, k and v parts of
``img_attn_qkv`` share A and take a third of B each, so alpha / rank stays
the one of the fused module.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from framepack.errors import UserError

FORMATS = ("diffusers", "musubi", "hunyuan")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
# The original HunyuanVideo's top-level module names (what a ``hunyuan`` key starts with).
HUNYUAN_ROOTS = ("double_blocks.", "single_blocks.", "txt_in.", "img_in.", "final_layer.", "time_in.",
                 "vector_in.", "guidance_in.")
PREFIXES = ("diffusion_model.", "transformer.", "base_model.model.")
_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_down\.weight|lora_up\.weight|alpha)$")
_DOWN, _UP = ("lora_A.weight", "lora_down.weight"), ("lora_B.weight", "lora_up.weight")


# --- naming a LoRA: PATH[:SCALE], the LoRA folder ---------------------------------------


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` -> (path, scale). The scale is split off the last colon only
    when what follows is a number, so ``C:\\x.safetensors`` stays a path and
    ``C:\\x.safetensors:0.8`` is that path at 0.8."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
        except ValueError:
            return text, 1.0
        return head, check_scale(text, scale)
    return text, 1.0


def check_scale(name: str, scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise UserError(f"--lora {name}: scale {scale!r} must be a finite number")
    return float(scale)


def lora_dir() -> Path:
    """The LoRA folder: ``FRAMEPACK_LORA_DIR``, else ``$XDG_DATA_HOME/framepack/loras``
    (``~/.local/share/framepack/loras``)."""
    explicit = os.environ.get("FRAMEPACK_LORA_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "framepack" / "loras"


def resolve_lora_path(name: str) -> Path:
    """A path as given when it exists; a bare name (no folder part) is looked up in
    the LoRA folder, with or without ``.safetensors``. Returns an absolute path."""
    given = Path(name).expanduser()
    if given.is_file():
        return given.resolve()
    bare = name and os.sep not in name and "/" not in name and name not in (".", "..")
    if bare:
        folder = lora_dir()
        for candidate in (folder / name, folder / f"{name}.safetensors"):
            if candidate.is_file():
                return candidate.resolve()
        raise UserError(f"--lora {name}: no such file here or in the LoRA folder {folder} (FRAMEPACK_LORA_DIR)")
    raise UserError(f"--lora {name}: no such file")


def refuse_pickle(path: Path) -> None:
    """Only safetensors: a pickle (``torch.save``: .pt/.ckpt/.bin) runs code when loaded."""
    why = "framepack reads LoRAs only from .safetensors, because loading a pickle can run code in it"
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"LoRA {path.name}: a {path.suffix} file is a pickle; {why} "
                        "(convert it with safetensors where you trust it)")
    with open(path, "rb") as handle:
        head = handle.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return
    if head[:1] == b"\x80" or head[:2] == b"PK":  # pickle protocol 2+ / torch's zip container
        raise UserError(f"LoRA {path.name}: this is a pickle or torch zip file, not safetensors; {why}")
    raise UserError(f"LoRA {path.name}: not a safetensors file (no safetensors header)")


# --- reading ------------------------------------------------------------------------------


@dataclass
class LoraPair:
    """One low-rank update as stored: delta W = alpha / rank * up @ down."""

    down: torch.Tensor  # A (rank, in)
    up: torch.Tensor  # B (out, rank)
    alpha: float | None = None
    keys: list[str] = field(default_factory=list)  # the file's keys, for messages

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def factor(self) -> float:
        """alpha / rank; alpha = rank (factor 1) when the file has none."""
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclass
class LoraFile:
    path: Path
    format: str
    pairs: dict[str, LoraPair]  # module name as in the file, prefix stripped
    stray: list[str]  # keys that are no lora_A/lora_B/lora_down/lora_up/alpha
    size: int

    @property
    def ranks(self) -> list[int]:
        return sorted({p.rank for p in self.pairs.values()})


def read_lora(path: Path) -> LoraFile:
    """Read and classify a LoRA file (safetensors only, pickle refused)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--lora {path}: no such file")
    refuse_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise UserError(f"LoRA {path.name}: cannot read it as safetensors ({exc})") from None
    fmt = detect_format(list(tensors))
    pairs: dict[str, LoraPair] = {}
    stray: list[str] = []
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            stray.append(key)
            continue
        found.setdefault(match["module"], {})[match["kind"]] = value
        found[match["module"]].setdefault("_keys", []).append(key)
    for module, parts in found.items():
        down = next((parts[k] for k in _DOWN if k in parts), None)
        up = next((parts[k] for k in _UP if k in parts), None)
        if down is None or up is None:
            stray.extend(parts["_keys"])  # an alpha or half a pair: nothing to apply
            continue
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise UserError(f"LoRA {path.name}: {module}: up/B is {tuple(up.shape)} and down/A is "
                            f"{tuple(down.shape)}; they do not form a rank-r product")
        alpha = float(parts["alpha"].float().item()) if "alpha" in parts else None
        pairs[_strip_prefix(module, fmt)] = LoraPair(down, up, alpha, parts["_keys"])
    return LoraFile(path, fmt, pairs, sorted(stray), path.stat().st_size)


def detect_format(keys: list[str]) -> str:
    modules = [m["module"] for m in map(_KEY.match, keys) if m is not None]
    if modules and all(m.startswith("lora_unet_") for m in modules):
        return "musubi"
    if modules:
        stripped = [_strip_prefix(m, "diffusers") for m in modules]
        if all(s.startswith(HUNYUAN_ROOTS) for s in stripped):
            return "hunyuan"
        if not any(s.startswith(HUNYUAN_ROOTS) or s.startswith("lora_unet_") for s in stripped):
            return "diffusers"
    shown = ", ".join(keys[:3]) + (f" ... ({len(keys)} keys)" if len(keys) > 3 else "")
    raise UserError(
        f"unknown LoRA format: saw {shown or 'no tensors'}; expected diffusers/PEFT "
        "(transformer.<module>.lora_A.weight), Musubi-tuner (lora_unet_<module>.lora_down.weight) or "
        "HunyuanVideo (diffusion_model.double_blocks.N.img_attn_qkv.lora_A.weight)"
    )


def _strip_prefix(module: str, fmt: str) -> str:
    if fmt == "musubi":
        return module.removeprefix("lora_unet_")
    for prefix in PREFIXES:
        if module.startswith(prefix):
            return module[len(prefix):]
    return module


# --- mapping onto the FramePack transformer -----------------------------------------------


@dataclass
class Piece:
    """One LoRA's update for one weight: delta = factor * up @ down."""

    down: torch.Tensor
    up: torch.Tensor
    factor: float  # scale * alpha / rank
    key: str  # a key of the file it came from


def map_to_model(lora: LoraFile, shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, list[Piece]], list[str]]:
    """``{parameter name: pieces}`` for the transformer whose weights have ``shapes``
    (``name.weight`` -> shape), and the file's keys that match no module.
    A shape mismatch is an error naming the key and both shapes."""
    modules = {name.removesuffix(".weight") for name in shapes if name.endswith(".weight")}
    flat = {name.replace(".", "_"): name for name in modules}
    targets: dict[str, list[Piece]] = {}
    unmatched = list(lora.stray)
    for name, pair in lora.pairs.items():
        if lora.format == "diffusers":
            mapped = [(name, pair.down, pair.up)]
        elif lora.format == "musubi" and name in flat:
            mapped = [(flat[name], pair.down, pair.up)]
        else:
            original = name if lora.format == "hunyuan" else _musubi_hunyuan_name(name)
            mapped = _hunyuan_to_diffusers(original, pair, shapes) if original else []
        if not mapped or any(target not in modules for target, _, _ in mapped):
            unmatched.extend(pair.keys)
            continue
        for target, down, up in mapped:
            weight = f"{target}.weight"
            want = tuple(shapes[weight])
            got = (int(up.shape[0]), int(down.shape[1]))
            if got != want:
                raise UserError(f"LoRA {lora.path.name}: {pair.keys[0]} gives a {got} update but "
                                f"the transformer's {weight} is {want}")
            targets.setdefault(weight, []).append(Piece(down, up, pair.factor, pair.keys[0]))
    return targets, sorted(unmatched)


_MUSUBI_HUNYUAN = re.compile(r"^(double_blocks|single_blocks)_(\d+)_(.+)$")
# Musubi's HunyuanVideo names with underscores for dots; the inner names are fixed.
_MUSUBI_INNER = {"img_mod_linear": "img_mod.linear", "txt_mod_linear": "txt_mod.linear",
                 "img_mlp_fc1": "img_mlp.fc1", "img_mlp_fc2": "img_mlp.fc2", "txt_mlp_fc1": "txt_mlp.fc1",
                 "txt_mlp_fc2": "txt_mlp.fc2", "modulation_linear": "modulation.linear"}


def _musubi_hunyuan_name(name: str) -> str | None:
    match = _MUSUBI_HUNYUAN.match(name)
    if match is None:
        return None
    inner = _MUSUBI_INNER.get(match[3], match[3])
    return f"{match[1]}.{match[2]}.{inner}"


def _hunyuan_to_diffusers(name: str, pair: LoraPair, shapes) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(diffusers module, down, up) for one original HunyuanVideo module."""
    single = re.fullmatch(r"single_blocks\.(\d+)\.linear1", name)
    if single:
        # (q, k, v, mlp) rows at the model's width; diffusers' converter hard-codes 3072.
        block = f"single_transformer_blocks.{single[1]}"
        width = shapes.get(f"{block}.attn.to_q.weight", (0,))[0]
        mlp = pair.up.shape[0] - 3 * width
        if width == 0 or mlp <= 0:
            return []
        ups = torch.split(pair.up, [width, width, width, mlp], dim=0)
        names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
        return [(f"{block}.{n}", pair.down, up) for n, up in zip(names, ups)]
    if name == "final_layer.adaLN_modulation.1":
        shift, scale = pair.up.chunk(2, dim=0)  # the original's order; diffusers' norm_out is (scale, shift)
        return [("norm_out.linear", pair.down, torch.cat([scale, shift], dim=0))]
    from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers

    converted = _convert_hunyuan_video_lora_to_diffusers(
        {f"{name}.lora_A.weight": pair.down, f"{name}.lora_B.weight": pair.up})
    downs, ups = {}, {}
    for key, value in converted.items():
        module = key.removeprefix("transformer.")
        if module.endswith(".lora_A.weight"):
            downs[module.removesuffix(".lora_A.weight")] = value
        elif module.endswith(".lora_B.weight"):
            ups[module.removesuffix(".lora_B.weight")] = value
    if set(downs) != set(ups):
        return []
    return [(m, downs[m], ups[m]) for m in sorted(downs)]


# --- the LoRA folder ---------------------------------------------------------------------


def describe_lora(path: Path) -> dict:
    """Format, ranks and module count of one file, from its header only (no tensor is read)."""
    from safetensors import safe_open

    row = {"file": path.name, "size_mb": round(path.stat().st_size / 1e6, 3)}
    try:
        refuse_pickle(path)
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            row["format"] = detect_format(keys)
            downs = [k for k in keys if k.endswith(_DOWN)]
            row["modules"] = len(downs)
            row["ranks"] = sorted({handle.get_slice(k).get_shape()[0] for k in downs})
    except UserError as exc:
        row["error"] = str(exc)
    except Exception as exc:  # a damaged header: listed, not fatal
        row["error"] = f"cannot read it as safetensors ({exc})"
    return row


def describe_lora_dir() -> tuple[Path, list[dict]]:
    """Every file of the LoRA folder (pickles listed with the reason they are refused)."""
    folder = lora_dir()
    if not folder.is_dir():
        return folder, []
    files = sorted(p for p in folder.iterdir() if p.is_file() and (
        p.suffix.lower() == ".safetensors" or p.suffix.lower() in PICKLE_SUFFIXES))
    return folder, [describe_lora(p) for p in files]
