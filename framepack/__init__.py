"""framepack: FramePack image-to-video with pluggable kernels, offload and caches.

    from framepack import Pipeline
    with Pipeline(model="DIR_OR_REPO") as pipe:
        result = pipe.generate(image="cat.png", prompt="The cat turns its head", seconds=5, output="a.mp4")

Nothing happens at import time: no CUDA queries, no plugin loading, no
prints, and nothing heavy is imported until a name below is used.
"""

__version__ = "0.1.0"

# Public names -> the module that defines them, imported on first use (PEP 562)
# so that `import framepack` (and `framepack --version`) stays instant.
_EXPORTS = {
    "Pipeline": "framepack.api",
    "GenerationResult": "framepack.pipeline.generate",
    "JobSettings": "framepack.pipeline.settings",
    "Cancelled": "framepack.errors",
    "FramepackError": "framepack.errors",
    "UserError": "framepack.errors",
    "ConfigError": "framepack.errors",
    "PluginError": "framepack.errors",
    "DiskFull": "framepack.errors",
    "hookimpl": "framepack.hookspecs",
    "AttentionBackend": "framepack.backends",
    "OffloadBackend": "framepack.backends",
    "CacheBackend": "framepack.backends",
    "EncoderBackend": "framepack.backends",
    "WriterBackend": "framepack.backends",
    "JobStart": "framepack.events",
    "SectionEvent": "framepack.events",
    "StepEvent": "framepack.events",
    "JobEnd": "framepack.events",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'framepack' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
