"""Plugin loading through the real entry-point discovery path.

Third-party plugins are faked with a ``*.dist-info`` folder holding an
``entry_points.txt`` on a temporary sys.path entry, so nothing is installed.
"""

from __future__ import annotations

import json
import pkgutil
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

import framepack_plugins
from framepack.engine.assemble import assemble
from framepack.errors import ConfigError, PluginError
from framepack.hardware import HardwareInfo
from framepack.engine.plugin_manager import build_plugin_manager, collect_backends

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

    from framepack.pipeline.generate import generate
    from framepack.pipeline.settings import JobSettings

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


LISTENER_ONLY = '''
from framepack import hookimpl

SEEN = []

@hookimpl
def framepack_on_step(event):
    SEEN.append(event.step)
'''

RAISES_IN_REGISTRATION = '''
from framepack import AttentionBackend, hookimpl
from framepack_plugins.attention.sdpa import sdpa_kernel

@hookimpl
def framepack_register_attention(register):
    register(AttentionBackend(name="halfway", make_kernel=lambda options: sdpa_kernel, supports_mask=True))
    raise RuntimeError("lost my config file")
'''


@pytest.fixture
def fresh_plugins(plugin_dir):
    """plugin_dir, and the modules imported from it forgotten afterwards, so
    each test imports the files it wrote (the module names below are used by
    no other test)."""
    yield plugin_dir
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(plugin_dir)):
            del sys.modules[name]


RAISING_LISTENER = '''
from framepack import hookimpl

@hookimpl
def framepack_on_section(event):
    if event.phase == "end":
        raise RuntimeError("listener exploded")
'''


def test_a_registration_hook_that_raises_names_the_plugin_and_its_entry_point(fresh_plugins):
    fake_distribution(fresh_plugins, "halfway-plugin", "halfway_plugin", RAISES_IN_REGISTRATION,
                      "halfway = halfway_plugin")
    with pytest.raises(PluginError) as err:
        collect_backends(build_plugin_manager())
    message = str(err.value)
    assert message.startswith("plugin 'halfway' (from halfway-plugin (entry point halfway = halfway_plugin)) "
                              "failed in framepack_register_attention: RuntimeError: lost my config file")
    assert 'disabled_plugins = ["halfway"]' in message and "FRAMEPACK_DISABLE_PLUGIN_AUTOLOAD=1" in message
    assert isinstance(err.value.__cause__, RuntimeError)


@pytest.mark.parametrize("registered, refused", [
    ("{'name': 'x'}", "registered a dict from framepack_register_writers, which takes a "
                      "framepack.backends.WriterBackend"),
    ("WriterBackend(name='x', suffix='.x', open=print)", "a writer that accepts frames needs join="),
    ("WriterBackend(name='x', suffix='.x', accepts='latent', save=print)", "accepts must be 'frames' or 'latents'"),
    ("WriterBackend(name='x', suffix='.x', save=print, accepts='latents', options=object())",
     "options must be a dataclass"),
])
def test_a_backend_the_engine_cannot_use_is_refused_at_registration(fresh_plugins, registered, refused):
    source = ("from framepack import WriterBackend, hookimpl\n@hookimpl\ndef framepack_register_writers(register):\n"
              f"    register({registered})\n")
    fake_distribution(fresh_plugins, "odd-plugin", "odd_plugin", source, "odd = odd_plugin")  # forgotten after each
    with pytest.raises(PluginError) as err:
        collect_backends(build_plugin_manager())
    assert "plugin 'odd' (from odd-plugin (entry point odd = odd_plugin))" in str(err.value)
    assert refused in str(err.value)


def test_plugins_command_lists_broken_and_listener_only_plugins(fresh_plugins, capsys):
    from framepack.cli import main

    fake_distribution(fresh_plugins, "broken-plugin", "broken_plugin",
                      "raise ImportError('no module named cuda_magic')\n", "broken = broken_plugin")
    fake_distribution(fresh_plugins, "stepp-plugin", "stepp_plugin",
                      "from framepack import hookimpl\n@hookimpl\ndef framepack_on_stepp(event):\n    pass\n",
                      "stepp = stepp_plugin")
    fake_distribution(fresh_plugins, "halfway-plugin", "halfway_plugin", RAISES_IN_REGISTRATION,
                      "halfway = halfway_plugin")
    fake_distribution(fresh_plugins, "steps-plugin", "steps_plugin", LISTENER_ONLY, "steps = steps_plugin")
    fake_distribution(fresh_plugins, "okattn-plugin", "okattn_plugin", FAST_PLUGIN.replace('"fastattn"', '"okattn"'),
                      "okattn = okattn_plugin")

    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    listeners, broken = out.split("event listeners:")[1].split("broken plugins")
    assert "steps " in listeners and "framepack_on_step" in listeners and "from steps-plugin" in listeners
    for name in ("broken", "stepp", "halfway"):
        assert f'disabled_plugins = ["{name}"]' in broken
    assert "failed to load: ImportError: no module named cuda_magic" in broken
    assert "framepack_on_stepp (did you mean framepack_on_step?)" in broken
    assert "failed in framepack_register_attention: RuntimeError: lost my config file" in broken
    assert "FRAMEPACK_DISABLE_PLUGIN_AUTOLOAD=1" in broken
    assert "okattn " in out.split("offload:")[0]  # the healthy third-party plugin is listed as usual
    assert "halfway" not in out.split("event listeners:")[0]  # what a broken plugin registered is dropped

    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["broken_plugins"]) == {"broken", "stepp", "halfway"}
    assert "entry point broken = broken_plugin" in data["broken_plugins"]["broken"]
    steps = next(p for p in data["plugins"] if p["name"] == "steps")
    assert steps["events"] == ["framepack_on_step"] and steps["backends"] == [] and not steps["builtin"]

    # A job still stops on the first broken plugin, with the same line.
    with pytest.raises(PluginError, match="plugin 'broken' .* failed to load"):
        assemble(hardware=CPU)


