"""A repeated prompt is read from the disk cache and the text encoder never loads."""

from __future__ import annotations

import os

import torch

from framepack.models.prompt_cache import PromptCache, cache_dir
from framepack_plugins.encoders import hunyuan_text
from tests.test_generate import run


def counting_loads(monkeypatch):
    loads = []
    real = hunyuan_text.load

    def load(*args, **kwargs):
        loads.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(hunyuan_text, "load", load)
    return loads


def test_second_run_with_the_same_prompt_skips_the_text_encoder(monkeypatch, tiny_model, test_image, tmp_path):
    loads = counting_loads(monkeypatch)
    first = run(tiny_model, test_image, tmp_path, seconds=1, steps=2)
    assert len(loads) == 1 and len(PromptCache().entries()) == 1
    second = run(tiny_model, test_image, tmp_path, seconds=1, steps=2, seed=5)
    assert len(loads) == 1  # cached: not loaded again
    # The cached embedding is the same one: same seed gives the same latents.
    third = run(tiny_model, test_image, tmp_path, seconds=1, steps=2)
    assert torch.equal(first.latents, third.latents) and not torch.equal(first.latents, second.latents)


def test_a_changed_encoder_misses(monkeypatch, tiny_model, test_image, tmp_path):
    import shutil

    loads = counting_loads(monkeypatch)
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    run(model, test_image, tmp_path, seconds=1, steps=1)
    weights = next((model / "text_encoder").glob("*.safetensors"))
    os.utime(weights, ns=(0, 10**9))  # as if replaced by another file
    run(model, test_image, tmp_path, seconds=1, steps=1)
    assert len(loads) == 2


def test_cfg_caches_both_prompts_and_no_cache_flag(monkeypatch, tiny_model, test_image, tmp_path):
    loads = counting_loads(monkeypatch)
    run(tiny_model, test_image, tmp_path, seconds=1, steps=1, cfg=2.0, negative_prompt="blur")
    assert len(PromptCache().entries()) == 2
    run(tiny_model, test_image, tmp_path, seconds=1, steps=1, cfg=2.0, negative_prompt="blur")
    assert len(loads) == 1
    run(tiny_model, test_image, tmp_path, seconds=1, steps=1, prompt_cache=False)
    assert len(loads) == 2


def test_cache_is_bounded_and_clearable(tmp_path):
    cache = PromptCache(tmp_path / "c", max_entries=3)
    for i in range(5):
        cache.put(f"k{i}", torch.full((1, 2, 4), float(i)), torch.zeros(1, 4), f"prompt {i}")
        os.utime(cache._path(f"k{i}"), ns=(i * 10**9, i * 10**9))  # distinct ages
    cache.evict()
    kept = {p.stem for p in cache.entries()}
    assert kept == {"k2", "k3", "k4"}
    assert cache.get("k0") is None and cache.get("k4")[0][0, 0, 0] == 4.0
    (tmp_path / "c" / "k3.safetensors").write_bytes(b"not a safetensors file")
    assert cache.get("k3") is None and not (tmp_path / "c" / "k3.safetensors").exists()
    assert cache.clear() == 2 and cache.entries() == []  # k2 and k4 were left


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FRAMEPACK_CACHE_DIR", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" / "prompts"


def test_cache_cli_info_and_clear(capsys, tmp_path):
    from framepack.cli import main

    PromptCache().put("k", torch.zeros(1, 2, 4), torch.zeros(1, 4), "p")
    assert main(["cache", "info"]) == 0 and "1 cached prompt embedding" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0 and "removed 1" in capsys.readouterr().out
    assert PromptCache().entries() == []
