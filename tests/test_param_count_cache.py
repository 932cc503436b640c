"""count_params keeps its counts on disk: a job no longer builds every part on the
meta device to plan (benchmarks/overhead_bench.py), and a changed config counts again."""

from __future__ import annotations

import json
import shutil

import pytest

import framepack.engine.planning as planning
from framepack.models.sources import ModelSource


def _no_count(root):
    raise AssertionError("counted again although the configs did not change")


def test_second_count_comes_from_the_cache(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("FRAMEPACK_CACHE_DIR", str(tmp_path / "cache"))
    source = ModelSource("original", root=tiny_model)
    first = planning.count_params(source)
    assert list((tmp_path / "cache" / "params").glob("*.json"))
    monkeypatch.setattr(planning, "_count_on_meta", _no_count)
    assert planning.count_params(source) == first


def test_a_changed_config_or_a_damaged_entry_counts_again(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("FRAMEPACK_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    source = ModelSource("original", root=model)
    before = planning.count_params(source)

    config = json.loads((model / "transformer/config.json").read_text())
    config["num_single_layers"] += 1
    (model / "transformer/config.json").write_text(json.dumps(config))
    after = planning.count_params(source)
    assert after["transformer"] > before["transformer"]

    for entry in (tmp_path / "cache" / "params").glob("*.json"):
        entry.write_text("{not json")
    assert planning.count_params(source) == after  # recounted, and written again
    monkeypatch.setattr(planning, "_count_on_meta", _no_count)
    assert planning.count_params(source) == after


def test_an_unwritable_cache_still_counts(tiny_model, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FRAMEPACK_CACHE_DIR", str(blocker))  # a file: nothing can be written under it
    counts = planning.count_params(ModelSource("original", root=tiny_model))
    assert counts["transformer"] > 0


def test_a_missing_config_is_the_error_the_user_sees(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("FRAMEPACK_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "vae/config.json").unlink()
    with pytest.raises(OSError):
        planning.count_params(ModelSource("original", root=model))
