"""Sampling: the flow-matching noise schedule, CFG wrapper and UniPC sampler."""

from framepack.sampling.guidance import make_x0_model
from framepack.sampling.schedule import flux_mu, flux_sigmas, section_sigmas
from framepack.sampling.unipc import sample_unipc

__all__ = ["flux_mu", "flux_sigmas", "section_sigmas", "make_x0_model", "sample_unipc"]
