"""Estimate a job's peak VRAM and system RAM before loading anything, and
refuse jobs the machine clearly cannot run (exit 2 with the numbers and the
profiles that would fit) instead of dying half-way or swapping for hours.

The estimates are deliberately simple: weights from parameter counts and
the weight format, activations from the packed sequence length. The VAE
decode is the exception: it follows the decoder layer by layer from its
config (framepack.engine.vae_memory), because an untiled decode grows with the 4th
power of the size and at 2048x2048 needs hundreds of GB. Where tiling lowers
the job's peak the plan tiles the decode (``Plan.vae_tiling``). The weights
and the VAE decode are checked against measurements on the CPU (benchmarks/,
docs/memory.md); the activations only where a GPU was available; treat the
whole as +-30 %.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from framepack.engine.profiles import Profile
from framepack.errors import UserError
from framepack.hardware import HardwareInfo
from framepack.models.quantize import quantized_parameter_names
from framepack.engine.vae_memory import VaeGeometry, decode_peak_bytes

GIB = 1024**3

# Parameter counts of the original models (from their configs), used when the
# weights come from the hub and their configs are not cached locally.
KNOWN_PARAMS = {
    "transformer": 12_874_314_816,  # counted from the config on the meta device
    "transformer_block": 339_831_296,  # largest block (a double-stream block)
    "text_encoder": 7_505_186_816,  # HunyuanVideo's Llama-3-8B (vocabulary 128,320), no lm_head
    "text_encoder_2": 123_060_480,  # CLIP-L text
    "image_encoder": 428_225_600,  # SigLIP so400m
    "vae": 246_478_803,
    # Of those, what each weight format stores quantized (framepack.models.quantize decides
    # what stays in the compute dtype; counted by applying it to the meta model).
    "transformer_fp8": 9_061_785_600,
    "transformer_block_fp8": 226_547_712,
    "transformer_nf4": 12_457_279_488,
    "transformer_block_nf4": 339_738_624,
    "text_encoder_nf4": 6_979_321_856,  # every Linear; the 0.5B embedding stays fp16
}
FORMAT_BYTES = {"fp8": 1.0, "nf4": 0.5625}  # 4 bits + one fp32 scale per 64 weights
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
INNER_DIM = 3072  # 24 heads x 128


@dataclass(frozen=True)
class Plan:
    offload: str
    vram_gb: float  # peak on the accelerator (0 on CPU)
    ram_gb: float  # peak system RAM
    notes: tuple[str, ...]
    # Decode in spatial tiles: what the engine must pass to the VAE's set_tiling. True
    # when the profile asks for it or when an untiled decode would raise the peak.
    vae_tiling: bool = False
    vae_decode_gb: float = 0.0  # the largest section decode, above the VAE's weights

    def summary(self) -> str:
        vram = f"{self.vram_gb:.1f} GB VRAM, " if self.vram_gb else ""
        tiled = ", VAE decode tiled" if self.vae_tiling else ""
        return f"about {vram}{self.ram_gb:.1f} GB RAM with offload {self.offload}{tiled}"


# Config files whose content decides the counts (each part's config.json).
COUNTED_CONFIGS = ("transformer", "vae", "text_encoder", "text_encoder_2", "image_encoder")
COUNT_RECIPE = "meta-count/v1"  # bump when what is counted changes (e.g. quantize's rules)


def count_params(source) -> dict[str, int]:
    """Parameter counts per part: from the local configs, else the known counts
    of the originals.

    Counting instantiates every part on the meta device (no weights read) and
    imports every model class, the text encoders' too when the prompt cache
    spares loading them: 3.4 s of a tiny-model CPU job's plan, and 0.27 s of
    each later job in a warm process (benchmarks/overhead_bench.py). So the
    counts are kept on disk under the cache folder, keyed by the configs' bytes
    and what else decides them (library versions, whether bitsandbytes is
    installed); any change counts again, and a cache that cannot be written
    only costs the count."""
    if source.root is None:
        return dict(KNOWN_PARAMS)
    root = Path(source.root)
    path = _count_cache_path(root)
    if path is not None:
        try:
            cached = json.loads(path.read_text())
            if isinstance(cached, dict) and set(cached) >= set(KNOWN_PARAMS) and \
                    all(isinstance(v, int) for v in cached.values()):
                return cached
        except (OSError, ValueError):
            pass  # absent or damaged: count again
    counts = _count_on_meta(root)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(counts, sort_keys=True))
            tmp.replace(path)
        except OSError:
            pass  # a read-only cache only costs the count next time
    return counts


def _count_cache_path(root: Path) -> Path | None:
    """Where the counts of the model in ``root`` are kept; None when a config is
    unreadable (the count then raises the error the user should see)."""
    from importlib.metadata import PackageNotFoundError, version

    from framepack import __version__
    from framepack.models.prompt_cache import cache_dir

    digest = hashlib.sha256()
    libs = []
    for lib in ("diffusers", "transformers"):
        try:
            libs.append(version(lib))
        except PackageNotFoundError:
            libs.append(None)
    nf4 = importlib.util.find_spec("bitsandbytes") is not None
    digest.update(json.dumps([COUNT_RECIPE, __version__, libs, nf4]).encode())
    for part in COUNTED_CONFIGS:
        try:
            digest.update((root / part / "config.json").read_bytes())
        except OSError:
            return None
        digest.update(b"\0")
    return cache_dir().parent / "params" / f"{digest.hexdigest()}.json"


def _count_on_meta(root: Path) -> dict[str, int]:
    """Count from the configs by building every part on the meta device."""
    import torch
    from accelerate import init_empty_weights

    counts = {}
    with init_empty_weights():
        from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoFramepackTransformer3DModel
        from transformers import AutoConfig, CLIPTextModel, LlamaModel, SiglipVisionModel

        config = json.loads((root / "transformer/config.json").read_text())
        t = HunyuanVideoFramepackTransformer3DModel.from_config(config)
        counts["transformer"] = sum(p.numel() for p in t.parameters())
        largest = max(list(t.transformer_blocks) + list(t.single_transformer_blocks),
                      key=lambda b: sum(p.numel() for p in b.parameters()))
        counts["transformer_block"] = sum(p.numel() for p in largest.parameters())
        block_names = {name for name, module in t.named_modules() if module is largest}
        for fmt in ("fp8", "nf4"):
            if fmt == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
                continue  # cannot be used here anyway; the original's counts stand in
            sizes = dict(t.named_parameters())
            quantized = quantized_parameter_names(HunyuanVideoFramepackTransformer3DModel.from_config(config), fmt)
            counts[f"transformer_{fmt}"] = sum(sizes[n].numel() for n in quantized)
            counts[f"transformer_block_{fmt}"] = sum(
                sizes[n].numel() for n in quantized if any(n.startswith(b + ".") for b in block_names))
        v = AutoencoderKLHunyuanVideo.from_config(json.loads((root / "vae/config.json").read_text()))
        counts["vae"] = sum(p.numel() for p in v.parameters())
        for part, cls in (("text_encoder", LlamaModel), ("text_encoder_2", CLIPTextModel), ("image_encoder", SiglipVisionModel)):
            model = cls(AutoConfig.from_pretrained(root / part))
            counts[part] = sum(p.numel() for p in model.parameters())
            if part == "text_encoder":  # transformers' NF4 quantizes every Linear weight
                counts["text_encoder_nf4"] = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    for key, value in KNOWN_PARAMS.items():
        counts.setdefault(key, value)
    return counts


def vae_geometry(source) -> VaeGeometry:
    """The VAE's shape from the local vae/config.json, else the original's."""
    if source.root is None:
        return VaeGeometry()
    return VaeGeometry.from_config(json.loads((Path(source.root) / "vae/config.json").read_text()))


def packed_tokens(height: int, width: int, latent_window_size: int = 9) -> int:
    """Image tokens of one forward: lws noisy frames + 2 clean + 2x + 4x context."""
    h, w = height // 8, width // 8
    per_frame = (h // 2) * (w // 2)
    ceil = lambda a, b: -(-a // b)  # noqa: E731
    return (latent_window_size + 2) * per_frame + ceil(h, 4) * ceil(w, 4) + 4 * ceil(h, 8) * ceil(w, 8)


def _weight_bytes(params: int, dtype: str, fmt: str = "none", quantized: int | None = None) -> float:
    """Bytes of ``params`` weights of which ``quantized`` (default: all) are stored in
    ``fmt`` and the rest in ``dtype``."""
    if fmt not in FORMAT_BYTES:
        return params * DTYPE_BYTES[dtype]
    q = params if quantized is None else quantized
    return q * FORMAT_BYTES[fmt] + (params - q) * DTYPE_BYTES[dtype]


def estimate(profile: Profile, offload: str, params: dict[str, int], height: int, width: int,
             frames: int, latent_window_size: int = 9, inverted: bool = True, device: str = "cuda",
             vae: VaeGeometry | None = None, vae_tiling: bool | None = None, head: int = 1) -> Plan:
    """The plan for one job. ``vae`` defaults to the original VAE's shape;
    ``vae_tiling`` None tiles the decode when the profile asks for it or where that
    lowers the peak, True or False forces it. ``head``: latent frames the inverted
    model's last section decodes in front of its own (1, the start latent; a
    window's worth when it extends a video, framepack.pipeline.extend)."""
    q, dt = profile.quantize, profile.dtype
    tq, lq = q["transformer"], q["text_encoder"]
    weights = {
        "transformer": _weight_bytes(params["transformer"], dt["transformer"], tq, params.get(f"transformer_{tq}")),
        "block": _weight_bytes(params["transformer_block"], dt["transformer"], tq, params.get(f"transformer_block_{tq}")),
        "llama": _weight_bytes(params["text_encoder"], dt["text_encoder"], lq, params.get(f"text_encoder_{lq}")),
        "clip": _weight_bytes(params["text_encoder_2"], dt["text_encoder"]),
        "siglip": _weight_bytes(params["image_encoder"], dt["image_encoder"]),
        "vae": _weight_bytes(params["vae"], dt["vae"]),
    }
    tokens = packed_tokens(height, width, latent_window_size) + 729 + 256
    act_bytes = DTYPE_BYTES[dt["transformer"]]
    # Widest point of a single-stream block: q/k/v, MLP (4x), concat and output.
    activations = 24 * INNER_DIM * tokens * act_bytes
    overhead = 0.6 * GIB  # CUDA context, allocator slack
    text_stage = weights["llama"] + weights["clip"]
    streamed = offload in ("dynamic_swap", "sequential", "stream_prefetch")
    # Pixels: one section's decode (2*lws+1 latent frames -> 8*lws+1 frames) in float32
    # plus the float cross-fade edge. Finished frames go to disk section by section
    # (framepack.output.outputs), so neither the length nor the variant changes this.
    frame_bytes = height * width * 3 * 4
    video = (8 * latent_window_size + 1 + 33) * frame_bytes

    def peaks(vae_decode: float) -> tuple[float, float]:
        """(VRAM, RAM) in bytes with this VAE decode."""
        if offload == "resident":
            vram = sum(weights.values()) - weights["block"] + max(activations, vae_decode)
        elif streamed:
            live_blocks = 3 if offload == "stream_prefetch" else 1
            transformer_stage = live_blocks * weights["block"] + activations
            vram = max(transformer_stage, weights["vae"] + vae_decode, weights["siglip"],
                       weights["clip"] + live_blocks * weights["block"])
        else:  # model_swap
            vram = max(weights["transformer"] + activations, weights["vae"] + vae_decode, text_stage,
                       weights["siglip"])
        vram += overhead
        # RAM: each stage's models are loaded when it comes and the encoders are released
        # before the transformer loads (framepack.pipeline.generate), so the peak is the largest
        # stage: text encoders; image encoder + VAE; transformer + VAE. On the CPU the
        # VAE decodes in RAM while the transformer is still loaded.
        if offload == "resident" and device != "cpu":
            on_cpu = max(weights["transformer"], text_stage)  # the largest load in flight
        else:
            decode_ram = vae_decode if device == "cpu" else 0.0
            on_cpu = max(text_stage, weights["siglip"] + weights["vae"],
                         weights["transformer"] + weights["vae"] + decode_ram)
        if offload == "stream_prefetch":
            on_cpu += weights["transformer"] * 0.1  # pinned staging
        ram = on_cpu + video + 2.5 * GIB  # python, torch, libraries
        return (vram if device != "cpu" else 0.0), ram

    # The largest decode is a later section's 2*lws+1 latent frames (framepack.pipeline.loop),
    # 2*lws+head for the inverted model's last one. An extension's VAE encode of up to 73 input
    # frames (19 latents) is about the size of that decode and is not counted apart.
    vae = vae or VaeGeometry()
    decoded = 2 * latent_window_size + (head if inverted else 1)

    def decode(tiled: bool) -> float:
        return decode_peak_bytes(vae, decoded, height, width, DTYPE_BYTES[dt["vae"]], tiled, device)

    untiled, tiled = decode(False), decode(True)
    auto = vae_tiling is None and not profile.vae_tiling
    if auto:
        # Tiling costs a little seam blending (64 px cross-faded) and about 1.8x the
        # decode's compute; an untiled decode that sets the job's peak costs memory the
        # rest of the job does not need (15 GB at 640x608 in fp16, hundreds at 2048).
        tiling = any(t < u for t, u in zip(peaks(tiled), peaks(untiled)))
    else:
        tiling = bool(profile.vae_tiling if vae_tiling is None else vae_tiling)
    vae_decode = tiled if tiling else untiled
    vram, ram = peaks(vae_decode)
    notes = [f"{tokens} tokens per forward", f"transformer weights {weights['transformer'] / GIB:.1f} GB",
             f"{frames} frames written to disk section by section ({'end first' if inverted else 'in order'})",
             f"VAE decode of {decoded} latent frames: {vae_decode / GIB:.1f} GB"]
    if auto and tiling:
        notes.append(f"VAE decode tiled ({vae.tile_sample_min_width} px tiles): untiled it would need "
                     f"{untiled / GIB:.1f} GB and set this job's peak")
    return Plan(offload, vram / GIB, ram / GIB, tuple(notes), tiling, vae_decode / GIB)


