"""What the web UI shows, as plain functions of the service's job records and
the form's values (no Gradio here, so each is tested on its own)."""

from __future__ import annotations

import datetime
import html
import math
from typing import Any

from framepack.errors import UserError

# Form fields -> the service's settings keys (Pipeline.generate's names), in form order.
FORM_FIELDS = ("prompt", "negative_prompt", "seconds", "seed", "steps", "window", "gs", "cfg", "rs", "variant",
               "resolution", "size", "prompt_blend", "cache", "cache_threshold", "profile", "model")
DEFAULTS = {"prompt": "", "negative_prompt": "", "seconds": 5.0, "seed": 31337, "steps": 25, "window": 9, "gs": 10.0,
            "cfg": 1.0, "rs": 0.0, "variant": "original", "resolution": 640, "size": "", "prompt_blend": 0,
            "cache": "none", "cache_threshold": 0.15, "profile": "auto", "model": ""}
CACHE_OPTION = {"teacache": "rel_l1_thresh", "magcache": "threshold", "first_block": "threshold"}
STATUS_ORDER = ("running", "queued", "failed", "cancelled", "done")


def settings_from_form(values: dict[str, Any]) -> dict[str, Any]:
    """The form's values -> a job's settings (what POST /api/jobs takes). Values
    equal to the engine's defaults are left out, so a job record says only what
    the user chose; the service checks the rest with the CLI's messages."""
    v = {**DEFAULTS, **{k: val for k, val in values.items() if val is not None}}
    if not str(v["prompt"]).strip():
        raise UserError("prompt: write what should happen in the video")
    settings: dict[str, Any] = {"prompt": v["prompt"]}
    for key in ("negative_prompt", "variant", "prompt_blend"):
        if v[key] != DEFAULTS[key]:
            settings[key] = v[key]
    if v["negative_prompt"] and float(v["cfg"]) <= 1.0:
        settings.pop("negative_prompt")  # only read with real CFG; the form hides it then too
    for key in ("seconds", "gs", "cfg", "rs"):
        settings[key] = float(v[key])
    for key in ("seed", "steps", "window", "resolution", "prompt_blend"):
        number = float(v[key])
        if not math.isfinite(number) or number != int(number):
            raise UserError(f"{key}: a whole number, got {v[key]!r}")
        settings[key] = int(number)
    for key in ("prompt_blend", "resolution", "window"):
        if settings[key] == DEFAULTS[key]:
            settings.pop(key)
    size = str(v["size"] or "").strip()
    if size:
        settings["size"] = size
        settings.pop("resolution", None)
    if str(v["model"] or "").strip():
        settings["model"] = str(v["model"]).strip()
    if v["profile"] and v["profile"] != "auto":
        settings["profile"] = v["profile"]
    overrides = []
    cache = v["cache"] or "none"
    if cache != "none":
        overrides.append(f"cache={cache}")
        option = CACHE_OPTION.get(cache)
        if option is not None and v["cache_threshold"] is not None:
            overrides.append(f"options.{cache}.{option}={float(v['cache_threshold']):g}")
    if overrides:
        settings["overrides"] = overrides
    return settings


