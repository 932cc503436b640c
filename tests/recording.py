"""What the transformer receives, per section: a monkeypatched
``framepack.pipeline.loop.forward_velocity`` that keeps each call's inputs."""

from __future__ import annotations

from collections import defaultdict

import framepack.pipeline.loop as loop
from framepack import SectionEvent


class TransformerInputs:
    """calls[generation index] -> the kwargs of each transformer call (CPU clones)."""

    KEEP = ("latents_clean", "image_embeds", "encoder_hidden_states", "pooled_projections")

    def __init__(self, monkeypatch) -> None:
        self.calls = defaultdict(list)
        self.section = None
        real = loop.forward_velocity

        def recording(transformer, **inputs):
            self.calls[self.section].append({k: inputs[k].detach().cpu().clone() for k in self.KEEP})
            return real(transformer, **inputs)

        monkeypatch.setattr(loop, "forward_velocity", recording)

    def on_event(self, event) -> None:
        if isinstance(event, SectionEvent) and event.phase == "start":
            self.section = event.index

    def first(self, section: int, key: str):
        return self.calls[section][0][key]
