"""framepack: FramePack image-to-video with pluggable kernels, offload and caches.

Nothing happens at import time: no CUDA queries, no plugin loading, no prints.
"""

__version__ = "0.1.0"
