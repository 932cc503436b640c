"""The `framepack` command. Exit codes: 0 done, 2 bad input or usage, 1 anything else."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import signal
import sys
import traceback
from pathlib import Path

from framepack import __version__
from framepack.errors import FramepackError, UserError
from framepack.models.heap import enable_huge_pages


def _add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", help="use this profile instead of the one matching this machine")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the profile, e.g. attention=sdpa or dtype.vae=float32 (repeatable)")
    p.add_argument("--config", dest="config_files", action="append", default=[], type=Path, metavar="FILE",
                   help="extra profile file, applied after the shipped and user files (repeatable)")


def _add_control_args(g: argparse.ArgumentParser) -> None:
    """Creative controls (docs/controls.md)."""
    g.add_argument("--prompts", type=Path, metavar="FILE",
                   help="timed prompts from a TOML or JSON list of {start, end?, prompt} (instead of --prompt)")
    g.add_argument("--end-image", type=Path, metavar="IMG", help="end frame the video heads for (original variant)")
    g.add_argument("--end-strength", type=float, default=None, metavar="S", help="end frame strength 0..1 (default 1)")
    g.add_argument("--image-embeds", choices=("start", "linear", "mean"), default=None,
                   help="image embedding per section: start, linear (default with --end-image) or mean")
    g.add_argument("--keyframe", dest="keyframes", action="append", default=None, metavar="TIME=IMG",
                   help="condition the section covering TIME seconds on IMG (original variant; repeatable)")
    g.add_argument("--blank", choices=("gray", "black", "white", "noise"), default=None,
                   help="start frame without --image (default gray; noise is drawn from --seed)")
    g.add_argument("--extend", type=Path, metavar="VIDEO",
                   help="continue this video by --seconds more (instead of --image); the output holds both")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="framepack", description="FramePack image-to-video engine.")
    parser.add_argument("--version", action="version", version=f"framepack {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="render a video from an image and a prompt")
    g.add_argument("--from", dest="from_", type=Path, metavar="VIDEO_OR_JSON",
                   help="re-run the job recorded in a framepack video, sidecar .json, png folder or latents file; "
                        "flags given as well override its settings")
    g.add_argument("--image", type=Path, help="start image (PNG, JPEG, WebP, ...); left out: text-to-video from --blank")
    g.add_argument("--prompt", help="what should happen in the video; timed: \"[0s: a man waves] [2s-4s: he jumps]\" "
                   "(docs/controls.md)")
    g.add_argument("--prompt-blend", type=int, default=None, metavar="N",
                   help="timed prompts: blend each change in over the N sections before it (default 0: switch)")
    g.add_argument("--negative-prompt", default=None, help="used only when --cfg > 1")
    _add_control_args(g)
    g.add_argument("--model", help="local model folder, or a hub repo id with the same layout (default: the original hub repos)")
    g.add_argument("--variant", choices=("original", "f1"), default=None,
                   help="original: inverted anti-drifting model (generates the end first); f1: forward model")
    g.add_argument("--seconds", type=float, default=None, help="video length (default 5)")
    g.add_argument("--steps", type=int, default=None, help="sampler steps per section (default 25)")
    g.add_argument("--seed", type=int, default=None, help="random seed (default 31337)")
    g.add_argument("--gs", type=float, default=None, help="distilled guidance scale (default 10)")
    g.add_argument("--cfg", type=float, default=None, help="real CFG scale; > 1 adds a negative pass (default 1)")
    g.add_argument("--rs", type=float, default=None, help="CFG rescale, 0..1 (default 0)")
    g.add_argument("--resolution", type=int, default=None, help="bucket base resolution (default 640, the original's table)")
    g.add_argument("--size", help="exact HEIGHTxWIDTH, multiples of 16 (overrides --resolution)")
    g.add_argument("--window", "--latent-window-size", dest="window", type=int, default=None, metavar="N",
                   help="latent window size: latent frames per section, 1-33 (default 9: 33 new frames a section)")
    g.add_argument("--output", type=Path, help="output video (default framepack_<time>_<seed>.mp4)")
    g.add_argument("--latents-out", type=Path, help="also write the finished latents to this .safetensors file")
    g.add_argument("--json", action="store_true", help="print a JSON summary on stdout when done")
    g.add_argument("--quiet", action="store_true", help="no progress on stderr")
    g.add_argument("--preview", type=Path, metavar="PNG",
                   help="keep this image updated with the latest step's rough preview while it runs")
    g.add_argument("--preview-every", type=int, default=1, metavar="N", help="update the preview every N steps")
    g.add_argument("--job-dir", type=Path,
                   help="where finished sections and the checkpoint go while it runs (default OUTPUT.job)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs (default: an existing output gets a new name, -1, -2, ...)")
    g.add_argument("--no-prompt-cache", action="store_true",
                   help="encode the prompt even if its embedding is cached on disk (and do not cache it)")
    g.add_argument("--lora", dest="loras", action="append", default=None, metavar="PATH[:SCALE]",
                   help="merge a LoRA (.safetensors; a bare name is looked up in FRAMEPACK_LORA_DIR) at SCALE "
                        "(default 1); repeatable, the updates add up (docs/lora.md)")
    g.add_argument("--lora-strict", choices=("on", "off"), default=None,
                   help="LoRA keys that match no transformer module: on = error (default), off = a note")
    _add_profile_args(g)

    lo = sub.add_parser("loras", help="list the LoRA folder (FRAMEPACK_LORA_DIR): format, rank, modules, size")
    lo.add_argument("--json", action="store_true")

    p = sub.add_parser("profiles", help="list profiles, which one matches this machine, and why")
    p.add_argument("--json", action="store_true")
    _add_profile_args(p)

    pl = sub.add_parser("plugins", help="list backends per family, where each came from, and whether it can run here")
    pl.add_argument("--json", action="store_true")

    r = sub.add_parser("resume", help="continue a job that was interrupted or killed, from its job folder")
    r.add_argument("job_dir", type=Path)
    r.add_argument("--json", action="store_true", help="print a JSON summary on stdout when done")
    r.add_argument("--quiet", action="store_true", help="no progress on stderr")
    r.add_argument("--preview", type=Path, metavar="PNG", help="as for generate")
    r.add_argument("--preview-every", type=int, default=1, metavar="N", help="as for generate")
    r.add_argument("--overwrite", action="store_true", help="as for generate")
    r.add_argument("--recompute-from", type=int, default=None, metavar="K",
                   help="compute sections K and later again (when resume says a section is lost)")

    i = sub.add_parser("info", help="print the job recorded in a framepack video, sidecar, png folder or latents file")
    i.add_argument("path", type=Path)
    i.add_argument("--json", action="store_true", help="the raw record")

    k = sub.add_parser("cache", help="show or clear the prompt-embedding cache")
    k.add_argument("action", choices=("info", "clear"))

    t = sub.add_parser("make-tiny-model", help="write a model folder with tiny random weights (for tests and offline demos)")
    t.add_argument("dir", type=Path)
    t.add_argument("--seed", type=int, default=0)

    f = sub.add_parser("make-full-model", help="write a model folder at the originals' full size with random weights "
                       "(44 GB; for memory and speed benchmarks without downloads)")
    f.add_argument("dir", type=Path)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--parts", default=",".join(("transformer", "text_encoder", "text_encoder_2", "image_encoder", "vae")),
                   help="comma-separated parts to write (default: all)")
    f.add_argument("--shard-gb", type=float, default=4.0, help="largest safetensors shard (default 4)")

    c = sub.add_parser("calibrate", help="fit a step cache to your model: run uncached, measure, write a calibration file")
    c.add_argument("--cache", required=True, choices=("teacache", "magcache"), help="which cache to calibrate")
    c.add_argument("--image", required=True, type=Path, help="start image of the measured run")
    c.add_argument("--prompt", required=True, help="prompt of the measured run")
    c.add_argument("--negative-prompt", default="", help="used only when --cfg > 1")
    c.add_argument("--model", help="local model folder or hub repo id (default: the original hub repos)")
    c.add_argument("--variant", choices=("original", "f1"), default="original")
    c.add_argument("--seconds", type=float, default=5.0, help="video length; more sections give more measurements (default 5)")
    c.add_argument("--steps", type=int, default=25, help="sampler steps per section, as you will generate (default 25)")
    c.add_argument("--seed", type=int, default=31337)
    c.add_argument("--gs", type=float, default=10.0)
    c.add_argument("--cfg", type=float, default=1.0, help="> 1 also measures the negative branch")
    c.add_argument("--resolution", type=int, default=640)
    c.add_argument("--size", help="exact HEIGHTxWIDTH, multiples of 16 (overrides --resolution)")
    c.add_argument("--output", type=Path, help="calibration file to write (default calibration_<cache>_<variant>_<steps>steps.json)")
    c.add_argument("--json", action="store_true", help="print the calibration file's summary as JSON on stdout")
    c.add_argument("--quiet", action="store_true", help="no progress on stderr")
    _add_profile_args(c)

    # The render service (framepack/service, docs/service.md): serve, worker, queue.
    from framepack.service.commands import add_parsers as add_service_parsers

    add_service_parsers(sub)
    return parser


def _eprint(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


GENERATE_FLAGS = {  # argparse dest -> Pipeline.generate setting (the same names)
    "image": "image", "prompt": "prompt", "negative_prompt": "negative_prompt", "output": "output",
    "variant": "variant", "seconds": "seconds", "steps": "steps", "seed": "seed", "gs": "gs", "cfg": "cfg",
    "rs": "rs", "window": "window", "resolution": "resolution", "size": "size", "latents_out": "latents_out",
    "model": "model", "prompt_blend": "prompt_blend",
    "prompts": "prompts", "end_image": "end_image", "end_strength": "end_strength", "image_embeds": "image_embeds",
    "keyframes": "keyframes", "blank": "blank", "extend": "extend",
}


def _pipeline(args, profile=None, overrides=(), config_files=()):
    """A one-shot Pipeline: nothing is kept between stages (the process ends after
    the job), with the progress reporter and the engine report on stderr."""
    from framepack.api import Pipeline
    from framepack.output.progress import ProgressReporter

    def report(engine) -> None:
        _eprint(f"hardware: {engine.hardware.summary()}")
        _eprint(f"profile: {engine.profile.name} ({engine.selection.why})")
        for choice in engine.choices.values():
            _eprint("  " + choice.explain())

    return Pipeline(profile=profile, overrides=overrides, config_files=config_files, keep_loaded="none",
                    plugins=[] if args.quiet else [ProgressReporter()], on_engine=None if args.quiet else report)


def cmd_generate(args) -> int:
    settings = {name: getattr(args, dest) for dest, name in GENERATE_FLAGS.items() if getattr(args, dest) is not None}
    if args.no_prompt_cache:
        settings["prompt_cache"] = False
    if args.loras is not None:
        settings["loras"] = list(args.loras)  # "PATH[:SCALE]" strings, split in framepack.pipeline.loras
    if args.lora_strict is not None:
        settings["lora_strict"] = args.lora_strict == "on"
    if args.from_ is None and args.prompt is None and args.prompts is None:
        raise UserError("--prompt (or --prompts) required (or --from a previous video or its .json)")
    with _pipeline(args, args.profile, args.overrides, args.config_files) as pipe:
        result = pipe.generate(from_=args.from_, job_dir=args.job_dir, preview=args.preview,
                               preview_every=args.preview_every, overwrite=args.overwrite, **settings)
        _print_summary(args, pipe, result)
    return 0


def cmd_resume(args) -> int:
    with _pipeline(args) as pipe:
        result = pipe.resume(args.job_dir, preview=args.preview, preview_every=args.preview_every,
                             overwrite=args.overwrite, recompute_from=args.recompute_from)
        _print_summary(args, pipe, result)
    return 0


def _print_summary(args, pipe, result) -> None:
    if not args.json:
        return
    engine = pipe.last_engine
    summary = {
        "outputs": [str(p) for p in result.outputs],
        "frames": result.frames,
        "fps": 30,
        "height": result.height,
        "width": result.width,
        "sections": result.sections,
        "computed_steps": result.computed_steps,
        "skipped_steps": result.skipped_steps,
        "elapsed_s": round(result.elapsed_s, 3),
        "stage_s": result.stage_s,
        "loaded": result.loaded,
        "peak_ram_gb": round(result.peak_ram_gb, 3),
        **({"peak_vram_gb": round(result.peak_vram_gb, 3)} if result.peak_vram_gb is not None else {}),
        "profile": engine.profile.name,
        "backends": {f: c.name for f, c in engine.choices.items()},
        "settings": result.settings.to_dict(),
    }
    print(json.dumps(summary, indent=2))


def cmd_profiles(args) -> int:
    from framepack.engine.profiles import apply_overrides, load_profiles, match_profile, select_profile
    from framepack.hardware import detect_hardware

    hw = detect_hardware()
    profiles = load_profiles(args.config_files)
    selection = select_profile(profiles, hw, args.profile)
    chosen = apply_overrides(profiles, selection.profile.name, args.overrides)
    rows = []
    for name in sorted(profiles.profiles, key=lambda n: (-profiles.profiles[n].priority, n)):
        prof = chosen if name == chosen.name else profiles.profiles[name]
        ok, reasons = match_profile(prof, hw)
        rows.append({
            "name": name, "selected": name == chosen.name, "matches": ok, "reasons": reasons,
            "priority": prof.priority, "description": prof.description, "sources": list(prof.sources),
            "attention": list(prof.attention), "offload": list(prof.offload), "cache": list(prof.cache),
            "writers": list(prof.writers), "dtype": prof.dtype, "vae_tiling": prof.vae_tiling, "options": prof.options,
        })
    if args.json:
        print(json.dumps({"hardware": hw.__dict__, "selected": chosen.name, "why": selection.why,
                          "files": profiles.files, "profiles": rows}, indent=2, default=list))
        return 0
    print(f"this machine: {hw.summary()}")
    print(f"selected: {chosen.name} ({selection.why})")
    print(f"files: {', '.join(profiles.files)}\n")
    for row in rows:
        mark = "*" if row["selected"] else " "
        print(f"{mark} {row['name']:<12} priority {row['priority']:<3} {row['description']}")
        print(f"    attention {row['attention']}  offload {row['offload']}  cache {row['cache']}")
        print("    " + "; ".join(row["reasons"]))
    return 0


def cmd_plugins(args) -> int:
    """Every backend per family, every entry-point plugin (listener-only ones too)
    and the plugins that are broken, with how to turn them off. A broken
    third-party plugin is listed, not fatal: this is where one finds out."""
    from framepack.backends import FAMILIES
    from framepack.engine.plugin_manager import EVENT_HOOKS, build_plugin_manager, collect_backends
    from framepack.engine.profiles import load_profiles
    from framepack.hardware import detect_hardware

    hw = detect_hardware()
    loaded = build_plugin_manager(load_profiles().disabled_plugins, strict=False)
    registry = collect_backends(loaded, strict=False)
    families = {}
    for family in FAMILIES:
        entries = []
        for reg in registry.items(family):
            try:
                reason = reg.backend.unavailable_reason(hw)
            except Exception as exc:  # the plugin's bug; a job would stop on it
                reason = f"its unavailable_reason raised {type(exc).__name__}: {exc}"
            source = loaded.sources.get(reg.plugin)
            entries.append({
                "name": reg.backend.name, "plugin": reg.plugin,
                "source": source.describe() if source else "registered at run time",
                "available": reason is None, "reason": reason, "description": reg.backend.description,
            })
        families[family] = entries
    plugins = []
    for name, source in loaded.sources.items():
        callers = loaded.manager.get_hookcallers(loaded.manager.get_plugin(name)) or []
        plugins.append({
            "name": name, "source": source.describe(), "builtin": source.builtin,
            "events": [c.name for c in callers if c.name in EVENT_HOOKS],
            "backends": [f"{r.backend.family}/{r.backend.name}" for r in registry.of_plugin(name)],
        })
    if args.json:
        print(json.dumps({"hardware": hw.__dict__, "families": families, "plugins": plugins,
                          "broken_plugins": loaded.broken, "skipped_plugins": loaded.skipped}, indent=2, default=list))
        return 0
    print(f"this machine: {hw.summary()}\n")
    for family, entries in families.items():
        print(f"{family}:")
        for e in entries:
            state = "ok" if e["available"] else f"cannot run here: {e['reason']}"
            print(f"  {e['name']:<16} {state:<28} {e['description']}")
            print(f"  {'':<16} {e['source']}")
    listeners = [p for p in plugins if p["events"] or not p["backends"]]
    if listeners:
        print("event listeners:")
        for p in listeners:
            print(f"  {p['name']:<16} {', '.join(p['events']) or 'implements no framepack hook'}")
            print(f"  {'':<16} {p['source']}")
    if loaded.broken:
        print("broken plugins (not loaded; a job stops with this error until it is fixed or turned off):")
        for name, why in loaded.broken.items():
            print(f"  {name:<16} {why}")
    for name, why in loaded.skipped.items():
        print(f"skipped plugin {name}: {why}")
    return 0


def cmd_info(args) -> int:
    from framepack.output.metadata import format_metadata, read_metadata

    record = read_metadata(args.path)
    print(json.dumps(record, indent=2, sort_keys=True) if args.json else format_metadata(record))
    return 0


def cmd_loras(args) -> int:
    from framepack.models.lora_formats import describe_lora_dir

    folder, rows = describe_lora_dir()
    if args.json:
        print(json.dumps({"folder": str(folder), "loras": rows}, indent=2))
        return 0
    where = "" if folder.is_dir() else " (no such folder yet: create it and put .safetensors LoRAs there)"
    print(f"{folder}: {len(rows)} LoRA file(s){where}")
    for row in rows:
        what = row["error"] if "error" in row else (
            f"{row['format']}, rank {'/'.join(map(str, row['ranks']))}, {row['modules']} modules")
        print(f"  {row['file']}  {row['size_mb']:.1f} MB  {what}")
    return 0


def cmd_cache(args) -> int:
    from framepack.models.prompt_cache import PromptCache

    cache = PromptCache()
    if args.action == "clear":
        print(f"removed {cache.clear()} cached prompt embedding(s) from {cache.root}")
        return 0
    entries = cache.entries()
    size = sum(p.stat().st_size for p in entries) / 1024**2
    print(f"{cache.root}: {len(entries)} cached prompt embedding(s), {size:.1f} MB "
          f"(keeps at most {cache.max_entries} entries, {cache.max_bytes / 1024**3:g} GB)")
    return 0


def cmd_make_tiny_model(args) -> int:
    from framepack.models.tiny import make_tiny_model

    try:
        path = make_tiny_model(args.dir, seed=args.seed)
    except FileExistsError as exc:
        raise UserError(str(exc)) from exc
    _eprint(f"wrote a tiny random-weight model to {path} (for tests and offline demos; its videos are noise)")
    return 0


def cmd_make_full_model(args) -> int:
    from framepack.models.full import PARTS, make_full_size_model

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise UserError(f"--parts: unknown {', '.join(unknown) or '(none given)'} (known: {', '.join(PARTS)})")
    if args.shard_gb <= 0:
        raise UserError("--shard-gb must be positive")
    try:
        path = make_full_size_model(args.dir, seed=args.seed, parts=parts, shard_gb=args.shard_gb,
                                    progress=lambda msg: _eprint(f"wrote {msg}"))
    except FileExistsError as exc:
        raise UserError(str(exc)) from exc
    _eprint(f"wrote a full-size random-weight model to {path} (for benchmarks; its videos are noise)")
    return 0


def cmd_calibrate(args) -> int:
    output = args.output or Path(f"calibration_{args.cache}_{args.variant}_{args.steps}steps.json")
    with _pipeline(args, args.profile, args.overrides, args.config_files) as pipe:
        payload = pipe.calibrate(
            args.cache, output, args.image, args.prompt, negative_prompt=args.negative_prompt, model=args.model,
            variant=args.variant, seconds=args.seconds, steps=args.steps, seed=args.seed, gs=args.gs, cfg=args.cfg,
            resolution=args.resolution, size=args.size,
        )
    summary = {k: v for k, v in payload.items() if k != "data"}
    summary["data"] = {k: v for k, v in payload["data"].items() if k not in ("pairs", "std")}
    summary["path"] = str(output)
    if args.json:
        print(json.dumps(summary, indent=2))
    if not args.quiet:
        _eprint(f"wrote {output}; use it with --set options.{args.cache}.calibration={output} --set cache={args.cache}")
    return 0


COMMANDS = {"generate": cmd_generate, "profiles": cmd_profiles, "plugins": cmd_plugins, "make-tiny-model": cmd_make_tiny_model,
            "make-full-model": cmd_make_full_model, "cache": cmd_cache, "loras": cmd_loras,
            "resume": cmd_resume, "info": cmd_info,
            "calibrate": cmd_calibrate}


def _service_command(args) -> int:
    from framepack.service.commands import COMMANDS as SERVICE_COMMANDS

    return SERVICE_COMMANDS[args.command](args)


COMMANDS.update({name: _service_command for name in ("serve", "worker", "queue")})


def quiet_library_logs() -> None:
    """bitsandbytes warns on import that it could not fetch an optional CPU
    kernel from the hub; that is noise for our users (we never want the
    download), so only its errors get through."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a service stopping, `kill`): handled exactly like Ctrl-C."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    def handler(signum, frame):
        raise _Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals to whoever owns it
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _os_error_message(exc: OSError) -> tuple[str, int]:
    """A failure of the machine or the file system the user can act on, or None for a bug."""
    where = f" {exc.filename}" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        from framepack.output.jobdir import free_bytes

        free = free_bytes(Path(exc.filename)) / 1e6 if exc.filename else float("nan")
        return f"the disk is full (writing{where}; {free:.0f} MB free); free some space and try again", 1
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write{where}: {exc.strerror}; pick a folder you can write to", 2
    return "", 0


