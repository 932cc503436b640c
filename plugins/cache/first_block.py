"""Step cache `first_block`: first-block residual cache (ParaAttention's FBCache).

Per CFG branch, per section: the first double block always runs; its
residual r = block0(x) - x is compared with r from the last computed step,
diff = mean|r - r_prev| / mean|r_prev|. If diff < threshold the other 59
blocks are skipped and their cached residual is added to block 0's output;
otherwise they run and their residual (image stream) is cached along with r.
The first call of a section always runs everything. The comparison is strict,
as in ParaAttention, so threshold 0 never skips.

A skipped call still costs the embeddings and one of 60 blocks, and counts as
skipped. This is the rule of diffusers' ``apply_first_block_cache``
(tests/test_caches.py checks that both give the same outputs); diffusers'
hook is not used because it needs a ``cache_context`` per call, keeps its
decisions in private state (the engine needs them for ``counts``), and still
calls every skipped block's ``Module.__call__``, so offload hooks on those
blocks would copy weights in for nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from framepack.backends import CacheBackend
from framepack.caching.blockcache import BlockCache, BlockCall, rel_l1
from framepack.errors import ConfigError
from framepack.hookspecs import hookimpl


@dataclass(frozen=True)
class FirstBlockOptions:
    threshold: float = 0.05  # diffusers' default; ParaAttention suggests 0.05-0.1 for video

    def __post_init__(self) -> None:
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise ConfigError(f"options.first_block: threshold must be a number >= 0, got {self.threshold!r}")
        object.__setattr__(self, "threshold", float(self.threshold))


@dataclass
class BranchState:
    first_residual: Any = None  # (B, L_img, C) block 0's residual at the last computed step
    rest_residual: Any = None  # (B, L_img, C) blocks 1..59's residual at the last computed step


class FirstBlockCache(BlockCache):
    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold

    def new_state(self) -> BranchState:
        return BranchState()

    def decide(self, state: BranchState, blocks, call: BlockCall, branch, step, steps):
        hidden_states, encoder_hidden_states = blocks.first(
            call.hidden_states, call.encoder_hidden_states, call.temb, call.attention_mask, call.image_rotary_emb
        )
        first_residual = hidden_states - call.hidden_states
        if state.first_residual is not None and rel_l1(first_residual, state.first_residual) < self.threshold:
            return hidden_states + state.rest_residual, encoder_hidden_states, False
        after_first = BlockCall(hidden_states, encoder_hidden_states, call.temb, call.attention_mask, call.image_rotary_emb)
        out, encoder_out = blocks.run(after_first, start=1)
        state.first_residual = first_residual
        state.rest_residual = out - hidden_states
        return out, encoder_out, True


@hookimpl
def framepack_register_cache(register):
    register(
        CacheBackend(
            name="first_block",
            make_cache=lambda options: FirstBlockCache(options.threshold),
            options=FirstBlockOptions,
            description="first-block cache: skip blocks 1-59 while the first block's residual barely changes",
        )
    )
