"""The step-cache contract: decide per transformer call whether to compute.

The sampler calls ``cache(forward, branch=..., step=..., steps=..., **inputs)``
for every transformer call; ``forward(**inputs)`` runs the full model. A
cache may instead return a velocity it reconstructs from earlier steps.
``begin_section`` resets state (a section is an independent sampling run);
each CFG branch ("positive", "negative") must keep its own state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch


@dataclass
class CacheCounts:
    computed: int = 0
    skipped: int = 0


class StepCache(Protocol):
    counts: CacheCounts

    def bind(self, transformer: torch.nn.Module) -> None: ...

    def begin_section(self, steps: int) -> None: ...

    def __call__(
        self, forward: Callable[..., torch.Tensor], *, branch: str, step: int, steps: int, **inputs
    ) -> torch.Tensor: ...
