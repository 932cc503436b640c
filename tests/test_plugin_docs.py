"""docs/plugins.md, run: every ```python block is a plugin module.

The blocks are written into a temporary folder with a fake
``*.dist-info`` (entry points as the page's pyproject example names them,
else the module's name), so the real discovery path loads them; then a
tiny job runs with each one selected. A block that is only a fragment would
say ``# not run`` on its first line and is skipped (none is today).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from framepack.engine.assemble import assemble
from framepack.engine.plugin_manager import build_plugin_manager, collect_backends
from framepack.errors import ConfigError
from framepack.hardware import HardwareInfo

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
CPU = HardwareInfo(device="cpu", ram_total_gb=16, ram_available_gb=16)
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def doc_blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(DOC.read_text(encoding="utf-8")) if lang == language]


def doc_modules() -> dict[str, str]:
    """module name -> source of every runnable python block."""
    modules = {}
    for body in doc_blocks("python"):
        first = body.splitlines()[0]
        if "# not run" in first:
            continue
        name = re.fullmatch(r"# (\w+)\.py", first.strip())
        assert name, f"a python block of {DOC.name} must start with '# MODULE.py' or '# not run': {first!r}"
        assert name[1] not in modules, f"two blocks are {name[1]}.py"
        modules[name[1]] = body
    return modules


def doc_entry_points(modules: dict[str, str]) -> dict[str, str]:
    """entry point name -> module: as the page's pyproject block names them, the others by module name."""
    named = {}
    for body in doc_blocks("toml"):
        table = tomllib.loads(body).get("project", {}).get("entry-points", {}).get("framepack", {})
        named.update(table)
    points = {ep: module for ep, module in named.items() if module in modules}
    points.update({m: m for m in modules if m not in points.values()})
    return points


@pytest.fixture
def doc_plugins(tmp_path, monkeypatch):
    """The page's plugins installed as the distribution `doc-examples`."""
    modules = doc_modules()
    root = tmp_path / "site"
    root.mkdir()
    for name, source in modules.items():
        (root / f"{name}.py").write_text(source, encoding="utf-8")
    info = root / "doc_examples-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: doc-examples\nVersion: 1.0\n")
    points = doc_entry_points(modules)
    (info / "entry_points.txt").write_text("[framepack]\n" + "".join(f"{ep} = {m}\n" for ep, m in points.items()))
    monkeypatch.syspath_prepend(str(root))
    yield points
    for name in modules:
        sys.modules.pop(name, None)


def test_the_page_has_a_plugin_for_every_family():
    modules = doc_modules()
    hooks = {h for source in modules.values() for h in re.findall(r"def (framepack_\w+)", source)}
    assert {"framepack_register_attention", "framepack_register_cache", "framepack_register_offload",
            "framepack_register_encoders", "framepack_register_writers", "framepack_on_job_start",
            "framepack_on_section", "framepack_on_step", "framepack_on_job_end"} <= hooks
    assert doc_entry_points(modules)["myattn"] == "myattn_plugin"


def test_every_block_loads_through_discovery(doc_plugins):
    loaded = build_plugin_manager()  # strict, as a job builds it
    registry = collect_backends(loaded)
    assert set(doc_plugins) <= set(loaded.sources)
    for ep in doc_plugins:
        assert loaded.sources[ep].distribution == "doc-examples" and not loaded.sources[ep].builtin
    assert registry.get("attention", "myattn").plugin == "myattn"
    assert {"fastlib", "myattn"} <= set(registry.names("attention"))
    assert "reuse" in registry.names("cache") and "one_stage" in registry.names("offload")
    assert "tidy" in registry.names("text_encoder")
    assert {"npz", "latents_npy"} <= set(registry.names("writer"))


