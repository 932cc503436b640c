"""Merge LoRAs into the transformer's weights, and switch them in a warm model.

Each touched weight becomes ``W + sum_i scale_i * alpha_i / rank_i * B_i @ A_i``,
computed in float32 from ``W`` as the checkpoint stores it, then rounded the way
the loader rounds a checkpoint tensor: to the compute dtype, then to what the
model stores (fp8 cast after the merge, NF4 quantized after the merge). So a
LoRA on any weight format gives exactly what a checkpoint merged by hand gives,
and every offload policy sees ordinary weights.

Switching: the model carries a ``LoraMerge`` with a copy of each touched weight
as it was before any merge (as the checkpoint stores it, CPU), when it stays
loaded for more jobs. A new set of LoRAs writes
``original + its deltas`` into the weights it touches and the plain original back
into those only the old set touched, in place, so hooks and offload copies keep
pointing at the same tensors. Nothing is read from the transformer's files
except the touched tensors themselves, the first time a LoRA touches them.
Extra RAM in a warm model: the touched weights once, in the checkpoint's dtype;
a model used for one job (the CLI) keeps none.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from framepack.errors import UserError
from framepack.models.lora_formats import LoraFile, Piece, map_to_model, read_lora
from framepack.notes import note

ATTRIBUTE = "_framepack_lora"  # where the LoraMerge lives on the model


@dataclass(frozen=True)
class LoraRequest:
    """One LoRA of a job: the resolved file and its scale."""

    path: Path
    scale: float

    def key(self) -> tuple:
        stat = self.path.stat()
        return (str(self.path), stat.st_size, stat.st_mtime_ns, self.scale)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def plan_loras(requests: list[LoraRequest], shapes: dict[str, tuple[int, ...]], strict: bool = True
               ) -> dict[str, list[Piece]]:
    """Read every LoRA and map it onto the weights of ``shapes``: ``{weight: pieces}``.
    Scale 0 leaves a LoRA out (after checking it). Keys matching no module are an
    error listing five of them (``strict=False``: a note)."""
    plan: dict[str, list[Piece]] = {}
    for request in requests:
        lora: LoraFile = read_lora(request.path)
        targets, unmatched = map_to_model(lora, shapes)
        if unmatched:
            shown = ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
            message = (f"LoRA {request.path.name} ({lora.format}): {len(unmatched)} keys match no transformer "
                       f"module: {shown}")
            if strict:
                raise UserError(message + "; is it a LoRA for another model? (--lora-strict off applies the rest)")
            note(message + "; applying the rest (--lora-strict off)")
        if not targets:
            raise UserError(f"LoRA {request.path.name} ({lora.format}): nothing in it matches the transformer")
        if request.scale == 0:
            continue
        for weight, pieces in targets.items():
            for piece in pieces:
                plan.setdefault(weight, []).append(Piece(piece.down, piece.up, piece.factor * request.scale, piece.key))
    return plan


# safetensors dtype names -> bytes per element
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1}


@dataclass
class WeightOrigin:
    """Where the loaded transformer's weights came from (a folder or hub repo and its
    subfolder), for the originals a merge reads. The files are looked up only when a
    LoRA is first merged: a job without LoRA never touches them."""

    where: str
    subfolder: str | None
    compute_dtype: torch.dtype
    _index: dict[str, Path] | None = field(default=None, repr=False)

    def file_of(self, name: str) -> Path | None:
        """The shard holding ``name`` (headers read once)."""
        if self._index is None:
            from safetensors import safe_open

            from framepack.models.lazy_load import checkpoint_files

            self._index = {}
            for path in checkpoint_files(self.where, self.subfolder):
                with safe_open(str(path), framework="pt") as handle:
                    self._index.update(dict.fromkeys(handle.keys(), path))
        return self._index.get(name)

    def stored_bytes(self, names) -> int:
        """Bytes the checkpoint stores for ``names``: what the kept pre-merge copies
        of those weights take (headers only, nothing is read)."""
        from safetensors import safe_open

        total = 0
        by_file: dict[Path, list[str]] = {}
        for name in names:
            path = self.file_of(name)
            if path is not None:
                by_file.setdefault(path, []).append(name)
        for path, found in by_file.items():
            with safe_open(str(path), framework="pt") as handle:
                for name in found:
                    part = handle.get_slice(name)
                    total += math.prod(part.get_shape()) * _DTYPE_BYTES.get(part.get_dtype(), 4)
        return total


@dataclass
class LoraMerge:
    origin: WeightOrigin | None
    applied: tuple = ()  # the LoraRequest keys merged now
    touched: set[str] = field(default_factory=set)  # weights that differ from the checkpoint now
    originals: dict[str, torch.Tensor] = field(default_factory=dict)  # weight -> pre-merge, checkpoint dtype, CPU
    last_switch_s: float = 0.0


def apply_loras(model: torch.nn.Module, requests: list[LoraRequest], plan: dict[str, list[Piece]],
                keep_originals: bool = True) -> bool:
    """Make ``model`` carry exactly the LoRAs of ``requests`` (``plan`` from
    ``plan_loras``). Returns whether any weight was written.

    ``keep_originals``: hold the pre-merge copies in RAM for the next switch (a warm
    model). Without it (a model used for one job) nothing is held beyond the tensor
    being merged, and a later switch reads the originals from the checkpoint again.
    A model without a known checkpoint always keeps them."""
    merge: LoraMerge = getattr(model, ATTRIBUTE, None) or LoraMerge(getattr(model, "_framepack_weights", None))
    setattr(model, ATTRIBUTE, merge)
    wanted = tuple(r.key() for r in requests if r.scale != 0)
    if wanted == merge.applied:
        return False
    keep = keep_originals or merge.origin is None
    started = time.perf_counter()
    params = dict(model.named_parameters())
    copies = _offload_copies(model)
    for name in sorted(merge.touched | set(plan)):
        param = params[name]
        original = merge.originals.pop(name, None)
        if original is None:
            original = _original(param, name, merge.origin)
        if name in plan:
            value = _merged(original, plan[name], param.device)
            merge.touched.add(name)
            if keep:
                merge.originals[name] = original
        else:
            value = original  # untouched from now on: its copy is not needed
            merge.touched.discard(name)
        _write(param, value, merge.origin and merge.origin.compute_dtype, copies.get(param, ()))
        del original, value
    merge.applied = wanted
    merge.last_switch_s = time.perf_counter() - started
    return True


def _merged(original: torch.Tensor, pieces: list[Piece], device: torch.device) -> torch.Tensor:
    """original + sum of factor * up @ down, in float32 (rounded by ``_write``). On a
    CUDA machine the product runs there even for weights kept in CPU RAM (offload
    policies): on CPU it is most of a switch's time."""
    where = device if device.type == "cuda" else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    total = original.to(where, torch.float32, copy=True)  # never the kept original itself
    for piece in pieces:
        # (out, in) += factor * (out, r) @ (r, in), fused: one pass over the weight
        total.addmm_(piece.up.to(where, torch.float32), piece.down.to(where, torch.float32), alpha=piece.factor)
    return total


