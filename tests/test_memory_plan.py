"""framepack.pipeline.memory_plan: a job's plan before anything loads (what the web UI shows)."""

from __future__ import annotations

from framepack.engine.planning import estimate, count_params, vae_geometry
from framepack.hardware import HardwareInfo
from framepack.models.sources import ModelSource
from framepack.pipeline.memory_plan import plan_for


def test_the_tiny_model_fits_and_the_plan_is_the_jobs(tiny_model):
    view = plan_for(model=str(tiny_model), seconds=2, size=(64, 64), profile="cpu")
    assert view.fits and "fits this machine" in view.message
    assert (view.profile, view.height, view.width, view.sections) == ("cpu", 64, 64, 2)
    assert view.why == "chosen with --profile cpu"
    # The same numbers the job's own plan starts from.
    from framepack.engine.assemble import assemble

    engine = assemble("cpu")
    source = ModelSource.from_arg(str(tiny_model), "original")
    same = estimate(engine.profile, engine.choices["offload"].name, count_params(source), 64, 64, view.frames, 9,
                    True, "cpu", vae_geometry(source))
    assert view.ram_gb == same.ram_gb


def test_the_full_model_on_a_small_machine_says_what_does_not_fit():
    small = HardwareInfo(device="cuda", gpu_name="Laptop GPU", compute_capability=(8, 6), vram_total_gb=6.0,
                         vram_free_gb=5.5, ram_total_gb=8.0, ram_available_gb=6.0)
    view = plan_for(seconds=5, image_size=(480, 640), hardware=small)
    assert not view.fits
    assert "system RAM" in view.message and "8.0 GB" in view.message
    assert (view.height, view.width) != (640, 640)  # the image's bucket, not the square one


def test_an_image_picks_its_bucket_and_the_automatic_profile_says_why(tiny_model):
    view = plan_for(model=str(tiny_model), seconds=1, image_size=(480, 640), resolution=640)
    assert view.height < view.width
    assert view.why.startswith("matches this machine")


def test_an_extension_plans_for_its_video_size_its_frames_and_the_decoded_head(tiny_model, tmp_path):
    from framepack.engine.assemble import assemble
    from framepack.pipeline.buckets import nearest_bucket
    from tests.jobs import write_plain_video

    video = write_plain_video(tmp_path / "clip.mp4", 45, size=(48, 96))
    view = plan_for(model=str(tiny_model), seconds=1.2, window=3, resolution=640, extend=video, profile="cpu",
                    image_size=(640, 640))  # a stale image size does not count: the video's does
    assert (view.height, view.width) == nearest_bucket(48, 96, 640) and view.height < view.width
    assert view.frames == 45 + 4 * 3 * view.sections
    engine = assemble("cpu")
    source = ModelSource.from_arg(str(tiny_model), "original")
    args = (engine.profile, engine.choices["offload"].name, count_params(source), view.height, view.width,
            view.frames, 3, True, "cpu", vae_geometry(source))
    assert view.ram_gb == estimate(*args, head=3).ram_gb
    assert view.ram_gb > estimate(*args).ram_gb  # the inverted model's last decode holds the input's latents too