def plan_job(engine, source, height: int, width: int, frames: int, lws: int, inverted: bool, head: int = 1,
             kept_ram_bytes: int = 0) -> Plan:
    """The plan for the engine's profile, checked against the hardware; the
    shipped and user profiles for the same device are the alternatives.
    ``kept_ram_bytes``: RAM held beside the models whatever the profile (a warm
    transformer's LoRA pre-merge copies), added to every plan."""
    plan, alternatives = plan_with_alternatives(engine, source, height, width, frames, lws, inverted, head)
    if kept_ram_bytes:
        def held(p: Plan) -> Plan:
            note = f"LoRA pre-merge copies kept for the next switch: {kept_ram_bytes / GIB:.1f} GB of RAM"
            return dataclasses.replace(p, ram_gb=p.ram_gb + kept_ram_bytes / GIB, notes=p.notes + (note,))

        plan, alternatives = held(plan), [(name, held(alt)) for name, alt in alternatives]
    check_fits(plan, engine.hardware, alternatives)
    return plan


def plan_with_alternatives(engine, source, height: int, width: int, frames: int, lws: int,
                           inverted: bool, head: int = 1) -> tuple[Plan, list[tuple[str, Plan]]]:
    """The engine's profile's plan, and each other profile's for the same device
    (what ``check_fits`` names when the first does not fit)."""
    hw = engine.hardware
    params = count_params(source)
    vae = vae_geometry(source)

    def plan_for(profile: Profile) -> Plan | None:
        for name in profile.offload:
            entry = engine.registry.get("offload", name)
            if entry is not None and entry.backend.unavailable_reason(hw) is None:
                return estimate(profile, name, params, height, width, frames, lws, inverted, hw.device, vae, head=head)
        return None

    plan = estimate(engine.profile, engine.choices["offload"].name, params, height, width, frames, lws, inverted,
                    hw.device, vae, head=head)
    alternatives = []
    for name, profile in sorted(engine.profiles.profiles.items()):
        devices = profile.match.get("device", [])
        if name != engine.profile.name and hw.device in ([devices] if isinstance(devices, str) else devices):
            alt = plan_for(profile)
            if alt is not None:
                alternatives.append((name, alt))
    return plan, alternatives


