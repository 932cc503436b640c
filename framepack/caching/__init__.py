"""Step caches (TeaCache, MagCache, first-block) and their calibration data."""