def test_an_event_hook_that_raises_names_the_plugin(fresh_plugins):
    from framepack.events import SectionEvent

    fake_distribution(fresh_plugins, "boom-plugin", "boom_plugin", RAISING_LISTENER, "boom = boom_plugin")
    hook = build_plugin_manager().manager.hook
    hook.framepack_on_section(event=SectionEvent(0, 1, "start", 0.0))  # no raise: nothing to say
    with pytest.raises(PluginError) as err:
        hook.framepack_on_section(event=SectionEvent(0, 1, "end", 0.0))
    message = str(err.value)
    assert message.startswith("plugin 'boom' (from boom-plugin (entry point boom = boom_plugin)) failed in "
                              "framepack_on_section: RuntimeError: listener exploded (at ")
    assert str(fresh_plugins / "boom_plugin.py") in message and 'disabled_plugins = ["boom"]' in message
    assert isinstance(err.value.__cause__, RuntimeError)


def test_in_process_listeners_and_framepack_errors_pass_unchanged(fresh_plugins):
    from framepack.errors import UserError
    from framepack.events import StepEvent
    from framepack.hookspecs import hookimpl

    class Mine:
        @hookimpl
        def framepack_on_step(self, event):
            raise ValueError("my own bug")

    event = StepEvent(0, 1, 0, 1, 0.0)
    with pytest.raises(ValueError, match="my own bug"):
        build_plugin_manager(extra_plugins=[Mine()]).manager.hook.framepack_on_step(event=event)
    source = ("from framepack import hookimpl, UserError\n@hookimpl\ndef framepack_on_step(event):\n"
              "    raise UserError('speaker plugin: set SPEAKER_URL')\n")
    fake_distribution(fresh_plugins, "speaker-plugin", "speaker_plugin", source, "speaker = speaker_plugin")
    with pytest.raises(UserError, match="^speaker plugin: set SPEAKER_URL$"):
        build_plugin_manager().manager.hook.framepack_on_step(event=event)


def test_a_listener_that_raises_during_a_job_stops_it_with_one_line(fresh_plugins, run_in_tmp, tiny_model, test_image,
                                                                     capsys):
    from framepack.cli import main

    fake_distribution(fresh_plugins, "boom-plugin", "boomjob_plugin", RAISING_LISTENER, "boom = boomjob_plugin")
    out = run_in_tmp / "out.mp4"
    code = main(["generate", "--image", str(test_image), "--prompt", "a wave", "--model", str(tiny_model),
                 "--seconds", "1", "--steps", "1", "--size", "64x64", "--output", str(out), "--profile", "cpu",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("framepack: error: plugin 'boom' (from boom-plugin (entry point boom = boomjob_plugin)) "
                          "failed in framepack_on_section: RuntimeError: listener exploded")
    assert len(err.strip().splitlines()) == 1 and "internal error" not in err
    # It raised after section 0 was checkpointed: the job folder stays for `framepack resume`.
    assert (run_in_tmp / "out.mp4.job" / "checkpoint.safetensors").is_file() and not out.exists()


FAILING_WRITER = '''
from pathlib import Path
from framepack import WriterBackend, hookimpl

class Segment:
    def __init__(self, path, fps, width, height, options):
        self.path = Path(path)

    def write(self, frames):
        raise RuntimeError("disk quota of my cloud bucket")

    def close(self):
        pass

    def abort(self):
        self.path.with_name("aborted").write_text("yes")

@hookimpl
def framepack_register_writers(register):
    register(WriterBackend(name="bucket", suffix=".bucket", open=Segment, join=lambda *args: None))
'''


def test_blame_names_the_plugin_whose_backend_raised_during_a_job(fresh_plugins, run_in_tmp, tiny_model, test_image):
    import framepack
    from framepack.engine.plugin_manager import blame

    fake_distribution(fresh_plugins, "bucket-plugin", "bucket_plugin", FAILING_WRITER, "bucket = bucket_plugin")
    with framepack.Pipeline(model=tiny_model, profile="cpu", overrides=['writers=["bucket"]']) as pipe:
        with pytest.raises(RuntimeError, match="disk quota") as err:
            pipe.generate(image=test_image, prompt="a wave", size="64x64", steps=1, seconds=1,
                          output=run_in_tmp / "out")
    assert (run_in_tmp / "out.bucket.job" / "segments" / "bucket" / "aborted").read_text() == "yes"
    error = blame(err.value)
    assert str(error).startswith("plugin 'bucket' (from bucket-plugin (entry point bucket = bucket_plugin)) failed "
                                 "in a job: RuntimeError: disk quota of my cloud bucket (at ")
    assert blame(RuntimeError("not raised by a plugin")) is None


def test_the_cli_names_the_plugin_whose_backend_raised(fresh_plugins, run_in_tmp, tiny_model, test_image, capsys):
    from framepack.cli import main

    fake_distribution(fresh_plugins, "bucket-plugin", "bucket_plugin", FAILING_WRITER, "bucket = bucket_plugin")
    rc = main(["generate", "--image", str(test_image), "--prompt", "a wave", "--model", str(tiny_model),
               "--profile", "cpu", "--set", 'writers=["bucket"]', "--size", "64x64", "--steps", "1",
               "--seconds", "1", "--output", "out", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "internal error" not in err and "Traceback" not in err
    assert err.strip().splitlines() == [line for line in err.strip().splitlines() if "plugin 'bucket'" in line]
