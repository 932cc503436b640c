"""Assembling an engine: profiles, the plugin manager, backend resolution, memory planning and offload."""
