"""Where weights come from and how they load: sources, lazy loading, quantization, fingerprints, the prompt cache, test models."""
