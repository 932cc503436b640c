"""Prometheus metrics, read from the store at each scrape.

Every number comes from the database, so any server (an API-only node too)
reports the whole queue: jobs by status, how long the oldest queued job has
waited, the queue wait, seconds per step and per frame and the peak memory of
recent jobs, and the workers whose heartbeat is fresh.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from framepack.service.store import JobStore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class QueueCollector:
    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self):
        snap = self.store.snapshot()
        jobs = GaugeMetricFamily("framepack_jobs", "Jobs in the queue by status", labels=["status"])
        for status, count in snap["counts"].items():
            jobs.add_metric([status], count)
        yield jobs
        yield GaugeMetricFamily("framepack_workers_up", "Workers with a fresh heartbeat", value=snap["workers_up"])
        yield GaugeMetricFamily("framepack_oldest_queued_seconds", "How long the oldest queued job has waited",
                                value=snap["oldest_queued_s"])
        recent = snap["recent"]

        def mean(values):
            values = [v for v in values if v is not None]
            return sum(values) / len(values) if values else float("nan")

        for name, help_text, values in (
            ("framepack_queue_wait_seconds", "Mean submit-to-start wait of the last 20 finished jobs",
             [r["wait_s"] for r in recent]),
            ("framepack_seconds_per_step", "Mean sampler seconds per step of the last 20 finished jobs",
             [r["stats"].get("seconds_per_step") for r in recent]),
            ("framepack_seconds_per_frame", "Mean wall seconds per video frame of the last 20 finished jobs",
             [r["stats"].get("seconds_per_frame") for r in recent]),
        ):
            yield GaugeMetricFamily(name, help_text, value=mean(values))
        for name, key, help_text in (("framepack_peak_ram_gb", "peak_ram_gb", "Highest peak RAM of the last 20 jobs"),
                                     ("framepack_peak_vram_gb", "peak_vram_gb", "Highest peak VRAM of the last 20 jobs")):
            values = [r["stats"].get(key) for r in recent if r["stats"].get(key) is not None]
            yield GaugeMetricFamily(name, help_text, value=max(values) if values else float("nan"))


def registry_for(store: JobStore) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(store))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
