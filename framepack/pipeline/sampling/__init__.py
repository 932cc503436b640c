"""Sampling: the flow-matching noise schedule, CFG wrapper and UniPC sampler."""

from framepack.pipeline.sampling.guidance import make_x0_model
from framepack.pipeline.sampling.schedule import flux_mu, flux_sigmas, section_sigmas
from framepack.pipeline.sampling.unipc import sample_unipc

__all__ = ["flux_mu", "flux_sigmas", "section_sigmas", "make_x0_model", "sample_unipc"]
