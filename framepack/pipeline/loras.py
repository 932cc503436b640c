"""A job's LoRAs: which files (the job's, else the profile's), their record in the
job's metadata, the resume check, and merging them into the transformer the
model store hands out (framepack.models.lora does the merging)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from framepack.errors import UserError
from framepack.models.lora import LoraRequest, apply_loras, plan_loras, sha256_of
from framepack.models.lora_formats import Piece, check_scale, parse_lora_arg, resolve_lora_path


def normalize_loras(value) -> tuple[tuple[str, float], ...]:
    """``loras=`` as Pipeline.generate takes it: ``[(path, scale), ...]``, or
    ``"PATH[:SCALE]"`` strings, or bare paths."""
    if value is None:
        return ()
    if isinstance(value, (str, Path)):
        value = [value]
    pairs = []
    for item in value:
        if isinstance(item, Path):
            pairs.append((str(item), 1.0))
        elif isinstance(item, str):
            pairs.append(parse_lora_arg(item))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (str, Path)):
            pairs.append((str(item[0]), check_scale(str(item[0]), item[1])))
        else:
            raise UserError(f"loras: {item!r} is not a (path, scale) pair or a 'PATH[:SCALE]' string")
    return tuple(pairs)


def resolve_job_loras(settings, profile):
    """The settings with the job's LoRAs as absolute paths: those it names, else
    the profile's ``loras``. Bare names are found in the LoRA folder."""
    loras = settings.loras or tuple(profile.loras)
    resolved = tuple((str(resolve_lora_path(path)), float(scale)) for path, scale in loras)
    return dataclasses.replace(settings, loras=resolved)


def lora_records(settings) -> list[dict]:
    """What the job's metadata keeps of each LoRA: file name, path, sha256, scale."""
    return [{"file": Path(path).name, "path": path, "sha256": sha256_of(Path(path)), "scale": scale}
            for path, scale in settings.loras]


def check_loras_unchanged(recorded: dict, current: dict) -> None:
    """Resume refuses a LoRA file that is not the one the job started with, and
    another set of LoRAs (say the profile's ``loras`` changed since)."""
    before = recorded.get("inputs", {}).get("loras", [])
    after = current.get("inputs", {}).get("loras", [])
    started = {r.get("path"): r for r in before if isinstance(r, dict)}
    for entry in after:
        was = started.get(entry["path"])
        if was is not None and was.get("sha256") != entry["sha256"]:
            raise UserError(f"LoRA {entry['file']} changed since this job started (sha256 "
                            f"{str(was.get('sha256'))[:12]} -> {entry['sha256'][:12]}); its checkpoint cannot "
                            "continue with other weights")
    was, now = _names(before), _names(after)
    if was != now:
        raise UserError(f"this job would continue with other LoRAs than it started with ({', '.join(was) or 'none'} -> "
                        f"{', '.join(now) or 'none'}); run it with the profile it started with, or start over")


def _names(records: list) -> list[str]:
    return [f"{r.get('file')}:{r.get('scale')}" for r in records if isinstance(r, dict)]


@dataclass
class JobLoras:
    """The job's LoRAs, read and mapped onto the transformer before anything loads."""

    requests: list[LoraRequest] = field(default_factory=list)
    plan: dict[str, list[Piece]] = field(default_factory=dict)

    keep_originals: bool = True  # the transformer stays loaded: hold pre-merge copies for the next switch

    def kept_bytes(self, source) -> int:
        """RAM the pre-merge copies take in a transformer kept warm: the touched
        weights as the checkpoint stores them (framepack.models.lora)."""
        if not self.plan:
            return 0
        from framepack.models.lora import WeightOrigin

        where, sub = source.location("transformer")
        return WeightOrigin(where, sub, torch.float32).stored_bytes(self.plan)

    def merge_into(self, model: torch.nn.Module) -> torch.nn.Module:
        """Make the (fresh or warm) transformer carry exactly these LoRAs."""
        apply_loras(model, self.requests, self.plan, self.keep_originals)
        return model


def prepare_job_loras(settings, source) -> JobLoras:
    """Read every LoRA and check it against the transformer's config (meta model:
    no weights load), so a bad file stops the job before any model loads."""
    requests = [LoraRequest(Path(path), scale) for path, scale in settings.loras]
    if not requests:
        return JobLoras()
    from framepack.pipeline.transformer import transformer_weight_shapes

    return JobLoras(requests, plan_loras(requests, transformer_weight_shapes(source), settings.lora_strict))