def main(argv: list[str] | None = None) -> int:
    # Before anything imports torch: PyTorch reads its huge-page switch once, and
    # with it a tiny-model CPU job's decode takes half the time (framepack.models.heap).
    enable_huge_pages()
    args = build_parser().parse_args(argv)
    quiet_library_logs()
    try:
        with sigterm_as_interrupt():
            return COMMANDS[args.command](args)
    except FramepackError as exc:
        from framepack.pipeline.generate import Interrupted

        _eprint(f"framepack: {exc}" if isinstance(exc, Interrupted) else f"framepack: error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        _eprint("framepack: interrupted")
        return 1
    except BrokenPipeError:
        # The reader went away (e.g. `framepack profiles | head`); nothing to report.
        sys.stderr.close()
        return 0
    except OSError as exc:
        message, code = _os_error_message(exc)
        if code:
            _eprint(f"framepack: error: {message}")
            return code
        return _unexpected(exc)
    except Exception as exc:
        return _unexpected(exc)


def _unexpected(exc: BaseException) -> int:
    """A third-party plugin's failure names the plugin; anything else is our bug."""
    from framepack.engine.plugin_manager import blame

    error = blame(exc)
    if error is not None:
        _eprint(f"framepack: error: {error}")
        return error.exit_code
    _eprint(traceback.format_exc().rstrip())
    _eprint("framepack: internal error (a bug; please report it with the traceback above)")
    return 1