def test_one_job_runs_every_example(doc_plugins, tiny_model, test_image, run_in_tmp, monkeypatch):
    """Attention, step cache, offload, text encoder, both writers and the listener, all in one job."""
    import framepack
    from framepack.pipeline.sections import section_count

    import myattn_plugin

    calls = []
    kernel = myattn_plugin.my_kernel
    monkeypatch.setattr(myattn_plugin, "my_kernel", lambda *args: calls.append(args[0].shape) or kernel(*args))
    log = run_in_tmp / "events.jsonl"
    monkeypatch.setenv("FRAMEPACK_EVENT_LOG", str(log))
    steps = 3
    overrides = ["attention=myattn", "cache=reuse", "options.reuse.every=2", "offload=one_stage",
                 "text_encoder=tidy", 'writers=["npz", "latents_npy"]', "options.npz.compressed=false"]
    with framepack.Pipeline(model=tiny_model, profile="cpu", overrides=overrides) as pipe:
        result = pipe.generate(image=test_image, prompt="a   wave\n", size="64x64", steps=steps, seconds=1,
                               output=run_in_tmp / "clip")
        engine = pipe.last_engine
        policy = pipe._store.policy
    sections = section_count(1, 9)
    assert result.sections == sections

    choices = {family: choice.name for family, choice in engine.choices.items()}
    assert choices["attention"] == "myattn" and "self-check" in engine.choices["attention"].checked
    assert (choices["cache"], choices["offload"], choices["text_encoder"]) == ("reuse", "one_stage", "tidy")
    # attention: refiner + 1 double + 1 single block per transformer call of the tiny model
    assert len(calls) >= 3 * 2 * sections
    # step cache: steps 0 and 2 (the last) computed, step 1 reused
    assert result.computed_steps == [2] * sections and result.skipped_steps == [1] * sections
    # offload: every stage the engine runs went through the policy
    assert {("text_encoder", "text_encoder_2"), ("image_encoder",), ("vae",), ("transformer",)} <= set(policy.stages)

    # writers: the frames and the latents, with the job's record
    video = np.load(run_in_tmp / "clip.npz")
    assert video["frames"].dtype == np.uint8 and video["frames"].shape == (result.frames, 64, 64, 3)
    record = json.loads(json.loads(str(video["metadata"]))["comment"])
    assert record["settings"]["prompt"] == "a   wave\n" and record["backends"]["writers"] == "npz,latents_npy"
    latents = np.load(run_in_tmp / "clip.npy")
    assert np.array_equal(latents, result.latents.numpy())
    assert {p.name for p in run_in_tmp.iterdir()} >= {"clip.npz", "clip.npy", "clip.json"}
    assert not (run_in_tmp / "clip.npz.job").exists()

    # listener: every event, in order, with its fields
    events = [json.loads(line) for line in log.read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "job_start" and kinds[-1] == "job_end"
    assert kinds.count("section") == 2 * sections and kinds.count("step") == steps * sections
    start, end = events[0], events[-1]
    assert (start["width"], start["height"], start["sections"], start["frames"]) == (64, 64, sections, result.frames)
    assert start["backends"]["cache"] == "reuse" and start["profile"] == "cpu"
    assert end["status"] == "done" and end["error"] is None and str(run_in_tmp / "clip.npz") in end["outputs"]
    ends = [e for e in events if e["event"] == "section" and e["phase"] == "end"]
    assert [(e["computed"], e["skipped"]) for e in ends] == [(2, 1)] * sections
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(steps)) * sections


def test_the_tidy_encoder_encodes_the_tidied_prompt(doc_plugins, tiny_model):
    from framepack.models.sources import ModelSource

    registry = collect_backends(build_plugin_manager())
    source = ModelSource.from_arg(str(tiny_model), "original")
    tidy = registry.get("text_encoder", "tidy").backend.load(source, None, torch.float32, "none")
    plain = registry.get("text_encoder", "hunyuan").backend.load(source, None, torch.float32, "none")
    assert set(tidy.modules) == {"text_encoder", "text_encoder_2"}
    for got, want in zip(tidy.encode("  a  wave \n"), plain.encode("a wave")):
        assert torch.equal(got, want)


def test_the_optional_library_kernel_says_why_it_cannot_run(doc_plugins, run_in_tmp, capsys, monkeypatch):
    from framepack.cli import main

    engine = assemble(hardware=CPU, overrides=['attention=["fastlib", "sdpa"]'])
    assert engine.choices["attention"].name == "sdpa"
    assert engine.choices["attention"].skipped == ("fastlib: needs CUDA",)
    monkeypatch.setenv("FRAMEPACK_HARDWARE", '{"device": "cuda", "vram_total_gb": 24}')
    assert main(["plugins", "--json"]) == 0
    fastlib = next(e for e in json.loads(capsys.readouterr().out)["families"]["attention"] if e["name"] == "fastlib")
    assert fastlib["reason"] == "fastlib is not installed (pip install fastlib)"
    assert fastlib["source"] == "from doc-examples (entry point fastlib_plugin = fastlib_plugin)"


def test_the_cache_options_refuse_a_bad_value(doc_plugins, run_in_tmp):
    with pytest.raises(ConfigError, match=r"options\.reuse: every must be 1 or more, got 0"):
        assemble(hardware=CPU, overrides=["cache=reuse", "options.reuse.every=0"])
    with pytest.raises(ConfigError, match="unknown key 'evry'"):
        assemble(hardware=CPU, overrides=["cache=reuse", "options.reuse.evry=3"])


def test_plugins_lists_the_listener_only_example(doc_plugins, capsys):
    from framepack.cli import main

    assert main(["plugins", "--json"]) == 0
    plugins = {p["name"]: p for p in json.loads(capsys.readouterr().out)["plugins"]}
    log = plugins["eventlog_plugin"]
    assert log["backends"] == [] and set(log["events"]) == {"framepack_on_job_start", "framepack_on_section",
                                                            "framepack_on_step", "framepack_on_job_end"}
    assert plugins["myattn"]["backends"] == ["attention/myattn"] and plugins["myattn"]["events"] == []
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    listeners = out.split("event listeners:")[1]
    assert "eventlog_plugin" in listeners
    assert "from doc-examples (entry point eventlog_plugin = eventlog_plugin)" in listeners
    assert "myattn " not in listeners
