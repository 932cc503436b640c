"""Built-in framepack plugins, loaded through the `framepack` entry-point group like any third-party plugin."""
