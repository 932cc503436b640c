"""Hardware profiles: matching, user files, --set overrides and backend preference lists.

Hardware is simulated (``HardwareInfo`` built directly, or ``FRAMEPACK_HARDWARE``
for the CLI), so every case runs the same on any machine. The shipped rules
are in framepack.toml: VRAM ranges in GiB as the driver reports them, min
inclusive, max exclusive.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from framepack.engine.assemble import assemble
from framepack.cli import main
from framepack.engine.profiles import SHIPPED, apply_overrides, load_profiles, match_profile, select_profile
from framepack.errors import ConfigError, UserError
from framepack.hardware import HardwareInfo, detect_hardware, device_present, limit_fraction


def cuda(vram: float, name: str = "NVIDIA test GPU", ram: float = 64.0) -> HardwareInfo:
    return HardwareInfo(
        device="cuda", gpu_name=name, compute_capability=(8, 9), vram_total_gb=vram, vram_free_gb=vram * 0.95,
        ram_total_gb=ram, ram_available_gb=ram * 0.8,
    )


CPU = HardwareInfo(device="cpu", ram_total_gb=32.0, ram_available_gb=24.0)
MPS = HardwareInfo(device="mps", gpu_name="Apple Silicon", vram_total_gb=36.0, vram_free_gb=30.0, ram_total_gb=36.0, ram_available_gb=30.0)
LAPTOP_6GB = cuda(5.8, "NVIDIA GeForce RTX 3060 Laptop GPU", ram=16.0)

MACHINES = {
    "laptop 6 GB": (LAPTOP_6GB, "cuda-8gb", ("5.8", "10")),
    "12 GB card": (cuda(11.6, "NVIDIA GeForce RTX 4070"), "cuda-16gb", ("11.6", "10", "20")),
    "24 GB card": (cuda(23.6, "NVIDIA GeForce RTX 4090"), "cuda-24gb", ("23.6", "20", "32")),
    "48 GB card": (cuda(47.5, "NVIDIA RTX A6000"), "cuda-48gb", ("47.5", "32", "64")),
    "H100 80 GB": (cuda(79.2, "NVIDIA H100 80GB HBM3"), "cuda-80gb", ("79.2", "64")),
    "H200 141 GB": (cuda(139.8, "NVIDIA H200"), "cuda-80gb", ("139.8", "64")),
    "cpu": (CPU, "cpu", ("cpu",)),
    "apple": (MPS, "apple-mps", ("mps",)),
}


@pytest.fixture
def shipped():
    return load_profiles(include_user_files=False)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def user_config_path() -> Path:
    return Path(os.environ["XDG_CONFIG_HOME"]) / "framepack" / "framepack.toml"


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize("machine", MACHINES)
def test_shipped_profile_for_machine(shipped, machine):
    hw, expected, numbers = MACHINES[machine]
    selection = select_profile(shipped, hw)
    assert selection.profile.name == expected
    assert selection.why.startswith("matches this machine")
    for number in numbers:
        assert number in selection.why, selection.why
    assert selection.reasons and all(r.startswith("ok: ") for r in selection.reasons)


@pytest.mark.parametrize(
    "machine, env",
    [
        ("laptop 6 GB", {"device": "cuda", "gpu_name": "NVIDIA GeForce RTX 3060 Laptop GPU", "vram_total_gb": 5.8, "ram_total_gb": 16}),
        ("24 GB card", {"device": "cuda", "gpu_name": "NVIDIA GeForce RTX 4090", "vram_total_gb": 23.6}),
        ("H200 141 GB", {"device": "cuda", "gpu_name": "NVIDIA H200", "vram_total_gb": 139.8, "compute_capability": "9.0"}),
        ("apple", {"device": "mps", "vram_total_gb": 36}),
        ("cpu", {"device": "cpu"}),
    ],
)
def test_profiles_json_with_simulated_hardware(monkeypatch, capsys, machine, env):
    _, expected, numbers = MACHINES[machine]
    monkeypatch.setenv("FRAMEPACK_HARDWARE", json.dumps(env))
    assert main(["profiles", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["hardware"]["simulated"] is True
    assert report["hardware"]["device"] == env["device"]
    assert report["selected"] == expected
    for number in numbers:
        assert number in report["why"]
    rows = {row["name"]: row for row in report["profiles"]}
    assert [name for name, row in rows.items() if row["selected"]] == [expected]
    assert rows[expected]["matches"] is True
    # Every shipped profile is listed, with one reason per rule.
    assert set(rows) == set(load_profiles(include_user_files=False).profiles)
    shipped = load_profiles(include_user_files=False).profiles
    for row in rows.values():
        assert len(row["reasons"]) == len(shipped[row["name"]].match)


def test_every_shipped_profile_is_reachable(shipped):
    machines = [CPU, MPS] + [cuda(v / 2, ram=ram) for v in range(1, 401) for ram in (15.5, 23.4, 62.5)]
    reached = {select_profile(shipped, hw).profile.name for hw in machines}
    assert reached == set(shipped.profiles)


def test_every_vram_matches_exactly_one_cuda_profile(shipped):
    """The VRAM tiers (the profiles without RAM rules) split the VRAM range; the
    low-RAM profiles are checked below."""
    cuda_profiles = [p for p in shipped.profiles.values()
                     if "cuda" in p.match.get("device", ()) and not {"min_ram_gb", "max_ram_gb"} & set(p.match)]
    assert len(cuda_profiles) == 5
    problems = []
    for vram in (v / 2 for v in range(2, 401)):  # 1 to 200 GB in steps of 0.5
        hw = cuda(vram)
        matching = [p.name for p in cuda_profiles if match_profile(p, hw)[0]]
        if len(matching) != 1:
            problems.append(f"{vram} GB matches {matching}")
        elif select_profile(shipped, hw).profile.name != matching[0]:
            problems.append(f"{vram} GB selects {select_profile(shipped, hw).profile.name}, not {matching[0]}")
    assert problems == []


@pytest.mark.parametrize("ram, expected", [(15.5, "cuda-ram16"), (23.4, "cuda-ram24"), (31.2, None), (62.5, None)])
@pytest.mark.parametrize("vram", [11.6, 15.6, 23.6])
def test_low_ram_machines_with_mid_cards_get_smaller_weights(shipped, vram, ram, expected):
    name = select_profile(shipped, cuda(vram, ram=ram)).profile.name
    assert name == (expected or ("cuda-16gb" if vram < 20 else "cuda-24gb"))


@pytest.mark.parametrize("seconds", [5, 60])
@pytest.mark.parametrize("ram", [15.5, 23.4, 31.2, 62.5])
@pytest.mark.parametrize("vram", [5.8, 7.8, 11.6, 15.6, 23.6])
def test_the_selected_profile_fits_the_machine_by_the_planners_estimate(shipped, vram, ram, seconds):
    """Cards up to 32 GB on machines with 16-64 GB of RAM: whatever profile is
    picked, its first offload policy's plan for 640x608 fits VRAM and RAM."""
    from framepack.engine.planning import KNOWN_PARAMS, estimate

    hw = cuda(vram, ram=ram)
    profile = select_profile(shipped, hw).profile
    plan = estimate(profile, profile.offload[0], KNOWN_PARAMS, 640, 608, 30 * seconds + 1, device="cuda")
    assert plan.vram_gb <= vram and plan.ram_gb <= ram, (profile.name, plan)


