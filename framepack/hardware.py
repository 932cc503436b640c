"""Detect the accelerator and memory the engine can use.

Detection runs when asked (never at import). ``FRAMEPACK_HARDWARE`` may hold a
JSON object with any of HardwareInfo's fields to simulate another machine,
e.g. ``{"device": "cuda", "gpu_name": "RTX 3060 Laptop", "vram_total_gb": 6}``:
``framepack profiles`` then shows what would be picked there.

``FRAMEPACK_VRAM_LIMIT_GB`` emulates a smaller card on a real CUDA GPU: the engine
sees that much VRAM (so picks that card's profile) and torch's allocator refuses
to go past it (``torch.cuda.set_per_process_memory_fraction``). Use it to try a
6 GB laptop's settings on a big GPU; benchmarks/memory_bench.py does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

from framepack.errors import UserError

GIB = 1024**3


@dataclass(frozen=True)
class HardwareInfo:
    device: str  # "cuda", "mps" or "cpu"
    gpu_name: str | None = None
    compute_capability: tuple[int, int] | None = None
    vram_total_gb: float | None = None
    vram_free_gb: float | None = None
    ram_total_gb: float = 0.0
    ram_available_gb: float = 0.0
    simulated: bool = False

    def summary(self) -> str:
        if self.device == "cuda":
            cc = ".".join(map(str, self.compute_capability)) if self.compute_capability else "?"
            gpu = (
                f"{self.gpu_name or 'CUDA GPU'} (sm {cc}), {self.vram_total_gb:.1f} GB VRAM"
                f" ({self.vram_free_gb:.1f} GB free)"
            )
        elif self.device == "mps":
            gpu = f"Apple GPU ({self.gpu_name or 'mps'})"
        else:
            gpu = "no GPU"
        sim = " [simulated]" if self.simulated else ""
        return f"{gpu}; {self.ram_total_gb:.1f} GB RAM ({self.ram_available_gb:.1f} GB available){sim}"


def _system_ram_gb() -> tuple[float, float]:
    total = available = 0.0
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        total = info.get("MemTotal", 0) / GIB
        available = info.get("MemAvailable", info.get("MemFree", 0)) / GIB
    except OSError:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
            available = total
        except (ValueError, OSError, AttributeError):
            pass
    return total, available


def _detect_real() -> HardwareInfo:
    import torch

    ram_total, ram_available = _system_ram_gb()
    limit_gb = vram_limit_gb()
    if limit_gb is not None and not torch.cuda.is_available():
        raise UserError("FRAMEPACK_VRAM_LIMIT_GB emulates a smaller CUDA card and needs a CUDA GPU; none is available")
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        if limit_gb is not None:
            torch.cuda.set_per_process_memory_fraction(limit_fraction(limit_gb, total), index)
            free, total = min(free, limit_gb * GIB), min(total, limit_gb * GIB)
        return HardwareInfo(
            device="cuda",
            gpu_name=props.name,
            compute_capability=(props.major, props.minor),
            vram_total_gb=total / GIB,
            vram_free_gb=free / GIB,
            ram_total_gb=ram_total,
            ram_available_gb=ram_available,
        )
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        # Apple GPUs share system memory; report it as both.
        return HardwareInfo(
            device="mps",
            gpu_name="Apple Silicon",
            vram_total_gb=ram_total,
            vram_free_gb=ram_available,
            ram_total_gb=ram_total,
            ram_available_gb=ram_available,
        )
    return HardwareInfo(device="cpu", ram_total_gb=ram_total, ram_available_gb=ram_available)


def vram_limit_gb() -> float | None:
    raw = os.environ.get("FRAMEPACK_VRAM_LIMIT_GB")
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"FRAMEPACK_VRAM_LIMIT_GB must be a number of GB, got {raw!r}") from None
    if not value > 0:
        raise UserError(f"FRAMEPACK_VRAM_LIMIT_GB must be positive, got {raw!r}")
    return value


def limit_fraction(limit_gb: float, total_bytes: int) -> float:
    """The allocator fraction that caps this process at ``limit_gb`` (1.0 when the card is smaller)."""
    return min(1.0, limit_gb * GIB / total_bytes)


def peak_memory_gb() -> dict[str, float]:
    """This process's peaks so far: system RAM (resident set), and VRAM when CUDA was used."""
    import resource
    import sys

    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peaks = {"peak_ram_gb": rss / (GIB if sys.platform == "darwin" else 2**20)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks["peak_vram_gb"] = torch.cuda.max_memory_allocated() / GIB
        peaks["peak_vram_reserved_gb"] = torch.cuda.max_memory_reserved() / GIB
    return peaks


class PeakMemory:
    """Peak RSS (and VRAM on CUDA) while the block runs, for one job of many in
    a process: ru_maxrss only ever grows, so RSS is sampled by a thread
    (every ``interval`` s) and CUDA's peak counters are reset on entry."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak_ram_gb = 0.0
        self.peak_vram_gb: float | None = None

    @staticmethod
    def rss_bytes() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the lifetime peak is the best there is
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self) -> "PeakMemory":
        import threading

        import torch

        self._cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
        self._peak = self.rss_bytes()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(self.interval):
                self._peak = max(self._peak, self.rss_bytes())

        self._thread = threading.Thread(target=sample, name="framepack-peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        self._stop.set()
        self._thread.join()
        self.peak_ram_gb = max(self._peak, self.rss_bytes()) / GIB
        if self._cuda or (torch.cuda.is_available() and torch.cuda.is_initialized()):
            self.peak_vram_gb = torch.cuda.max_memory_allocated() / GIB


def hardware_from_dict(data: dict, where: str = "FRAMEPACK_HARDWARE") -> HardwareInfo:
    fields = {f.name for f in dataclasses.fields(HardwareInfo)} - {"simulated"}
    unknown = set(data) - fields
    if unknown:
        raise UserError(f"{where}: unknown field(s) {sorted(unknown)} (known: {sorted(fields)})")
    if data.get("device") not in ("cuda", "mps", "cpu"):
        raise UserError(f"{where}: 'device' must be cuda, mps or cpu, got {data.get('device')!r}")
    values = dict(data)
    for key in ("vram_total_gb", "vram_free_gb", "ram_total_gb", "ram_available_gb"):
        value = values.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UserError(f"{where}: '{key}' must be a number of GB, got {value!r}")
        # JSON here allows NaN and Infinity; neither (nor a negative size) is a machine.
        if value is not None and not (value >= 0 and (isinstance(value, int) or math.isfinite(value))):
            raise UserError(f"{where}: '{key}' must be a finite number of GB, 0 or more, got {value!r}")
    if values["device"] == "cuda" and values.get("vram_total_gb") is None:
        raise UserError(f"{where}: 'vram_total_gb' is required for a cuda device (e.g. 23.6 for a 24 GB card)")
    if values.get("gpu_name") is not None and not isinstance(values["gpu_name"], str):
        raise UserError(f"{where}: 'gpu_name' must be a string, got {values['gpu_name']!r}")
    if values.get("compute_capability") is not None:
        cc = values["compute_capability"]
        try:
            major, minor = (int(x) for x in (cc.split(".") if isinstance(cc, str) else cc))
        except (TypeError, ValueError):
            raise UserError(f"{where}: 'compute_capability' must look like \"8.9\" or [8, 9], got {cc!r}") from None
        values["compute_capability"] = (major, minor)
    if values["device"] != "cpu":
        values.setdefault("vram_free_gb", values.get("vram_total_gb"))
    values.setdefault("ram_total_gb", 32.0)
    values.setdefault("ram_available_gb", values["ram_total_gb"])
    return HardwareInfo(**values, simulated=True)


def detect_hardware() -> HardwareInfo:
    raw = os.environ.get("FRAMEPACK_HARDWARE")
    if raw:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise UserError(f"FRAMEPACK_HARDWARE is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise UserError("FRAMEPACK_HARDWARE must be a JSON object")
        return hardware_from_dict(data)
    return _detect_real()


def device_present(device: str) -> bool:
    """Whether this process can really run on ``device`` (simulation aside)."""
    import torch

    if device == "cuda":
        return torch.cuda.is_available()
    if device == "mps":
        return torch.backends.mps.is_available()
    return device == "cpu"
