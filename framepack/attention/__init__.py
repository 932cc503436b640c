"""Attention: the processors the transformer calls, mask handling, the kernel self-check, kernel support."""
