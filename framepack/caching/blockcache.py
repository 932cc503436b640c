"""One gate in front of the transformer's 60 blocks, shared by the step caches.

Step caches (TeaCache, MagCache, first-block cache) need what diffusers'
forward computes between embedding and the output head: the packed image
tokens entering the first block, ``temb``, and what the blocks make of them.
``install_block_gate`` replaces the two block lists of
``HunyuanVideoFramepackTransformer3DModel`` with one ``CachedBlocks`` module
(and an empty list), so diffusers' own loop::

    for block in self.transformer_blocks:        # -> [CachedBlocks]
        hidden_states, encoder_hidden_states = block(hidden_states, encoder_hidden_states,
                                                     temb, attention_mask, image_rotary_emb)
    for block in self.single_transformer_blocks:  # -> []

calls the gate once per transformer call. With no gate armed it runs the 20
double and 40 single blocks in diffusers' order with diffusers' arguments,
so results are bit-identical to the unwrapped model.

Why a wrapper and not forward hooks: a hook cannot stop a module from running,
so skipping would mean replacing each block's ``forward``, and every
``Module.__call__`` of a skipped block would still fire the hooks that
offload policies put on blocks (weights copied in for nothing). Here a
skipped block is never called. The blocks stay the same objects (children
of the wrapper), so hooks installed on them earlier still fire and ``.to()``
moves them; their state_dict keys gain the prefix ``transformer_blocks.0.``
(``transformer_blocks.3.x`` -> ``transformer_blocks.0.double_blocks.3.x``,
``single_transformer_blocks.7.x`` -> ``transformer_blocks.0.single_blocks.7.x``).
Nothing in the engine reads the keys after loading; ``remove_block_gate``
restores the original lists for code that does.

Offload policies hook the blocks in ``prepare``, before the cache binds, so
diffusers' group offloading (block or leaf level) and per-layer swapping
keep working through the wrapper. With block-level prefetching, block 0 is
prefetched at the start of every forward; on a skipped call it simply stays
loaded until the next computed one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from framepack.caching.stepcache import CacheCounts


@dataclass
class BlockCall:
    """The arguments diffusers passes to every block, in one transformer call."""

    hidden_states: torch.Tensor  # (B, L_img, C) packed image tokens: [4x, 2x, clean, noisy]
    encoder_hidden_states: torch.Tensor  # (B, L_ctx, C) SigLIP tokens then text tokens
    temb: torch.Tensor  # (B, C) timestep + guidance + pooled text
    attention_mask: torch.Tensor | None
    image_rotary_emb: Any  # (cos, sin), each (L_img, head_dim)


# gate(blocks, call) -> (hidden_states, encoder_hidden_states) after "all blocks"
Gate = Callable[["CachedBlocks", BlockCall], tuple[torch.Tensor, torch.Tensor]]


class CachedBlocks(nn.Module):
    """The 20 double-stream and 40 single-stream blocks behind one optional gate."""

    def __init__(self, double: nn.ModuleList, single: nn.ModuleList) -> None:
        super().__init__()
        self.double_blocks = double  # not `self.double`: nn.Module.double() casts to float64
        self.single_blocks = single
        self.gate: Gate | None = None  # armed only for the duration of one cache call

    @property
    def first(self) -> nn.Module:
        return self.double_blocks[0]

    def blocks(self) -> list[nn.Module]:
        return [*self.double_blocks, *self.single_blocks]

    def run(self, call: BlockCall, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Run blocks ``start`` .. 59 on ``call``'s streams, as diffusers' loop does."""
        hidden_states, encoder_hidden_states = call.hidden_states, call.encoder_hidden_states
        for block in self.blocks()[start:]:
            hidden_states, encoder_hidden_states = block(
                hidden_states, encoder_hidden_states, call.temb, call.attention_mask, call.image_rotary_emb
            )
        return hidden_states, encoder_hidden_states

    def forward(self, hidden_states, encoder_hidden_states, temb, attention_mask=None, image_rotary_emb=None):
        call = BlockCall(hidden_states, encoder_hidden_states, temb, attention_mask, image_rotary_emb)
        if self.gate is None:
            return self.run(call)
        return self.gate(self, call)

    @contextlib.contextmanager
    def gated(self, gate: Gate) -> Iterator[None]:
        if self.gate is not None:
            raise RuntimeError("the block gate is already armed (two step caches on one transformer call?)")
        self.gate = gate
        try:
            yield
        finally:
            self.gate = None


