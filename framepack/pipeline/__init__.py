"""One job from image and prompt to files: settings, sections, the section loop, sampling, the transformer call."""