def form_from_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A job's settings -> the form's values ("load settings", duplicate-and-edit)."""
    form = dict(DEFAULTS)
    for key in FORM_FIELDS:
        if key in settings and key not in ("cache", "cache_threshold"):
            form[key] = settings[key]
    if "size" in settings:
        form["size"] = settings["size"]
    form["profile"] = settings.get("profile") or "auto"
    for override in settings.get("overrides", []):
        key, _, value = override.partition("=")
        if key == "cache":
            form["cache"] = value
        elif key.startswith("options.") and key.split(".")[-1] in ("rel_l1_thresh", "threshold"):
            try:
                form["cache_threshold"] = float(value)
            except ValueError:
                pass
    return form


def prompt_sections(prompt: str, seconds: float, window: int, blend: int = 0) -> str:
    """Which section each timed prompt lands on (markdown), or the parse error."""
    from framepack.pipeline.prompts import parse_timed_prompt, schedule, section_seconds
    from framepack.pipeline.sections import section_count

    if not (prompt or "").strip():
        return "Write a prompt; timed: `[0s: a man waves] [2s-4s: he jumps]`."
    try:
        sections = section_count(float(seconds), int(window))
        weights = schedule(parse_timed_prompt(prompt), sections, int(window), int(blend or 0))
    except (UserError, ValueError) as exc:
        return f"**{html.escape(str(exc))}**"
    length = section_seconds(int(window))
    lines = [f"{sections} section(s) of {length:.2f} s:"]
    for index, w in enumerate(weights):
        parts = ", ".join(f"{html.escape(_short(text))}" + ("" if weight == 1.0 else f" ({weight:.2f})")
                          for text, weight in w.items())
        lines.append(f"- {index * length:.2f}-{(index + 1) * length:.2f} s: {parts}")
    return "\n".join(lines)


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _bar(label: str, done: float, total: float, test_id: str) -> str:
    share = 0.0 if not total else max(0.0, min(1.0, done / total))
    return (f'<div class="fp-bar" data-testid="{test_id}" data-value="{share:.4f}">'
            f'<div class="fp-bar-label">{html.escape(label)}</div>'
            f'<div class="fp-bar-track"><div class="fp-bar-fill" style="width:{share * 100:.1f}%"></div></div></div>')


def progress_html(job: dict | None) -> str:
    """A job's section bar and step bar with its ETA, status and calls computed and skipped."""
    if not job:
        return '<div class="fp-progress" data-testid="progress">No job yet.</div>'
    p = job.get("progress") or {}
    status = job.get("status", "?")
    sections, steps = int(p.get("sections") or 0), int(p.get("steps") or 0)
    section, step = int(p.get("section") or 0), int(p.get("step") or 0)
    finished = status == "done"
    done_sections = sections if finished else section + (1 if steps and step + 1 >= steps else 0)
    done_steps = steps if finished else (step + 1 if steps else 0)
    eta = p.get("eta_s")
    eta_text = "" if eta is None or finished else f", about {_duration(eta)} left"
    calls = ""
    if p.get("computed") is not None:
        calls = f" · transformer calls: {p['computed']} computed, {p.get('skipped', 0)} skipped"
    head = f"Job {html.escape(str(job.get('id', '')))}: {html.escape(status)}{eta_text}{calls}"
    error = f'<div class="fp-error">{html.escape(job["error"])}</div>' if job.get("error") else ""
    return (f'<div class="fp-progress" data-testid="progress" data-status="{html.escape(status)}">'
            f'<div class="fp-progress-head">{head}</div>'
            + _bar(f"section {min(done_sections + (0 if finished else 1), max(sections, 1))} of {sections or '?'}",
                   done_sections, sections, "section-bar")
            + _bar(f"step {done_steps} of {steps or '?'}", done_steps, steps, "step-bar")
            + error + "</div>")


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(float(seconds))))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


QUEUE_HEADERS = ["id", "status", "prompt", "seconds", "priority", "position", "progress", "created"]


def queue_rows(jobs: list[dict]) -> list[list[Any]]:
    """The queue tab's table: running first, then queued in queue order, then the rest, newest first."""
    def order(job):
        status = job.get("status", "")
        rank = STATUS_ORDER.index(status) if status in STATUS_ORDER else len(STATUS_ORDER)
        if status == "queued":
            return (rank, -(job.get("priority") or 0), job.get("position") or 0, "")
        return (rank, 0, 0, -_timestamp(job.get("created_at")))

    rows = []
    for job in sorted(jobs, key=order):
        p = job.get("progress") or {}
        share = ""
        if job.get("status") == "done":
            share = "100%"
        elif p.get("sections") and p.get("steps"):
            done = (p.get("section", 0) * p["steps"] + p.get("step", 0) + 1) / (p["sections"] * p["steps"])
            share = f"{100 * min(1.0, done):.0f}%"
        settings = job.get("settings") or {}
        rows.append([job.get("id"), job.get("status"), _short(str(settings.get("prompt", "")), 50),
                     settings.get("seconds", DEFAULTS["seconds"]), job.get("priority", 0), job.get("position"),
                     share, _when(job.get("created_at"))])
    return rows


def _timestamp(value) -> float:
    """Seconds since the epoch from the service's timestamps (numbers, or ISO 8601 text)."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value:
        try:
            return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return 0.0
    return 0.0


def _when(value) -> str:
    stamp = _timestamp(value)
    return datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M:%S") if stamp else ""


def video_name(job: dict) -> str | None:
    """The job's main video among its outputs (the mp4, else the webm)."""
    outputs = job.get("outputs") or []
    names = [o if isinstance(o, str) else o.get("name", "") for o in outputs]
    for ext in (".mp4", ".webm"):
        for name in names:
            if name.endswith(ext) and ".partial" not in name:
                return name
    return None


def metadata_text(job: dict) -> str:
    """An output's job record, as a person reads it."""
    s = job.get("settings") or {}
    keys = [k for k in ("prompt", "seconds", "seed", "steps", "variant", "size", "resolution", "gs", "cfg",
                        "profile", "overrides", "model") if k in s]
    lines = [f"**{html.escape(str(job.get('id')))}** ({html.escape(str(job.get('status')))})"]
    lines += [f"- {k}: `{html.escape(str(s[k]))}`" for k in keys]
    stats = job.get("stats") or {}
    for k in ("frames", "elapsed_s", "computed_steps", "skipped_steps", "peak_vram_gb", "peak_ram_gb"):
        if k in stats:
            lines.append(f"- {k}: {stats[k]}")
    return "\n".join(lines)