def resident_between_jobs(profile: Profile, params: dict[str, int], hw: HardwareInfo) -> tuple[frozenset, frozenset]:
    """What a warm pipeline keeps loaded between jobs, as ``(keep, alone)`` for
    ``framepack.pipeline.warm.ModelStore``.

    Every model when all of them together fit in 85 % of system RAM (with the
    same 2.5 GB allowance as a job's plan). Otherwise the image encoder, VAE and
    transformer stay and the text encoders do not: they are loaded only for a
    prompt the prompt cache does not hold, and alone (the others released
    first), so that stage's peak stays what a one-shot job's is."""
    dt, q = profile.dtype, profile.quantize
    text = (_weight_bytes(params["text_encoder"], dt["text_encoder"], q["text_encoder"],
                          params.get(f"text_encoder_{q['text_encoder']}"))
            + _weight_bytes(params["text_encoder_2"], dt["text_encoder"]))
    rest = (_weight_bytes(params["transformer"], dt["transformer"], q["transformer"],
                          params.get(f"transformer_{q['transformer']}"))
            + _weight_bytes(params["image_encoder"], dt["image_encoder"]) + _weight_bytes(params["vae"], dt["vae"]))
    budget = 0.85 * hw.ram_total_gb * GIB - 2.5 * GIB
    if text + rest <= budget:
        return frozenset({"text", "vision", "vae", "transformer"}), frozenset()
    return frozenset({"vision", "vae", "transformer"}), frozenset({"text"})


def check_fits(plan: Plan, hw: HardwareInfo, alternatives: list[tuple[str, Plan]]) -> None:
    """Raise a UserError when the job clearly cannot run on this machine."""
    problems = []
    if hw.device == "cuda" and hw.vram_total_gb is not None and plan.vram_gb > hw.vram_total_gb:
        problems.append(f"about {plan.vram_gb:.1f} GB of VRAM but the GPU has {hw.vram_total_gb:.1f} GB")
    if plan.ram_gb > hw.ram_total_gb > 0:
        problems.append(f"about {plan.ram_gb:.1f} GB of system RAM but the machine has {hw.ram_total_gb:.1f} GB")
    if not problems:
        return
    fits = [name for name, p in alternatives
            if (hw.device != "cuda" or p.vram_gb <= (hw.vram_total_gb or 0)) and p.ram_gb <= hw.ram_total_gb]
    hint = f"profiles that would fit: {', '.join(fits)} (--profile NAME)" if fits else \
        "no shipped profile fits; try a smaller --size or --resolution, quantize, or more RAM"
    raise UserError(f"this job needs {' and '.join(problems)} (offload {plan.offload}); {hint}")