def _is_4bit(param: torch.Tensor) -> bool:
    return type(param).__name__ == "Params4bit"


def _original(param: torch.nn.Parameter, name: str, origin: WeightOrigin | None) -> torch.Tensor:
    """The weight before any merge, as the checkpoint stores it: merging into that and
    then rounding as the loader does (to the compute dtype, then to fp8/NF4/float32)
    is exactly loading a checkpoint merged by hand. Without a known checkpoint (a
    model built in memory) the weight is copied from the model."""
    if origin is not None:
        from safetensors import safe_open

        path = origin.file_of(name)
        if path is None:
            raise UserError(f"cannot merge a LoRA into {name}: the checkpoint has no such tensor")
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(name).clone()  # not a view of the mapped file
    if param.is_floating_point() and param.dtype != torch.float8_e4m3fn and not _is_4bit(param):
        return param.detach().to("cpu", copy=True)
    raise UserError(f"cannot merge a LoRA into {name}: its weight format needs the checkpoint it came from")


def _write(param: torch.nn.Parameter, value: torch.Tensor, compute_dtype: torch.dtype | None, copies) -> None:
    """Put ``value`` into ``param`` in place, rounded as the loader rounds a checkpoint
    tensor (compute dtype, then the parameter's storage: fp8, NF4 or float32 for the
    output head), and into the offload ``copies`` of it."""
    if compute_dtype is not None and value.is_floating_point():
        value = value.to(compute_dtype)
    if _is_4bit(param):
        _requantize(param, value)
        return
    stored = value.to(param.dtype)
    with torch.no_grad():
        param.data.copy_(stored)
        for copy in copies:
            copy.copy_(stored)


def _requantize(param, value: torch.Tensor) -> None:
    """NF4: quantize the merged weight as bitsandbytes did at load, then move the
    packed data and its quantization state into the existing parameter."""
    import bitsandbytes as bnb

    fresh = bnb.nn.Params4bit(value.to("cpu"), requires_grad=False, quant_type=param.quant_type,
                              blocksize=param.blocksize, compress_statistics=param.compress_statistics,
                              quant_storage=param.quant_storage).to(param.device)
    with torch.no_grad():
        param.data.copy_(fresh.data)
    param.quant_state = fresh.quant_state


def _offload_copies(model: torch.nn.Module) -> dict:
    """diffusers' group offloading with streams keeps pinned CPU copies of the weights
    (``cpu_param_dict``) and loads from them: those must change too."""
    copies: dict = {}
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        for hook in getattr(registry, "hooks", {}).values():
            group = getattr(hook, "group", None)
            for param, tensor in (getattr(group, "cpu_param_dict", None) or {}).items():
                copies.setdefault(param, []).append(tensor)
    return copies


def touched_bytes(model: torch.nn.Module) -> int:
    """RAM held for switching: the pre-merge copies."""
    merge = getattr(model, ATTRIBUTE, None)
    return 0 if merge is None else sum(t.numel() * t.element_size() for t in merge.originals.values())
