"""``--prompts FILE``: a timed-prompt schedule as TOML or JSON.

JSON: a list of ``{"start": 0, "end": 2.4, "prompt": "a man waves"}``
(``end`` optional), or an object with that list under ``"prompts"``. TOML: an
array of tables, ``[[prompts]]`` with the same keys. The entries become the
bracket syntax of framepack.pipeline.prompts (``[0s-2.4s: a man waves]``), so
the job records, re-runs and resumes its schedule as one ``prompt`` string
with no reference to the file.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from pathlib import Path

from framepack.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

MAX_BYTES = 1_000_000
KEYS = ("start", "end", "prompt")


def load_prompts_file(path: str | Path) -> str:
    """The file's schedule as a timed prompt; one line naming the entry on bad input."""
    path = Path(path).expanduser()
    where = f"--prompts {path}"
    try:
        if path.stat().st_size > MAX_BYTES:
            raise UserError(f"{where}: over {MAX_BYTES // 1000} kB; is it the right file?")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{where}: cannot read it ({exc})") from None
    if path.suffix.lower() == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{where}: not valid TOML ({exc})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: not valid JSON ({exc}); name a .toml file for TOML") from None
    if isinstance(data, dict):
        data = data.get("prompts")
    return prompts_from_entries(data, where)


def prompts_from_entries(data, where: str = "prompts") -> str:
    """A list of {start, end?, prompt} as a timed prompt (``where`` prefixes the messages)."""
    if not isinstance(data, list) or not data:
        raise UserError(f"{where}: expected a non-empty list of {{start, end?, prompt}} "
                        "(JSON: a list; TOML: [[prompts]] tables)")
    parts, previous = [], None
    for number, entry in enumerate(data, 1):
        parts.append(_bracket(entry, f"{where}: entry {number}"))
        start = entry["start"]
        if previous is not None and start < previous:
            raise UserError(f"{where}: entry {number}: starts at {start:g} s, before entry {number - 1} "
                            f"({previous:g} s); list the prompts in playback order")
        previous = start
    return " ".join(parts)


def _bracket(entry, where: str) -> str:
    if not isinstance(entry, dict):
        raise UserError(f"{where}: must be a table with start, end (optional) and prompt")
    unknown = sorted(set(entry) - set(KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(KEYS)})")
    for key in ("start", "prompt"):
        if key not in entry:
            raise UserError(f"{where}: has no '{key}'")
    start, end, text = entry["start"], entry.get("end"), entry["prompt"]
    for key, value in (("start", start), ("end", end)):
        if value is None and key == "end":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise UserError(f"{where}: {key} {value!r} must be a number of seconds, 0 or more")
    if end is not None and end <= start:
        raise UserError(f"{where}: ends at {end:g} s, not after its start {start:g} s")
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{where}: the prompt is empty")
    if "[" in text or "]" in text:
        raise UserError(f"{where}: the prompt may not contain [ or ] (they delimit timed prompts)")
    span = f"{_seconds(start)}s" + ("" if end is None else f"-{_seconds(end)}s")
    return f"[{span}: {' '.join(text.split())}]"


def _seconds(value: float) -> str:
    """Exact decimal digits (the bracket parser reads no exponent)."""
    return format(Decimal(repr(float(value))), "f")