def test_vram_boundaries_min_inclusive_max_exclusive(shipped):
    assert select_profile(shipped, cuda(9.99)).profile.name == "cuda-8gb"
    assert select_profile(shipped, cuda(10.0)).profile.name == "cuda-16gb"
    assert select_profile(shipped, cuda(31.99)).profile.name == "cuda-24gb"
    assert select_profile(shipped, cuda(32.0)).profile.name == "cuda-48gb"
    assert select_profile(shipped, cuda(64.0)).profile.name == "cuda-80gb"


def test_cuda_profiles_do_not_match_cpu_or_mps(shipped):
    for hw in (CPU, MPS):
        for name in ("cuda-8gb", "cuda-16gb", "cuda-24gb", "cuda-48gb", "cuda-80gb"):
            ok, reasons = match_profile(shipped.profiles[name], hw)
            assert not ok
            assert any(r.startswith("no: device is") for r in reasons)


def _claims(reasons: list[str]) -> list[tuple[float, str, float]]:
    out = []
    for reason in reasons:
        m = re.match(r"ok: ([\d.]+) GB VRAM \(wants (>=|<) ([\d.]+) GB\)", reason)
        if m:
            out.append((float(m.group(1)), m.group(2), float(m.group(3))))
    return out


@pytest.mark.parametrize(
    "vram",
    [
        23.6,
        47.5,
        9.97,
        63.96,
    ],
)
def test_why_text_never_contradicts_the_rule(shipped, vram):
    reasons = select_profile(shipped, cuda(vram)).reasons
    claims = _claims(reasons)
    assert claims
    for shown, op, want in claims:
        assert (shown >= want) if op == ">=" else (shown < want), reasons


