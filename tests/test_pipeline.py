"""framepack.Pipeline: many jobs in one process, warm models, cancellation and
resume, and a pipeline that stays usable after a failed job."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

from framepack import Cancelled, Pipeline, UserError
from framepack.events import SectionEvent
from tests.jobs import frames_of

FAST = dict(size="64x64", steps=1, seconds=1, seed=3)
ALL_PARTS = ["image_encoder", "text_encoder", "text_encoder_2", "transformer", "vae"]


@pytest.fixture
def pipe(tiny_model):
    with Pipeline(model=tiny_model, profile="cpu") as p:
        yield p


def test_warm_jobs_load_nothing_and_repeat_bit_identically(pipe, test_image, tmp_path):
    r1 = pipe.generate(test_image, "a fox", output=tmp_path / "a.mp4", **FAST)
    r2 = pipe.generate(test_image, "a fox", output=tmp_path / "b.mp4", **FAST)
    r3 = pipe.generate(test_image, "a fox", output=tmp_path / "c.mp4", **{**FAST, "seed": 4})
    assert sorted(r1.loaded) == ALL_PARTS
    assert r2.loaded == [] and r3.loaded == []
    assert torch.equal(r1.latents, r2.latents) and not torch.equal(r1.latents, r3.latents)
    assert set(r1.stage_s) == {"load", "encode", "sample", "decode", "write"} and r1.stage_s["load"] > 0
    assert r2.stage_s["load"] < 0.01 < r1.stage_s["load"] and r2.peak_ram_gb > 0
    assert (tmp_path / "b.mp4").exists() and r2.settings.output == tmp_path / "b.mp4"


def test_a_profile_that_releases_the_text_encoder_reloads_only_it(tiny_model, test_image, tmp_path):
    with Pipeline(model=tiny_model, profile="cpu", keep_loaded=["vision", "vae", "transformer"]) as pipe:
        first = pipe.generate(test_image, "a fox", output=tmp_path / "a.mp4", **FAST)
        same = pipe.generate(test_image, "a fox", output=tmp_path / "b.mp4", **FAST)
        new = pipe.generate(test_image, "a hare", output=tmp_path / "c.mp4", **FAST)
    assert sorted(first.loaded) == ALL_PARTS
    assert same.loaded == []  # the prompt cache holds it
    assert sorted(new.loaded) == ["text_encoder", "text_encoder_2"]


def test_another_variant_or_profile_reloads_only_what_differs(pipe, test_image, tmp_path):
    pipe.generate(test_image, "a fox", output=tmp_path / "a.mp4", **FAST)
    # A local folder holds one transformer: the other variant reads the same files.
    f1 = pipe.generate(test_image, "a fox", output=tmp_path / "b.mp4", variant="f1", **FAST)
    assert f1.loaded == []
    vae16 = pipe.generate(test_image, "a fox", output=tmp_path / "c.mp4", overrides=["dtype.vae=bfloat16"], **FAST)
    assert vae16.loaded == ["vae"]


def test_settings_are_checked_with_the_cli_messages(pipe, test_image, tmp_path):
    with pytest.raises(UserError, match=r"--seconds -1\.0: must be a positive number"):
        pipe.generate(test_image, "a fox", output=tmp_path / "a.mp4", seconds=-1)
    with pytest.raises(UserError, match="unknown setting"):
        pipe.generate(test_image, "a fox", output=tmp_path / "a.mp4", sconds=1)
    with pytest.raises(UserError, match="image not found"):
        pipe.generate(tmp_path / "missing.png", "a fox", output=tmp_path / "a.mp4")


def test_a_failing_job_leaves_the_pipeline_usable(pipe, test_image, tmp_path):
    def explode(event):
        if isinstance(event, SectionEvent) and event.phase == "end":
            raise RuntimeError("listener broke")

    with pytest.raises(RuntimeError, match="listener broke"):
        pipe.generate(test_image, "a fox", output=tmp_path / "bad.mp4", on_event=explode, **FAST)
    good = pipe.generate(test_image, "a fox", output=tmp_path / "good.mp4", **FAST)
    with Pipeline(model=pipe.model, profile="cpu") as fresh:
        alone = fresh.generate(test_image, "a fox", output=tmp_path / "alone.mp4", **FAST)
    assert torch.equal(good.latents, alone.latents)
    assert not (tmp_path / "bad.mp4").exists()


@pytest.mark.parametrize("variant, seconds, k", [("original", 3.6, 0), ("original", 3.6, 1), ("f1", 2.4, 0),
                                                 ("f1", 3.6, 1)])
def test_cancel_then_resume_is_bit_identical(variant, seconds, k, tiny_model, test_image, tmp_path):
    job = dict(size="64x64", steps=2, seconds=seconds, variant=variant, overrides=['writers=["png"]'])
    with Pipeline(model=tiny_model, profile="cpu") as pipe:
        whole = pipe.generate(test_image, "a wave", output=tmp_path / "whole", **job)
        cancel = threading.Event()

        def stop_after_k(event):
            if isinstance(event, SectionEvent) and event.phase == "end" and event.index == k:
                cancel.set()

        with pytest.raises(Cancelled) as stopped:
            pipe.generate(test_image, "a wave", output=tmp_path / "cut", cancel=cancel, on_event=stop_after_k, **job)
        assert stopped.value.job_dir == (tmp_path / "cut.job")
        assert not (tmp_path / "cut").exists()
        resumed = pipe.resume(stopped.value.job_dir)
        assert torch.equal(resumed.latents, whole.latents)
        np.testing.assert_array_equal(frames_of(tmp_path / "cut"), frames_of(tmp_path / "whole"))
        after = pipe.generate(test_image, "a wave", output=tmp_path / "after", **job)
        assert torch.equal(after.latents, whole.latents)


def test_close_gives_the_memory_back(tiny_model, test_image, tmp_path):
    # A fresh process: the libraries are imported and warmed first, so what
    # the measurement sees is the pipeline's own memory.
    script = textwrap.dedent(f"""
        import gc, json, sys
        from framepack import Pipeline
        from framepack.hardware import PeakMemory
        from framepack.models.heap import release_free_heap
        import framepack.pipeline.generate, diffusers, transformers
        def rss():
            gc.collect(); release_free_heap(); return PeakMemory.rss_bytes()
        with Pipeline(model={str(tiny_model)!r}, profile="cpu", keep_loaded="none") as warmup:
            warmup.generate({str(test_image)!r}, "a fox", output={str(tmp_path / "w.mp4")!r}, size="64x64",
                            steps=1, seconds=1)
        before = rss()
        pipe = Pipeline(model={str(tiny_model)!r}, profile="cpu")
        for i in range(2):
            pipe.generate({str(test_image)!r}, "a fox", output={str(tmp_path)!r} + f"/{{i}}.mp4",
                          size="64x64", steps=1, seconds=1)
        held = rss()
        pipe.close()
        print(json.dumps({{"before": before, "held": held, "after": rss()}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    import json

    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["held"] > m["before"]  # the models were really held
    assert m["after"] <= 1.05 * m["before"], m


def test_from_keeps_the_recorded_overrides_and_window_sets_the_section_length(tiny_model, test_image, run_in_tmp):
    import json

    from framepack.cli import main

    base = ["generate", "--model", str(tiny_model), "--size", "64x64", "--steps", "1", "--profile", "cpu",
            "--quiet"]
    assert main(base + ["--image", str(test_image), "--prompt", "a fox", "--seconds", "1", "--window", "5",
                        "--output", "a.mp4", "--set", 'writers=["mp4", "png"]']) == 0
    record = json.loads((run_in_tmp / "a.json").read_text())
    # FramePack's rules at window 5: round(1 s * 30 / 20) = 2 sections (banker's), 4*5*2 + 1 frames.
    assert record["extra"]["sections"] == 2 and record["extra"]["frames"] == 41
    assert len(frames_of(run_in_tmp / "a")) == 41
    assert main(base + ["--from", "a.json", "--output", "b.mp4", "--seed", "9"]) == 0
    again = json.loads((run_in_tmp / "b.json").read_text())
    assert (run_in_tmp / "b").is_dir()  # the png writer came back from the recorded --set
    assert again["extra"]["overrides"] == ['writers=["mp4", "png"]']
    assert again["settings"]["latent_window_size"] == 5 and again["settings"]["seed"] == 9


def test_memory_does_not_creep_across_jobs(pipe, test_image, tmp_path):
    # A generous bound on what benchmarks/repeat_bench.py measures (job 6 within 1 % of job 2 there).
    peaks = [pipe.generate(test_image, "a fox" if i % 2 else "a hare", output=tmp_path / f"{i}.mp4", **FAST).peak_ram_gb
             for i in range(4)]
    assert peaks[3] <= 1.15 * peaks[1], peaks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: measures torch.cuda.memory_allocated()")
def test_close_gives_the_cuda_memory_back(tiny_model, test_image, tmp_path):
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    pipe = Pipeline(model=tiny_model)  # the profile this CUDA machine matches
    for i in range(2):
        pipe.generate(test_image, "a fox", output=tmp_path / f"{i}.mp4", **FAST)
    held = torch.cuda.memory_allocated()
    pipe.close()
    torch.cuda.synchronize()
    assert held > start  # the models were really on the device
    assert torch.cuda.memory_allocated() == start


def test_partial_video_after_every_section(pipe, test_image, tmp_path):
    """partial_video=True: after each finished section the video so far is playable
    beside the output (what a UI shows), and it is gone once the job completes."""
    import av

    output = tmp_path / "p.mp4"
    partial = tmp_path / "p.partial.mp4"
    seen = []

    def on_event(event):
        if isinstance(event, SectionEvent) and event.phase == "end":
            if not partial.exists():  # the first section's frames wait for the next one's cross-fade
                seen.append(0)
                return
            with av.open(str(partial)) as container:
                seen.append(sum(1 for _ in container.decode(video=0)))

    result = pipe.generate(test_image, "a fox", output=output, on_event=on_event, partial_video=True,
                           **{**FAST, "seconds": 3.6})
    assert result.sections == 3 and len(seen) == 3
    assert 0 < seen[1] < seen[2] < result.frames
    assert output.exists() and not partial.exists()
