"""Hook specifications for framepack plugins.

Two kinds of hooks:

* Registration hooks (``framepack_register_*``) run once, when the engine is
  assembled. A plugin hands backend objects to ``register``; the engine picks
  one per family by name and then calls it directly. Nothing is dispatched
  through pluggy in the sampling loop.
* Event hooks (``framepack_on_*``) are 1:N notifications for progress and
  lifecycle. They are called a few times per step at most and must stay cheap.

Every hook is called with keyword arguments. Implementations may accept any
subset of the arguments, in any order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from framepack.backends import (
        AttentionBackend,
        CacheBackend,
        EncoderBackend,
        OffloadBackend,
        WriterBackend,
    )
    from framepack.events import JobEnd, JobStart, SectionEvent, StepEvent

hookspec = pluggy.HookspecMarker("framepack")
hookimpl = pluggy.HookimplMarker("framepack")


@hookspec
def framepack_register_attention(register: Callable[[AttentionBackend], None]) -> None:
    """Register attention kernels.

    :param register: call it once per kernel with an
        :class:`framepack.backends.AttentionBackend`.
    """


@hookspec
def framepack_register_offload(register: Callable[[OffloadBackend], None]) -> None:
    """Register memory offload policies.

    :param register: call it once per policy with an
        :class:`framepack.backends.OffloadBackend`.
    """


@hookspec
def framepack_register_cache(register: Callable[[CacheBackend], None]) -> None:
    """Register step caches (ways to skip transformer work between steps).

    :param register: call it once per cache with a
        :class:`framepack.backends.CacheBackend`.
    """


@hookspec
def framepack_register_encoders(register: Callable[[EncoderBackend], None]) -> None:
    """Register encoders: text, image and VAE.

    :param register: call it once per encoder with an
        :class:`framepack.backends.EncoderBackend`; its ``kind`` says which
        slot (``text``, ``image`` or ``vae``) it fills.
    """


@hookspec
def framepack_register_writers(register: Callable[[WriterBackend], None]) -> None:
    """Register output writers (video containers, frame folders, latents).

    :param register: call it once per writer with a
        :class:`framepack.backends.WriterBackend`.
    """


@hookspec
def framepack_on_job_start(event: JobStart) -> None:
    """Called once when a job has its settings, profile and backends.

    :param event: what will run: settings, profile name, chosen backends,
        number of sections and frames.
    """


@hookspec
def framepack_on_section(event: SectionEvent) -> None:
    """Called when a section starts and when it ends.

    :param event: section index and count, ``phase`` (``"start"`` or
        ``"end"``) and elapsed seconds.
    """


@hookspec
def framepack_on_step(event: StepEvent) -> None:
    """Called after every sampler step.

    :param event: section and step indices and counts, elapsed seconds. The
        step's x0 prediction is attached as ``denoised`` (a tensor on the
        accelerator; copy it only if you need it).
    """


@hookspec
def framepack_on_job_end(event: JobEnd) -> None:
    """Called once when a job finishes, fails or is interrupted.

    :param event: ``status`` (``"done"``, ``"failed"``, ``"interrupted"``),
        the output paths written, and elapsed seconds.
    """