@pytest.mark.parametrize(
    "env, words",
    [
        ("not json", ("FRAMEPACK_HARDWARE", "JSON")),
        ('["cuda"]', ("FRAMEPACK_HARDWARE", "object")),
        ('{"device": "gpu"}', ("device", "'gpu'")),
        ('{"device": "cuda", "vram": 24}', ("unknown field", "vram")),
        ('{"device": "cuda"}', ("vram_total_gb",)),
        ('{"device": "cuda", "vram_total_gb": "24"}', ("vram_total_gb", "'24'")),
        ('{"device": "cuda", "vram_total_gb": 24, "compute_capability": "8.x"}', ("compute_capability", "8.x")),
    ],
)
def test_bad_simulated_hardware_is_a_clear_error(monkeypatch, capsys, env, words):
    monkeypatch.setenv("FRAMEPACK_HARDWARE", env)
    rc = main(["profiles"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert rc == 2
    [line] = err.strip().splitlines()
    assert line.startswith("framepack: error:")
    for word in words:
        assert word in line


@pytest.mark.parametrize(
    "value, words",
    [("six", ("FRAMEPACK_VRAM_LIMIT_GB", "'six'")), ("-1", ("positive",)), ("0", ("positive",))],
)
def test_bad_vram_limit_is_a_clear_error(monkeypatch, capsys, value, words):
    monkeypatch.delenv("FRAMEPACK_HARDWARE", raising=False)
    monkeypatch.setenv("FRAMEPACK_VRAM_LIMIT_GB", value)
    assert main(["profiles"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert all(word in line for word in words)


@pytest.mark.skipif(device_present("cuda"), reason="checks the refusal on a machine without CUDA")
def test_vram_limit_without_cuda_says_it_needs_one(monkeypatch, capsys):
    monkeypatch.delenv("FRAMEPACK_HARDWARE", raising=False)
    monkeypatch.setenv("FRAMEPACK_VRAM_LIMIT_GB", "6")
    assert main(["profiles"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(not device_present("cuda"), reason="emulating a smaller card needs a CUDA GPU")
def test_vram_limit_emulates_a_smaller_card(monkeypatch):
    import torch

    monkeypatch.delenv("FRAMEPACK_HARDWARE", raising=False)
    monkeypatch.setenv("FRAMEPACK_VRAM_LIMIT_GB", "6")
    hw = detect_hardware()
    assert hw.vram_total_gb <= 6
    with pytest.raises(torch.OutOfMemoryError):
        torch.empty(7 * 2**30, dtype=torch.uint8, device="cuda")
    torch.cuda.set_per_process_memory_fraction(1.0)


def test_vram_limit_fraction():
    assert limit_fraction(6, 80 * 2**30) == pytest.approx(6 / 80)
    assert limit_fraction(100, 80 * 2**30) == 1.0


# --------------------------------------------------------------------------- user files


def test_later_files_override_key_by_key(run_in_tmp):
    xdg = write(user_config_path(), '[profiles.cpu]\ndescription = "from xdg"\nvae_tiling = true\n')
    cwd = write(run_in_tmp / "framepack.toml", '[profiles.cpu]\ndescription = "from cwd"\ndtype = { vae = "float16" }\n')
    profiles = load_profiles()
    cpu = profiles.profiles["cpu"]
    assert cpu.description == "from cwd"  # the later file wins
    assert cpu.vae_tiling is True  # the earlier file's other keys stay
    assert cpu.dtype == {"transformer": "float32", "text_encoder": "float32", "image_encoder": "float32", "vae": "float16"}
    assert cpu.attention == ("sdpa",) and cpu.match == {"device": "cpu"}  # shipped keys stay
    assert [Path(s).resolve() for s in cpu.sources] == [SHIPPED.resolve(), xdg.resolve(), cwd.resolve()]
    assert [Path(f).resolve() for f in profiles.files] == [SHIPPED.resolve(), xdg.resolve(), cwd.resolve()]
    # Profiles no user file touched keep only the shipped source.
    assert profiles.profiles["cuda-24gb"].sources == (str(SHIPPED),)


def test_config_option_is_applied_last(run_in_tmp, tmp_path_factory):
    write(run_in_tmp / "framepack.toml", '[profiles.cpu]\ndescription = "from cwd"\n')
    extra = write(tmp_path_factory.mktemp("cfg") / "extra.toml", '[profiles.cpu]\ndescription = "from --config"\n')
    profiles = load_profiles(extra_files=[extra])
    assert profiles.profiles["cpu"].description == "from --config"
    assert profiles.profiles["cpu"].sources[-1] == str(extra)


def test_user_files_are_skipped_when_asked(run_in_tmp):
    write(user_config_path(), '[profiles.cpu]\ndescription = "from xdg"\n')
    write(run_in_tmp / "framepack.toml", '[profiles.cpu]\ndescription = "from cwd"\n')
    assert load_profiles(include_user_files=False).profiles["cpu"].description.startswith("No GPU")
    assert load_profiles(include_user_files=False).files == [str(SHIPPED)]


NEW_PROFILE = """
[profiles.big-cpu]
description = "a workstation without a GPU"
priority = 15
match = { device = "cpu", min_ram_gb = 100 }
attention = "sdpa"
offload = ["resident"]
cache = ["none"]
writers = ["mp4"]
dtype = { transformer = "bfloat16", text_encoder = "float32", image_encoder = "float32", vae = "float32" }
"""


def test_new_profile_with_higher_priority_wins_where_it_matches(run_in_tmp):
    write(run_in_tmp / "framepack.toml", NEW_PROFILE)
    profiles = load_profiles()
    big = profiles.profiles["big-cpu"]
    assert big.attention == ("sdpa",)  # a single name is a one-item list
    assert big.dtype["transformer"] == "bfloat16"
    workstation = HardwareInfo(device="cpu", ram_total_gb=256.0, ram_available_gb=200.0)
    selection = select_profile(profiles, workstation)
    assert selection.profile.name == "big-cpu"
    assert "256.0 GB RAM" in selection.why and "100" in selection.why
    assert "cpu" in selection.why.split("also matched", 1)[1]
    # Where its rules do not match, the shipped profile is still chosen.
    assert select_profile(profiles, CPU).profile.name == "cpu"


def test_inherited_profile_changes_only_what_it_sets(run_in_tmp):
    write(run_in_tmp / "framepack.toml", '[profiles.cpu-flash9]\ninherits = "cpu"\nattention = ["flash9", "sdpa"]\n')
    profiles = load_profiles()
    cpu, child = profiles.profiles["cpu"], profiles.profiles["cpu-flash9"]
    assert child.attention == ("flash9", "sdpa")
    for key in ("description", "priority", "offload", "cache", "writers", "dtype", "vae_tiling", "options",
                "text_encoder", "image_encoder", "vae"):
        assert getattr(child, key) == getattr(cpu, key), key
    assert child.sources[0] == str(SHIPPED) and Path(child.sources[-1]).name == "framepack.toml"
    # The parent is untouched.
    assert cpu.attention == ("sdpa",)
    # It can be chosen by name; flash is not installed, so sdpa runs and the engine says why.
    engine = assemble(profile_name="cpu-flash9", hardware=CPU)
    assert engine.profile.name == "cpu-flash9"
    assert engine.choices["attention"].name == "sdpa"
    assert engine.choices["attention"].skipped == ("flash9: not registered (plugin may not be installed)",)


def test_inheriting_an_unknown_profile_names_the_known_ones(run_in_tmp):
    path = write(run_in_tmp / "framepack.toml", '[profiles.mine]\ninherits = "cpuu"\n')
    with pytest.raises(ConfigError) as exc:
        load_profiles()
    message = str(exc.value)
    assert str(path) in message and "[profiles.mine]" in message and "'cpuu'" in message
    assert "cpu" in message.split("known", 1)[1]


def test_gpu_specific_profile_beats_the_shipped_one(run_in_tmp):
    write(
        run_in_tmp / "framepack.toml",
        '[profiles.my-4090]\ninherits = "cuda-24gb"\npriority = 30\n'
        'match = { device = "cuda", gpu_name = "4090", min_vram_gb = 20 }\nattention = ["sdpa"]\n',
    )
    profiles = load_profiles()
    selection = select_profile(profiles, cuda(23.6, "NVIDIA GeForce RTX 4090"))
    assert selection.profile.name == "my-4090"
    assert "4090" in selection.why and "cuda-24gb" in selection.why  # the shipped one also matched
    assert selection.profile.offload == profiles.profiles["cuda-24gb"].offload
    # A 3090 has the same VRAM but another name: the shipped profile.
    assert select_profile(profiles, cuda(23.6, "NVIDIA GeForce RTX 3090")).profile.name == "cuda-24gb"


def test_new_profile_missing_required_keys(run_in_tmp):
    path = write(run_in_tmp / "framepack.toml", '[profiles.half]\nmatch = { device = "cpu" }\nattention = ["sdpa"]\n')
    with pytest.raises(ConfigError) as exc:
        load_profiles()
    message = str(exc.value)
    assert str(path) in message and "[profiles.half]" in message
    for key in ("offload", "cache", "writers", "dtype"):
        assert key in message


def test_disabled_plugins_are_read_from_every_file(run_in_tmp):
    write(user_config_path(), 'disabled_plugins = ["framepack-sage"]\n')
    write(run_in_tmp / "framepack.toml", 'disabled_plugins = ["fastattn"]\n')
    assert load_profiles().disabled_plugins == ["framepack-sage", "fastattn"]
    assert load_profiles(include_user_files=False).disabled_plugins == []


def test_disabled_plugins_must_be_a_list(run_in_tmp):
    path = write(run_in_tmp / "framepack.toml", 'disabled_plugins = "fastattn"\n')
    with pytest.raises(ConfigError) as exc:
        load_profiles()
    assert str(path) in str(exc.value) and "disabled_plugins" in str(exc.value) and "list" in str(exc.value)


def test_unknown_top_level_key(run_in_tmp):
    path = write(run_in_tmp / "framepack.toml", '[profile.cpu]\nattention = ["sdpa"]\n')
    with pytest.raises(ConfigError) as exc:
        load_profiles()
    message = str(exc.value)
    assert str(path) in message and "'profile'" in message and "profiles" in message and "disabled_plugins" in message


@pytest.mark.parametrize(
    "text, words",
    [
        ('[profiles.cpu.match]\ndevice = "tpu"\n', ("[profiles.cpu.match]", "device", "'tpu'")),
        ('[profiles.cpu.match]\nmin_vram = 8\n', ("[profiles.cpu.match]", "min_vram", "min_vram_gb")),
        ('[profiles.cpu.dtype]\nvae = "float8"\n', ("[profiles.cpu.dtype]", "vae", "float8", "bfloat16")),
        ('[profiles.cpu.dtype]\nunet = "float16"\n', ("[profiles.cpu.dtype]", "unet", "transformer")),
        ('[profiles.cpu]\nattention = []\n', ("[profiles.cpu]", "attention", "list of names")),
        ('[profiles.cpu]\nvae_tiling = "yes"\n', ("[profiles.cpu]", "vae_tiling", "'yes'")),
    ],
)
def test_bad_values_in_a_user_file(run_in_tmp, text, words):
    path = write(run_in_tmp / "framepack.toml", text)
    with pytest.raises(ConfigError) as exc:
        load_profiles()
    assert str(path) in str(exc.value)
    for word in words:
        assert word in str(exc.value)


# --------------------------------------------------------------------------- --set


def _cpu_with(*assignments: str):
    return apply_overrides(load_profiles(include_user_files=False), "cpu", list(assignments))


def test_set_a_single_name():
    profile = _cpu_with("attention=sdpa")
    assert profile.attention == ("sdpa",)
    assert profile.sources[-1] == "--set"


def test_set_a_list():
    assert _cpu_with('attention=["flash","sdpa"]').attention == ("flash", "sdpa")


def test_set_a_dotted_key_keeps_the_rest_of_the_table():
    profile = _cpu_with("dtype.vae=float16")
    assert profile.dtype == {"transformer": "float32", "text_encoder": "float32", "image_encoder": "float32", "vae": "float16"}


def test_set_several_keys_in_order():
    profile = _cpu_with("cache=none", "vae_tiling=true", "attention=flash", "attention=sdpa")
    assert profile.cache == ("none",) and profile.vae_tiling is True and profile.attention == ("sdpa",)


def test_set_does_not_change_the_loaded_profiles():
    profiles = load_profiles(include_user_files=False)
    apply_overrides(profiles, "cpu", ["dtype.vae=float16", "attention=flash"])
    assert profiles.profiles["cpu"].dtype["vae"] == "float32"
    assert profiles.raw["cpu"]["attention"] == ["sdpa"]


@pytest.mark.parametrize(
    "assignment, words",
    [
        ("bogus=1", ("bogus", "known keys", "attention")),
        ("noequals", ("noequals", "KEY=VALUE")),
        ("=sdpa", ("KEY=VALUE",)),
        ("dtype..vae=float16", ("empty part",)),
        ("dtype.vae=float8", ("dtype", "vae", "float8", "float16")),
        ("dtype=float16", ("dtype", "table")),
        ("vae_tiling=maybe", ("vae_tiling", "maybe")),
    ],
)
def test_set_errors_are_user_errors(assignment, words):
    with pytest.raises(UserError) as exc:
        _cpu_with(assignment)
    for word in words:
        assert word in str(exc.value)


def test_set_backend_option_reaches_the_writer():
    engine = assemble(profile_name="cpu", overrides=["options.mp4.crf=20"], hardware=CPU, include_user_files=False)
    [writer] = engine.writers
    assert writer.name == "mp4"
    assert writer.options.crf == 20
    assert writer.options.preset == "medium"  # untouched options keep their defaults


def test_backend_option_from_a_file_reaches_the_writer(tmp_path):
    extra = write(tmp_path / "extra.toml", '[profiles.cpu.options.mp4]\ncrf = 23\npreset = "fast"\n')
    engine = assemble(profile_name="cpu", config_files=[extra], hardware=CPU, include_user_files=False)
    assert (engine.writers[0].options.crf, engine.writers[0].options.preset) == (23, "fast")


def test_set_unknown_backend_option():
    with pytest.raises(ConfigError) as exc:
        assemble(profile_name="cpu", overrides=["options.mp4.crff=20"], hardware=CPU, include_user_files=False)
    message = str(exc.value)
    assert "[profiles.cpu]" in message and "options.mp4" in message and "'crff'" in message
    assert "known keys: crf, preset" in message


def test_set_backend_option_of_wrong_type():
    with pytest.raises(ConfigError) as exc:
        assemble(profile_name="cpu", overrides=["options.mp4.crf=high"], hardware=CPU, include_user_files=False)
    message = str(exc.value)
    assert "options.mp4" in message and "'crf'" in message and "int" in message and "'high'" in message


def test_options_for_a_backend_nobody_registered():
    with pytest.raises(ConfigError) as exc:
        assemble(profile_name="cpu", overrides=["options.nope.x=1"], hardware=CPU, include_user_files=False)
    assert "options.nope" in str(exc.value) and "'nope'" in str(exc.value)


# --------------------------------------------------------------------------- preference lists


def test_preference_list_skips_unregistered_backend_and_says_why(tmp_path):
    extra = write(tmp_path / "pref.toml", '[profiles.pref]\ninherits = "cpu"\nattention = ["flash9", "sdpa"]\n')
    engine = assemble(profile_name="pref", config_files=[extra], hardware=CPU, include_user_files=False)
    choice = engine.choices["attention"]
    assert choice.name == "sdpa"
    assert choice.plugin == "attention_sdpa"
    assert choice.skipped == ("flash9: not registered (plugin may not be installed)",)
    assert "skipped flash9: not registered" in choice.explain()
    # Nothing else in this profile had to fall back.
    assert engine.choices["offload"].skipped == () and engine.choices["cache"].skipped == ()


def test_preference_list_with_nothing_installed_stops_with_the_installed_list(tmp_path):
    extra = write(tmp_path / "pref.toml", '[profiles.pref]\ninherits = "cpu"\nattention = ["flash9", "sage9"]\n')
    with pytest.raises(ConfigError) as exc:
        assemble(profile_name="pref", config_files=[extra], hardware=CPU, include_user_files=False)
    message = str(exc.value)
    assert str(extra) in message
    assert "[profiles.pref] attention" in message
    assert "flash9: not registered" in message and "sage9: not registered" in message
    assert "sdpa" in message.split("installed attention backends:")[1]


def test_shipped_gpu_profile_on_this_engine_falls_back_to_what_is_installed():
    # cuda-80gb prefers flash3, flash, sage; only sdpa ships with the engine.
    engine = assemble(hardware=cuda(79.2, "NVIDIA H100 80GB HBM3"), include_user_files=False)
    assert engine.profile.name == "cuda-80gb"
    assert engine.choices["attention"].name == "sdpa"
    assert [s.split(":")[0] for s in engine.choices["attention"].skipped] == ["flash3", "flash", "sage"]
    assert engine.choices["cache"].name == "teacache"  # TeaCache on by default, as the original


# --------------------------------------------------------------------------- inheritance order


CHILD_FIRST = """
[profiles.child]
inherits = "parent"
attention = ["flash9", "sdpa"]

[profiles.parent]
inherits = "cpu"
description = "defined after its child"
vae_tiling = true
"""


def test_a_profile_can_inherit_one_defined_later_in_the_same_file(run_in_tmp):
    path = write(run_in_tmp / "framepack.toml", CHILD_FIRST)
    profiles = load_profiles()
    child, parent = profiles.profiles["child"], profiles.profiles["parent"]
    assert child.attention == ("flash9", "sdpa")
    assert child.description == "defined after its child" and child.vae_tiling is True  # from the parent
    assert child.offload == profiles.profiles["cpu"].offload  # from the grandparent
    assert child.match == {}  # match is never inherited
    assert parent.attention == ("sdpa",)  # the parent is untouched
    assert child.sources == (str(SHIPPED), str(path))
    # Profiles keep the order they were first defined in.
    assert list(profiles.profiles)[-2:] == ["child", "parent"]


def test_a_profile_can_inherit_one_defined_in_a_later_file(run_in_tmp):
    xdg = write(user_config_path(), '[profiles.mine]\ninherits = "local"\nvae_tiling = true\n')
    cwd = write(run_in_tmp / "framepack.toml", '[profiles.local]\ninherits = "cpu"\ndescription = "from cwd"\n')
    mine = load_profiles().profiles["mine"]
    assert mine.description == "from cwd" and mine.vae_tiling is True
    assert mine.sources == (str(SHIPPED), str(cwd), str(xdg))


def test_a_child_sees_its_parent_as_every_file_leaves_it(run_in_tmp, tmp_path_factory):
    write(run_in_tmp / "framepack.toml", '[profiles.mine]\ninherits = "cpu"\n')
    extra = write(tmp_path_factory.mktemp("cfg") / "extra.toml", '[profiles.cpu]\ndescription = "changed later"\n')
    profiles = load_profiles(extra_files=[extra])
    assert profiles.profiles["mine"].description == "changed later"
    assert str(extra) in profiles.profiles["mine"].sources


@pytest.mark.parametrize(
    "text, cycle",
    [
        ('[profiles.a]\ninherits = "b"\n[profiles.b]\ninherits = "a"\n', "a -> b -> a"),
        ('[profiles.a]\ninherits = "b"\n[profiles.b]\ninherits = "c"\n[profiles.c]\ninherits = "b"\n', "b -> c -> b"),
        ('[profiles.a]\ninherits = "a"\n', "a -> a"),
    ],
)
def test_an_inheritance_cycle_is_named(run_in_tmp, text, cycle):
    path = write(run_in_tmp / "framepack.toml", text)
    with pytest.raises(ConfigError) as exc:
        load_profiles()
    message = str(exc.value)
    assert "cycle" in message and cycle in message and str(path) in message
    assert len(message.splitlines()) == 1


def test_inheriting_an_unknown_profile_defined_nowhere_names_the_later_ones_too(run_in_tmp):
    path = write(run_in_tmp / "framepack.toml", '[profiles.mine]\ninherits = "lokal"\n[profiles.local]\ninherits = "cpu"\n')
    with pytest.raises(ConfigError) as exc:
        load_profiles()
    message = str(exc.value)
    assert str(path) in message and "[profiles.mine]" in message and "'lokal'" in message
    assert "local" in message.split("known", 1)[1]


def test_inherits_still_only_works_where_a_profile_is_first_defined(run_in_tmp):
    path = write(run_in_tmp / "framepack.toml", '[profiles.cpu]\ninherits = "cuda-24gb"\n')
    with pytest.raises(ConfigError) as exc:
        load_profiles()
    message = str(exc.value)
    assert str(path) in message and "first defined" in message and str(SHIPPED) in message


# --------------------------------------------------------------------------- simulated hardware numbers


@pytest.mark.parametrize(
    "env, key, shown",
    [
        ('{"device": "cuda", "vram_total_gb": -24}', "vram_total_gb", "-24"),
        ('{"device": "cuda", "vram_total_gb": 24, "vram_free_gb": -1.5}', "vram_free_gb", "-1.5"),
        ('{"device": "cpu", "ram_total_gb": -32}', "ram_total_gb", "-32"),
        ('{"device": "cpu", "ram_available_gb": -0.5}', "ram_available_gb", "-0.5"),
        ('{"device": "cuda", "vram_total_gb": NaN}', "vram_total_gb", "nan"),
        ('{"device": "cuda", "vram_total_gb": Infinity}', "vram_total_gb", "inf"),
        ('{"device": "mps", "vram_total_gb": 36, "ram_total_gb": -Infinity}', "ram_total_gb", "-inf"),
    ],
)
def test_simulated_hardware_refuses_negative_and_non_finite_sizes(monkeypatch, capsys, env, key, shown):
    monkeypatch.setenv("FRAMEPACK_HARDWARE", env)
    assert main(["profiles"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("framepack: error: FRAMEPACK_HARDWARE:")
    assert f"'{key}'" in line and shown in line and "GB" in line


def test_simulated_hardware_accepts_zero_and_integer_sizes(monkeypatch):
    monkeypatch.setenv("FRAMEPACK_HARDWARE", '{"device": "cpu", "ram_total_gb": 16, "ram_available_gb": 0}')
    hw = detect_hardware()
    assert (hw.ram_total_gb, hw.ram_available_gb, hw.simulated) == (16, 0, True)