def install_block_gate(transformer: nn.Module) -> CachedBlocks:
    """Put a ``CachedBlocks`` in front of ``transformer``'s blocks (once) and return it."""
    lists = transformer.transformer_blocks
    if len(lists) == 1 and isinstance(lists[0], CachedBlocks) and len(transformer.single_transformer_blocks) == 0:
        return lists[0]
    if not len(lists):
        raise ValueError("the transformer has no transformer_blocks to cache")
    wrapper = CachedBlocks(transformer.transformer_blocks, transformer.single_transformer_blocks)
    transformer.transformer_blocks = nn.ModuleList([wrapper])
    transformer.single_transformer_blocks = nn.ModuleList()
    return wrapper


def remove_block_gate(transformer: nn.Module) -> None:
    """Undo ``install_block_gate``: the original lists and state_dict keys come back."""
    lists = transformer.transformer_blocks
    if len(lists) == 1 and isinstance(lists[0], CachedBlocks):
        wrapper = lists[0]
        transformer.transformer_blocks = wrapper.double_blocks
        transformer.single_transformer_blocks = wrapper.single_blocks


@contextlib.contextmanager
def weights_on(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Let a cache call a piece of a block (TeaCache's ``norm1``) outside the
    block's own call, whatever the offload policy does with its weights.

    Block-level offload (diffusers' group offloading) moves a block's weights
    in only when the block itself is called, and may be prefetching them on
    a side CUDA stream right now. So: wait for all streams of the device,
    then give every weight still elsewhere a temporary copy on ``device``
    (swapping ``param.data``, restored after, so the policy's own bookkeeping,
    keyed by the Parameter objects, stays valid). With resident weights this
    is one device synchronisation, which the caller's ``.item()`` would force
    anyway."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    moved = []
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device != device:
            moved.append((tensor, tensor.data))
            tensor.data = tensor.data.to(device)
    try:
        yield
    finally:
        for tensor, data in moved:
            tensor.data = data


def rel_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """mean|current - previous| / mean|previous|, computed in the tensors' dtype
    (bf16 on a GPU, as the original does) and returned as a Python float."""
    return ((current - previous).abs().mean() / previous.abs().mean()).item()


class BlockCache:
    """Base of the caches that decide at the gate: per-branch state, counts,
    one decision per transformer call.

    Subclasses implement ``new_state()`` and ``decide(state, blocks, call,
    branch, step, steps) -> (hidden_states, encoder_hidden_states, computed)``.
    ``history`` keeps (section, branch, step, computed) for every call of the
    job, for benchmarks and tests.
    """

    def __init__(self) -> None:
        self.counts = CacheCounts()
        self.blocks: CachedBlocks | None = None
        self.states: dict[str, Any] = {}
        self.section = -1
        self.history: list[tuple[int, str, int, bool]] = []

    def bind(self, transformer: nn.Module) -> None:
        self.blocks = install_block_gate(transformer)

    def begin_section(self, steps: int) -> None:
        # A section is an independent sampling run: nothing carries over.
        self.section += 1
        self.counts = CacheCounts()
        self.states = {}

    def new_state(self) -> Any:
        raise NotImplementedError

    def decide(self, state, blocks: CachedBlocks, call: BlockCall, branch: str, step: int, steps: int):
        raise NotImplementedError

    def __call__(self, forward, *, branch, step, steps, **inputs):
        if self.blocks is None:
            raise RuntimeError(f"{type(self).__name__} was called before bind(transformer)")
        state = self.states.get(branch)
        if state is None:
            state = self.states[branch] = self.new_state()  # one state per CFG branch
        decisions: list[bool] = []

        def gate(blocks: CachedBlocks, call: BlockCall):
            hidden_states, encoder_hidden_states, computed = self.decide(state, blocks, call, branch, step, steps)
            decisions.append(computed)
            return hidden_states, encoder_hidden_states

        with self.blocks.gated(gate):
            output = forward(**inputs)
        if len(decisions) != 1:
            raise RuntimeError(f"the block gate ran {len(decisions)} times in one transformer call (expected once)")
        if decisions[0]:
            self.counts.computed += 1
        else:
            self.counts.skipped += 1
        self.history.append((self.section, branch, step, decisions[0]))
        return output
