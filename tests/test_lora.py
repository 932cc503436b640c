"""LoRA: the three key layouts merged exactly (against a model folder merged by
hand), scales, several at once, fp8 weights, switching in a warm pipeline
without reloading, the record and resume, the LoRA folder, and bad files."""

from __future__ import annotations

import json
import pickle
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from framepack import Cancelled, Pipeline, UserError
from framepack.cli import main
from framepack.events import SectionEvent
from framepack.models.lora import LoraRequest, apply_loras, plan_loras, touched_bytes
from framepack.models.lora_formats import detect_format, parse_lora_arg, read_lora
from framepack.models.sources import ModelSource
from framepack.pipeline.transformer import load_transformer, transformer_weight_shapes
from tests.lora_files import diffusers_lora, hunyuan_lora, merged_model, musubi_lora, pair

# steps=2: one step does not show the transformer's weights in the latents of the tiny model.
FAST = dict(size="64x64", steps=2, seconds=1, seed=3)
BUILDERS = {"diffusers": diffusers_lora, "musubi": musubi_lora, "hunyuan": hunyuan_lora}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {name: build(root / f"{name}.safetensors") for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def pipe(tiny_model):
    with Pipeline(model=tiny_model, profile="cpu") as p:
        yield p


@pytest.fixture(scope="module")
def plain(pipe, test_image, tmp_path_factory):
    """The job without any LoRA (a fresh pipeline's first job)."""
    return pipe.generate(test_image, "a fox", output=tmp_path_factory.mktemp("plain") / "p.mp4", **FAST)


# --- naming and reading -------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("style.safetensors", ("style.safetensors", 1.0)),
    ("style.safetensors:0.8", ("style.safetensors", 0.8)),
    ("style:-1e-1", ("style", -0.1)),
    (r"C:\loras\x.safetensors", (r"C:\loras\x.safetensors", 1.0)),
    (r"C:\loras\x.safetensors:0.8", (r"C:\loras\x.safetensors", 0.8)),
    ("a:b:c.safetensors", ("a:b:c.safetensors", 1.0)),
])
def test_scale_is_split_off_the_last_colon_only_when_it_is_a_number(text, expected):
    assert parse_lora_arg(text) == expected


def test_formats_are_detected_from_the_keys(files, tmp_path):
    for name, (path, _) in files.items():
        assert read_lora(path).format == name
    path, _ = hunyuan_lora(tmp_path / "comfy.safetensors", prefix="transformer.")
    assert read_lora(path).format == "hunyuan"
    with pytest.raises(UserError, match=r"unknown LoRA format: saw foo\.weight"):
        detect_format(["foo.weight"])


def test_fused_projections_split_by_rows_of_b(files, tiny_model):
    shapes = transformer_weight_shapes(ModelSource.from_arg(str(tiny_model), "original"))
    path, updates = files["hunyuan"]
    plan = plan_loras([LoraRequest(path, 0.5)], shapes)
    assert set(plan) == set(updates)
    for name, pieces in updates.items():
        got = sum(p.factor * p.up @ p.down for p in plan[name])
        want = sum(0.5 * f * b @ a for a, b, f in pieces)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_strict_off_notes_the_unmatched_keys_and_applies_the_rest(files, tiny_model, tmp_path, capsys):
    shapes = transformer_weight_shapes(ModelSource.from_arg(str(tiny_model), "original"))
    path, updates = files["diffusers"]
    a, b = pair(32, 32, 4, 9)
    extra = {"transformer.not_a_module.lora_A.weight": a, "transformer.not_a_module.lora_B.weight": b}
    save_file({**read_all(path), **extra}, str(tmp_path / "more.safetensors"))
    with pytest.raises(UserError, match=r"2 keys match no transformer module: transformer\.not_a_module"):
        plan_loras([LoraRequest(tmp_path / "more.safetensors", 1.0)], shapes)
    plan = plan_loras([LoraRequest(tmp_path / "more.safetensors", 1.0)], shapes, strict=False)
    assert set(plan) == set(updates) and "--lora-strict off" in capsys.readouterr().err


