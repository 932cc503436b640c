"""framepack.ui.views: what the web UI shows and sends, without a browser."""

from __future__ import annotations

import pytest

from framepack.errors import UserError
from framepack.ui import views


def test_form_values_become_the_services_settings_and_back():
    form = {**views.DEFAULTS, "prompt": "[0s: a man waves] [2s: he jumps]", "seconds": 4, "seed": 7, "steps": 12,
            "size": "64x64", "cache": "teacache", "cache_threshold": 0.2, "profile": "cpu", "window": 5,
            "prompt_blend": 1}
    settings = views.settings_from_form(form)
    assert settings["prompt"] == form["prompt"] and settings["seconds"] == 4.0 and settings["seed"] == 7
    assert settings["size"] == "64x64" and "resolution" not in settings  # an exact size replaces the bucket
    assert settings["overrides"] == ["cache=teacache", "options.teacache.rel_l1_thresh=0.2"]
    assert settings["profile"] == "cpu" and settings["window"] == 5 and settings["prompt_blend"] == 1
    back = views.form_from_settings(settings)
    assert {k: back[k] for k in form} == {**form, "seconds": 4.0}


def test_defaults_and_the_automatic_profile_are_left_out():
    settings = views.settings_from_form({"prompt": "a fox", "negative_prompt": "blur"})
    assert "profile" not in settings and "overrides" not in settings and "window" not in settings
    assert "negative_prompt" not in settings  # read only with real CFG, so not sent
    assert views.settings_from_form({"prompt": "a fox", "negative_prompt": "blur", "cfg": 3})["negative_prompt"] == "blur"


@pytest.mark.parametrize("bad, words", [({"prompt": "  "}, "prompt"), ({"prompt": "x", "steps": 2.5}, "steps")])
def test_bad_form_values_are_refused_with_the_field_named(bad, words):
    with pytest.raises(UserError, match=words):
        views.settings_from_form(bad)


def test_timed_prompts_show_the_sections_they_land_on():
    text = views.prompt_sections("[0s: a] [2s: b]", 4, 9, 1)
    lines = text.splitlines()
    assert lines[0].startswith("3 section(s) of 1.20 s")
    assert lines[1:] == ["- 0.00-1.20 s: a", "- 1.20-2.40 s: a (0.50), b (0.50)", "- 2.40-3.60 s: b"]
    assert "past the end" in views.prompt_sections("[9s: late]", 2, 9)
    assert "bracket" in views.prompt_sections("[0s: unclosed", 2, 9)


def test_progress_bars_follow_the_job():
    job = {"id": "j1", "status": "running",
           "progress": {"sections": 4, "section": 1, "steps": 25, "step": 9, "eta_s": 75, "computed": 30, "skipped": 5}}
    html = views.progress_html(job)
    assert 'data-testid="section-bar" data-value="0.2500"' in html and "section 2 of 4" in html
    assert 'data-testid="step-bar" data-value="0.4000"' in html and "step 10 of 25" in html
    assert "about 1 min 15 s left" in html and "30 computed, 5 skipped" in html
    done = views.progress_html({"id": "j1", "status": "done", "progress": {"sections": 4, "steps": 25, "section": 3,
                                                                        "step": 24}})
    assert 'data-value="1.0000"' in done and "left" not in done
    assert "<script>" not in views.progress_html({"id": "<script>", "status": "failed", "error": "<b>x</b>"})


def test_the_queue_lists_running_then_queued_in_order_then_the_rest():
    jobs = [
        {"id": "d", "status": "done", "created_at": "2026-01-01T00:00:01", "settings": {"prompt": "p"}},
        {"id": "q2", "status": "queued", "priority": 0, "position": 2, "settings": {"prompt": "p"}},
        {"id": "q1", "status": "queued", "priority": 0, "position": 1, "settings": {"prompt": "p"}},
        {"id": "hi", "status": "queued", "priority": 5, "position": 9, "settings": {"prompt": "p"}},
        {"id": "r", "status": "running", "progress": {"sections": 2, "section": 1, "steps": 10, "step": 4},
         "settings": {"prompt": "p", "seconds": 2}},
        {"id": "d2", "status": "done", "created_at": 1767312000.0, "settings": {"prompt": "p"}},  # 2026-01-02
    ]
    rows = views.queue_rows(jobs)
    assert [r[0] for r in rows] == ["r", "hi", "q1", "q2", "d2", "d"]
    assert rows[0][6] == "75%" and rows[-1][6] == "100%"


def test_the_main_video_is_found_among_the_outputs():
    assert views.video_name({"outputs": ["video.partial.mp4", "video.json", "video.mp4"]}) == "video.mp4"
    assert views.video_name({"outputs": [{"name": "v.webm"}]}) == "v.webm"
    assert views.video_name({"outputs": []}) is None
