"""Plugin loading through the real entry-point discovery path.

Third-party plugins are faked with a ``*.dist-info`` folder holding an
``entry_points.txt`` on a temporary sys.path entry, so nothing is installed.
"""

from __future__ import annotations

import pkgutil
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

import framepack_plugins
from framepack.assemble import assemble
from framepack.errors import ConfigError, PluginError
from framepack.hardware import HardwareInfo
from framepack.plugins import build_plugin_manager, collect_backends

CPU = HardwareInfo(device="cpu", ram_total_gb=16, ram_available_gb=16)

FAST_PLUGIN = '''
from framepack.backends import AttentionBackend
from framepack.hookspecs import hookimpl
from framepack_plugins.attention.sdpa import sdpa_kernel

CALLS = []

def fast_kernel(q, k, v, mask):
    CALLS.append(tuple(q.shape))
    return sdpa_kernel(q, k, v, mask)

@hookimpl
def framepack_register_attention(register):
    register(AttentionBackend(name="fastattn", make_kernel=lambda options: fast_kernel,
                              supports_mask=True, description="test kernel"))
'''


def fake_distribution(root: Path, dist: str, module: str, source: str, entry_points: str) -> None:
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[framepack]\n" + entry_points + "\n")


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_every_builtin_module_is_an_entry_point():
    declared = {ep.value for ep in metadata.entry_points(group="framepack") if ep.dist.metadata["Name"] == "framepack"}
    modules = {
        m.name
        for m in pkgutil.walk_packages(framepack_plugins.__path__, "framepack_plugins.")
        if not m.ispkg
    }
    assert modules == declared


def test_builtins_register_the_defaults():
    registry = collect_backends(build_plugin_manager())
    assert "sdpa" in registry.names("attention")
    assert {"resident", "model_swap"} <= set(registry.names("offload"))
    assert registry.names("cache") == ["first_block", "magcache", "none", "teacache"]
    assert registry.names("writer") == ["latents", "mp4", "png", "webm"]
    assert registry.names("text_encoder") == ["hunyuan"]
    assert registry.names("image_encoder") == ["siglip"]
    assert registry.names("vae") == ["hunyuan_vae"]


def test_third_party_backend_is_discovered_and_selected_by_a_profile(plugin_dir, run_in_tmp):
    fake_distribution(plugin_dir, "fastattn-plugin", "fastattn_plugin", FAST_PLUGIN, "fastattn = fastattn_plugin")
    (run_in_tmp / "framepack.toml").write_text('[profiles.cpu]\nattention = ["fastattn", "sdpa"]\n')
    engine = assemble(hardware=CPU)
    choice = engine.choices["attention"]
    assert (choice.name, choice.plugin) == ("fastattn", "fastattn")
    assert engine.plugins.sources["fastattn"].distribution == "fastattn-plugin"
    assert not engine.plugins.sources["fastattn"].builtin


def test_third_party_kernel_runs_in_every_attention_call(plugin_dir, run_in_tmp, tiny_model, test_image):
    import fastattn_plugin  # noqa: F401  (imported below through the entry point too)

    from framepack.generate import generate
    from framepack.job import JobSettings

    fake_distribution(plugin_dir, "fastattn-plugin", "fastattn_plugin", FAST_PLUGIN, "fastattn = fastattn_plugin")
    engine = assemble(hardware=CPU, overrides=["attention=fastattn"])
    import fastattn_plugin as plugin_module

    plugin_module.CALLS.clear()
    steps = 2
    settings = JobSettings(image=test_image, prompt="a test", output=run_in_tmp / "out.mp4", model=str(tiny_model),
                           seconds=1, steps=steps, size=(64, 64))
    result = generate(settings, engine)
    forwards = steps * result.sections
    # refiner + 1 double-stream + 1 single-stream attention per forward
    assert len(plugin_module.CALLS) == 3 * forwards


def test_broken_plugin_names_itself(plugin_dir):
    fake_distribution(plugin_dir, "broken-plugin", "broken_plugin", "raise ImportError('no module named cuda_magic')\n",
                      "broken = broken_plugin")
    with pytest.raises(PluginError) as err:
        build_plugin_manager()
    message = str(err.value)
    assert "plugin 'broken'" in message and "broken_plugin" in message and "cuda_magic" in message
    assert isinstance(err.value.__cause__, ImportError)


def test_misspelt_hook_is_caught(plugin_dir):
    source = "from framepack.hookspecs import hookimpl\n@hookimpl\ndef framepack_register_atention(register):\n    pass\n"
    fake_distribution(plugin_dir, "typo-plugin", "typo_plugin", source, "typo = typo_plugin")
    with pytest.raises(PluginError, match="typo"):
        build_plugin_manager()


def test_autoload_switch_and_disabled_list(plugin_dir, monkeypatch, run_in_tmp):
    fake_distribution(plugin_dir, "broken-plugin", "broken_plugin", "raise RuntimeError('boom')\n", "broken = broken_plugin")
    monkeypatch.setenv("FRAMEPACK_DISABLE_PLUGIN_AUTOLOAD", "1")
    loaded = build_plugin_manager()
    assert "broken" in loaded.skipped and "sdpa" in collect_backends(loaded).names("attention")
    monkeypatch.delenv("FRAMEPACK_DISABLE_PLUGIN_AUTOLOAD")
    loaded = build_plugin_manager(disabled_plugins=["broken-plugin"])
    assert loaded.skipped["broken"] == "listed in disabled_plugins"
    # The same through the user's profile file.
    (run_in_tmp / "framepack.toml").write_text('disabled_plugins = ["broken"]\n')
    engine = assemble(hardware=CPU)
    assert "broken" in engine.plugins.skipped


def test_duplicate_backend_name_is_an_error(plugin_dir):
    source = FAST_PLUGIN.replace('name="fastattn"', 'name="sdpa"')
    fake_distribution(plugin_dir, "dup-plugin", "dup_plugin", source, "dup = dup_plugin")
    with pytest.raises(PluginError, match="registered twice"):
        collect_backends(build_plugin_manager())


def test_unknown_single_backend_lists_installed(run_in_tmp):
    with pytest.raises(ConfigError) as err:
        assemble(hardware=CPU, overrides=["attention=flash9"])
    message = str(err.value)
    assert "flash9" in message and "sdpa" in message.split("installed attention backends:")[1]