def read_all(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# --- merging on the model itself --------------------------------------------------------


@pytest.mark.parametrize("quantize, dtype, keep", [("none", torch.float32, True), ("fp8", torch.bfloat16, True),
                                                   ("none", torch.bfloat16, False)])
def test_merge_and_restore_on_each_weight_format(files, tiny_model, quantize, dtype, keep):
    """The merged weight is the checkpoint's weight plus the update, rounded as the
    loader rounds (compute dtype, then fp8); switching back restores the loaded
    weights bit for bit, and the kept copies go with it. Without kept copies (a
    one-job model) the originals come from the checkpoint again."""
    from framepack_plugins.attention.sdpa import sdpa_kernel

    source = ModelSource.from_arg(str(tiny_model), "original")
    model = load_transformer(source, dtype, sdpa_kernel, quantize)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    path, updates = files["hunyuan"]
    requests = [LoraRequest(path, 0.7)]
    apply_loras(model, requests, plan_loras(requests, transformer_weight_shapes(source)), keep_originals=keep)
    params = dict(model.named_parameters())
    assert (touched_bytes(model) > 0) == keep
    for name, pieces in updates.items():
        # The engine's fused product (addmm), so the rounding path is checked bit for bit:
        # checkpoint tensor -> float32 merge -> compute dtype -> storage (fp8).
        want = read_all(tiny_model / "transformer" / "diffusion_pytorch_model.safetensors")[name].float()
        for a, b, f in pieces:
            want = want.addmm(b, a, alpha=0.7 * f)
        want = want.to(dtype).to(params[name].dtype)
        assert torch.equal(params[name].detach().view(torch.uint8), want.view(torch.uint8)), name
    apply_loras(model, [], {})
    assert all(torch.equal(p.detach().view(torch.uint8), before[n].view(torch.uint8))
               for n, p in model.named_parameters())
    assert touched_bytes(model) == 0


# --- whole jobs against a model folder merged by hand -------------------------------------


@pytest.mark.parametrize("fmt", sorted(BUILDERS))
def test_each_format_equals_the_hand_merged_model(fmt, files, pipe, plain, tiny_model, test_image, tmp_path):
    path, updates = files[fmt]
    got = pipe.generate(test_image, "a fox", output=tmp_path / "lora.mp4", loras=[(path, 0.7)], **FAST)
    reference = merged_model(tiny_model, tmp_path / "merged", (updates, 0.7))
    want = pipe.generate(test_image, "a fox", output=tmp_path / "ref.mp4", model=str(reference), **FAST)
    assert rel(got.latents, want.latents) < 1e-6
    assert rel(got.latents, plain.latents) > 1e-2  # the LoRA does change the video


def test_scale_zero_is_bit_identical_and_two_loras_add_up(files, pipe, plain, tiny_model, test_image, tmp_path):
    (d, d_updates), (m, m_updates) = files["diffusers"], files["musubi"]
    zero = pipe.generate(test_image, "a fox", output=tmp_path / "zero.mp4", loras=[(d, 0.0)], **FAST)
    assert torch.equal(zero.latents, plain.latents)
    both = pipe.generate(test_image, "a fox", output=tmp_path / "both.mp4", loras=[f"{d}:0.5", (m, -0.3)], **FAST)
    reference = merged_model(tiny_model, tmp_path / "merged", (d_updates, 0.5), (m_updates, -0.3))
    want = pipe.generate(test_image, "a fox", output=tmp_path / "ref.mp4", model=str(reference), **FAST)
    assert rel(both.latents, want.latents) < 1e-6


def test_a_lora_on_fp8_weights_differs_from_bf16_only_by_the_fp8_error(files, tiny_model, test_image, tmp_path):
    """fp8 + LoRA is the LoRA merged before the cast: the hand-merged folder loaded as
    fp8, and off bf16 + LoRA by the fp8 error only."""
    path, updates = files["hunyuan"]
    bf16, fp8 = ["dtype.transformer=bfloat16"], ["dtype.transformer=bfloat16", "quantize.transformer=fp8"]
    reference = merged_model(tiny_model, tmp_path / "merged", (updates, 0.7))
    with Pipeline(model=tiny_model, profile="cpu") as p:
        base = p.generate(test_image, "a fox", output=tmp_path / "a.mp4", overrides=bf16, loras=[(path, 0.7)], **FAST)
        got = p.generate(test_image, "a fox", output=tmp_path / "b.mp4", overrides=fp8, loras=[(path, 0.7)], **FAST)
        plain = p.generate(test_image, "a fox", output=tmp_path / "c.mp4", overrides=fp8, **FAST)
        want = p.generate(test_image, "a fox", output=tmp_path / "d.mp4", overrides=fp8, model=str(reference), **FAST)
    fp8_error = rel(got.latents, base.latents)
    assert 0 < fp8_error < 5e-2  # float8 e4m3 keeps ~3 significant bits
    # Merged, then cast, as the hand-merged folder: bit-identical here; the bound leaves room
    # for another CPU's float32 rounding of the product (rounding W to bf16 before the
    # merge, a double rounding, measured 0.4 %: over it).
    assert rel(got.latents, want.latents) < fp8_error / 10
    assert rel(got.latents, plain.latents) > 10 * fp8_error  # the LoRA is there, not lost in the cast
    assert "transformer" not in plain.loaded  # switched off in place on fp8 weights


def test_switching_in_a_warm_pipeline_restores_exactly_without_reloading(files, pipe, plain, tiny_model, test_image,
                                                                          tmp_path):
    (x, _), (y, _) = files["hunyuan"], files["musubi"]
    with Pipeline(model=tiny_model, profile="cpu") as warm:
        a = warm.generate(test_image, "a fox", output=tmp_path / "a.mp4", loras=[(x, 1.0)], **FAST)
        b = warm.generate(test_image, "a fox", output=tmp_path / "b.mp4", loras=[(y, 0.9)], **FAST)
        c = warm.generate(test_image, "a fox", output=tmp_path / "c.mp4", **FAST)
    assert "transformer" in a.loaded and "transformer" not in b.loaded and "transformer" not in c.loaded
    assert torch.equal(c.latents, plain.latents)  # plain: a fresh pipeline's job without LoRA
    fresh_y = pipe.generate(test_image, "a fox", output=tmp_path / "y.mp4", loras=[(y, 0.9)], **FAST)
    assert torch.equal(b.latents, fresh_y.latents)  # x is gone before y goes in


def test_the_memory_plan_counts_the_kept_copies_of_a_warm_transformer(files, tiny_model, test_image, tmp_path,
                                                                      monkeypatch):
    """The pre-merge copies a warm transformer keeps are in the job's RAM plan, at
    the size they really take; a one-shot job keeps none and plans none."""
    import framepack.pipeline.generate as generate
    from framepack_plugins.attention.sdpa import sdpa_kernel
    from framepack.pipeline.loras import prepare_job_loras
    from framepack.pipeline.settings import JobSettings

    path, _ = files["musubi"]
    source = ModelSource.from_arg(str(tiny_model), "original")
    job = prepare_job_loras(JobSettings(image=test_image, prompt="a", output=tmp_path / "x.mp4",
                                        loras=((str(path), 0.8),)), source)
    model = load_transformer(source, torch.float32, sdpa_kernel, "none")
    apply_loras(model, job.requests, job.plan, keep_originals=True)
    assert job.kept_bytes(source) == touched_bytes(model) > 0

    planned = []
    real = generate.plan_job
    monkeypatch.setattr(generate, "plan_job", lambda *a, **k: planned.append(k.get("kept_ram_bytes")) or real(*a, **k))
    with Pipeline(model=tiny_model, profile="cpu") as warm:  # keeps the transformer here
        warm.generate(test_image, "a fox", output=tmp_path / "a.mp4", loras=[(path, 0.8)], **FAST)
    with Pipeline(model=tiny_model, profile="cpu", keep_loaded="none") as one_shot:
        one_shot.generate(test_image, "a fox", output=tmp_path / "b.mp4", loras=[(path, 0.8)], **FAST)
    assert planned == [touched_bytes(model), 0]


def test_switching_under_an_offload_policy_that_hooks_the_weights(files, pipe, plain, tiny_model, test_image, tmp_path):
    """sequential = diffusers' group offloading (hooks on every leaf): on CPU the weights
    stay where they are, but the merge and the restore go through the same hooks."""
    x, _ = files["musubi"]
    with Pipeline(model=tiny_model, profile="cpu", overrides=["offload=sequential"]) as offloaded:
        a = offloaded.generate(test_image, "a fox", output=tmp_path / "a.mp4", loras=[(x, 0.5)], **FAST)
        c = offloaded.generate(test_image, "a fox", output=tmp_path / "c.mp4", **FAST)
    resident = pipe.generate(test_image, "a fox", output=tmp_path / "r.mp4", loras=[(x, 0.5)], **FAST)
    assert torch.equal(a.latents, resident.latents) and torch.equal(c.latents, plain.latents)
    assert "transformer" not in c.loaded


# --- the record, --from, resume, profiles, the folder -------------------------------------


def test_record_names_each_lora_and_from_reapplies_them(files, pipe, test_image, tmp_path, capsys):
    from framepack.models.lora import sha256_of

    path, _ = files["musubi"]
    first = pipe.generate(test_image, "a fox", output=tmp_path / "a.mp4", loras=[(path, 0.6)], **FAST)
    record = json.loads((tmp_path / "a.json").read_text())
    assert record["inputs"]["loras"] == [{"file": path.name, "path": str(path.resolve()), "sha256": sha256_of(path),
                                          "scale": 0.6}]
    assert main(["info", str(tmp_path / "a.json")]) == 0
    assert f"  lora: musubi.safetensors at 0.6, sha256 {sha256_of(path)}" in capsys.readouterr().out
    again = pipe.generate(from_=tmp_path / "a.json", output=tmp_path / "b.mp4")
    assert again.settings.loras == ((str(path.resolve()), 0.6),) and torch.equal(again.latents, first.latents)


def test_resume_refuses_a_lora_file_that_changed(tiny_model, test_image, tmp_path):
    path, _ = diffusers_lora(tmp_path / "style.safetensors")
    job = dict(size="64x64", steps=1, seconds=2.4, variant="f1", seed=3, overrides=['writers=["png"]'])
    with Pipeline(model=tiny_model, profile="cpu") as p:
        cancel = threading.Event()

        def stop_after_first(event):
            if isinstance(event, SectionEvent) and event.phase == "end" and event.index == 0:
                cancel.set()

        with pytest.raises(Cancelled) as stopped:
            p.generate(test_image, "a fox", output=tmp_path / "cut", cancel=cancel, on_event=stop_after_first,
                       loras=[(path, 1.0)], **job)
        diffusers_lora(path, seed=7)  # retrained under the same name
        with pytest.raises(UserError, match=r"^LoRA style\.safetensors changed since this job started \(sha256 "):
            p.resume(stopped.value.job_dir)


def test_resume_refuses_another_set_of_loras():
    """Say the profile's ``loras`` changed after the job started: not the same video."""
    from framepack.pipeline.loras import check_loras_unchanged

    style = {"file": "style.safetensors", "path": "/l/style.safetensors", "sha256": "ab" * 32, "scale": 0.8}
    check_loras_unchanged({"inputs": {"loras": [style]}}, {"inputs": {"loras": [dict(style)]}})
    with pytest.raises(UserError, match=r"other LoRAs than it started with \(none -> style\.safetensors:0\.8\)"):
        check_loras_unchanged({"inputs": {}}, {"inputs": {"loras": [style]}})
    with pytest.raises(UserError, match=r"\(style\.safetensors:0\.8 -> style\.safetensors:0\.5\)"):
        check_loras_unchanged({"inputs": {"loras": [style]}}, {"inputs": {"loras": [{**style, "scale": 0.5}]}})


def test_profile_loras_and_bare_names_in_the_lora_folder(files, pipe, test_image, tmp_path, monkeypatch, capsys):
    import shutil

    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(files["musubi"][0], folder / "style.safetensors")
    shutil.copy(files["diffusers"][0], folder / "other.safetensors")
    (folder / "old.pt").write_bytes(pickle.dumps({"a": 1}))
    monkeypatch.setenv("FRAMEPACK_LORA_DIR", str(folder))
    config = tmp_path / "loras.toml"
    config.write_text('[profiles.cpu-style]\ninherits = "cpu"\nloras = [{ path = "style", scale = 0.6 }]\n')
    with Pipeline(model=pipe.model, profile="cpu-style", config_files=[config]) as p:
        result = p.generate(test_image, "a fox", output=tmp_path / "a.mp4", **FAST)
    assert result.settings.loras == ((str((folder / "style.safetensors").resolve()), 0.6),)
    explicit = pipe.generate(test_image, "a fox", output=tmp_path / "b.mp4", loras=[(files["musubi"][0], 0.6)], **FAST)
    assert torch.equal(result.latents, explicit.latents)

    assert main(["loras", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    rows = {row["file"]: row for row in listing["loras"]}
    assert listing["folder"] == str(folder)
    assert rows["style.safetensors"]["format"] == "musubi" and rows["style.safetensors"]["ranks"] == [8]
    assert rows["style.safetensors"]["modules"] == 5 and rows["other.safetensors"]["modules"] == 4
    assert rows["style.safetensors"]["size_mb"] > 0 and "pickle" in rows["old.pt"]["error"]


# --- bad input: exit 2, one line -----------------------------------------------------------


def _bad_files(root: Path, files) -> dict[str, tuple[Path, str]]:
    root.mkdir()
    pt = root / "style.pt"
    pt.write_bytes(pickle.dumps({"lora": [1, 2, 3]}))
    disguised = root / "disguised.safetensors"
    disguised.write_bytes(pickle.dumps({"lora": [1, 2, 3]}))
    unknown = root / "unknown.safetensors"
    save_file({"foo.weight": torch.zeros(2, 2), "bar.bias": torch.zeros(2)}, str(unknown))
    unmatched = root / "unmatched.safetensors"
    tensors = {f"transformer.blocks.{i}.attn.q.lora_{x}.weight": torch.zeros(4, 4) for i in range(7) for x in "AB"}
    save_file(tensors, str(unmatched))
    shapes = root / "shapes.safetensors"
    a, b = pair(32, 48, 4, 0)
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a,
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": b}, str(shapes))
    return {
        "pickle": (pt, r"LoRA style\.pt: a \.pt file is a pickle; framepack reads LoRAs only from \.safetensors, "
                       r"because loading a pickle can run code"),
        "disguised pickle": (disguised, r"disguised\.safetensors: this is a pickle or torch zip file"),
        "unknown format": (unknown, r"unknown LoRA format: saw bar\.bias, foo\.weight; expected diffusers/PEFT"),
        "unmatched keys": (unmatched, r"unmatched\.safetensors \(diffusers\): 14 keys match no transformer module: "
                                      r"transformer\.blocks\.0\.attn\.q\.lora_A\.weight, .* \.\.\.; is it a LoRA for another"),
        "wrong shapes": (shapes, r"shapes\.safetensors: transformer\.transformer_blocks\.0\.attn\.to_q\.lora_A\.weight "
                                 r"gives a \(32, 48\) update but the transformer's transformer_blocks\.0\.attn\.to_q\.weight "
                                 r"is \(32, 32\)"),
        "missing file": (root / "nope.safetensors", r"--lora .*nope\.safetensors: no such file"),
    }


def test_bad_loras_exit_2_with_one_line_each(files, tiny_model, test_image, tmp_path, capsys):
    import re

    base = ["generate", "--image", str(test_image), "--prompt", "a fox", "--model", str(tiny_model), "--profile", "cpu",
            "--size", "64x64", "--steps", "1", "--seconds", "1", "--quiet"]
    for case, (path, message) in _bad_files(tmp_path / "bad", files).items():
        code = main(base + ["--output", str(tmp_path / f"{case}.mp4"), "--lora", f"{path}:0.5"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, (case, err)
        assert err[0].startswith("framepack: error: ") and re.search(message, err[0]), (case, err[0])
        assert not (tmp_path / f"{case}.mp4").exists() and not (tmp_path / f"{case}.mp4.job").exists()


def test_nf4_weights_are_requantized_from_the_merged_original(tmp_path):
    """NF4 (bitsandbytes, which quantizes on CPU too): the merged weight is quantized
    as a fresh load of the merged checkpoint would be; switching back gives the
    loaded quantization bit for bit. (The NF4 transformer itself needs CUDA.)"""
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit

    from framepack.models.lora import WeightOrigin
    from framepack.models.lora_formats import Piece

    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    model = torch.nn.Sequential(bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4"))
    model[0].weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4").to("cpu")
    (tmp_path / "m").mkdir()
    save_file({"0.weight": w}, str(tmp_path / "m" / "diffusion_pytorch_model.safetensors"))
    model._framepack_weights = WeightOrigin(str(tmp_path), "m", torch.float32)
    packed, absmax = model[0].weight.data.clone(), model[0].weight.quant_state.absmax.clone()
    a, b = pair(64, 64, 4, 1)
    (tmp_path / "x.safetensors").write_bytes(b"stands in for the LoRA file (its key)")
    requests = [LoraRequest(tmp_path / "x.safetensors", 0.5)]
    apply_loras(model, requests, {"0.weight": [Piece(a, b, 0.5 * 0.25, "k")]})
    fresh = bnb.nn.Params4bit(w + 0.5 * 0.25 * (b @ a), requires_grad=False, quant_type="nf4").to("cpu")
    param = model[0].weight
    assert torch.equal(param.data, fresh.data) and torch.equal(param.quant_state.absmax, fresh.quant_state.absmax)
    assert torch.equal(dequantize_4bit(param.data, param.quant_state), dequantize_4bit(fresh.data, fresh.quant_state))
    model(torch.randn(2, 64))  # the layer runs on the new quantization state
    apply_loras(model, [], {})
    assert torch.equal(model[0].weight.data, packed) and torch.equal(model[0].weight.quant_state.absmax, absmax)


def test_the_benchmark_runs_on_the_tiny_model(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "lora.json"
    bench = Path(__file__).parent.parent / "benchmarks" / "lora_bench.py"
    subprocess.run([sys.executable, str(bench), "--skip-wide", "--json", str(out)], check=True, capture_output=True,
                   timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["quantize"], r["dtype"]) for r in rows] == [("none", "float32"), ("none", "bfloat16"), ("fp8", "bfloat16")]
    for row in rows:
        assert row["kept_originals_mb"] > 0 and set(row["switch_s"]) == {"first_A", "A_to_B", "B_to_none", "none_to_A"}
