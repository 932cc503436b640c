"""The web UI in a real browser: Debian's Chromium driven by Playwright, against
a real `framepack serve` (one worker) on the tiny model.

Screenshots of each step go to FRAMEPACK_UI_SHOTS (default: the test's tmp
folder); docs/img/ holds a few of them for docs/ui.md."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.jobs import write_plain_video
from tests.service_helpers import TOKEN, Server, wait_status

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)"),
]
playwright_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("FRAMEPACK_UI_SHOTS") or tmp_path_factory.mktemp("ui-shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("ui-service")
    srv = Server(f"sqlite:///{root / 'queue.sqlite3'}", root / "storage", "--model", str(tiny_model),
                 "--workers", "1", ui=True).start(timeout=120)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    yield pg
    context.close()


def _set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")
    box.blur()  # Gradio takes a slider's typed value on change/blur
    playwright_api.expect(box).to_have_value(str(value))


def _open(page, accordion: str, inside: str) -> None:
    """Opens the accordion #accordion and waits until `inside` is there (Gradio
    renders a closed accordion's children only once it opens). A click that
    lands before the page has wired its handlers does nothing, as seen once on
    a loaded 2-core CI machine, so it clicks until the button says open."""
    button = page.locator(f"#{accordion} > button.label-wrap").first
    for _ in range(10):
        if "open" in (button.get_attribute("class") or "").split():
            break
        button.click()
        time.sleep(0.5)
    else:
        raise AssertionError(f"the {accordion!r} accordion did not open after 10 clicks")
    page.locator(inside).first.wait_for(state="attached")


def _fill_job(page, image: Path | None, prompt: str, seconds: float, steps: int, window: int = 3) -> None:
    if image is not None:
        page.locator("#start-image input[type=file]").set_input_files(str(image))
    page.locator("#prompt textarea").fill(prompt)
    _set_number(page, "seconds", seconds)
    _open(page, "sampling-box", "#steps input[type=number]")  # steps, window and size
    _set_number(page, "steps", steps)
    _set_number(page, "window-slider", window)
    page.locator("#size textarea, #size input").first.fill("64x64")


def _status(page) -> str | None:
    return page.locator("#progress [data-testid=progress]").get_attribute("data-status")


def _wait_status(page, statuses, timeout_s: float = 300) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = _status(page)
        if status in statuses:
            return status
        time.sleep(0.25)
    raise AssertionError(f"the page still shows {_status(page)!r} after {timeout_s} s")


def _job_id(page) -> str:
    text = page.locator("#progress .fp-progress-head").inner_text()
    return text.split(":")[0].removeprefix("Job ").strip()


def test_generate_stop_resume_queue_and_load_settings(server, page, test_image, shots):
    page.goto(server.url + "/")
    page.locator("#prompt textarea").wait_for()
    page.screenshot(path=str(shots / "01-open.png"), full_page=True)

    _fill_job(page, test_image, "[0s: a wave rolls in] [0.4s: it breaks]", seconds=1.2, steps=2)
    expect = playwright_api.expect
    expect(page.locator("#prompt-sections")).to_contain_text("3 section(s)", timeout=60_000)
    expect(page.locator("#prompt-sections")).to_contain_text("0.40-0.80 s: it breaks")
    expect(page.locator("#memory-plan")).to_contain_text("64x64, 3 sections", timeout=60_000)
    expect(page.locator("#memory-plan")).to_contain_text("fits this machine")
    page.locator("#generate-now").click()
    page.locator("#progress [data-status]").wait_for()
    first = _job_id(page)
    seen = set()
    deadline = time.monotonic() + 300
    while _status(page) != "done" and time.monotonic() < deadline:
        seen.add(page.locator("[data-testid=step-bar]").get_attribute("data-value"))
        if page.locator("#preview img").count():
            seen.add("preview")
        time.sleep(0.1)
    page.screenshot(path=str(shots / "02-done.png"), full_page=True)
    assert _status(page) == "done"
    assert len(seen - {"preview", None}) >= 2  # the step bar moved
    job = server.client().get(f"/api/jobs/{first}").json()
    frames = job["stats"]["frames"]
    video = page.locator("#video video")
    video.wait_for()
    page.wait_for_function("() => { const v = document.querySelector('#video video'); return v && v.duration > 0 }")
    duration = video.evaluate("v => v.duration")
    assert abs(duration - frames / 30) < 0.1, (duration, frames)

    # A second, longer job: stop it mid-way, then resume it.
    _fill_job(page, test_image, "a slow tide", seconds=4, steps=4)
    page.locator("#add-to-queue").click()
    page.wait_for_function(f"() => !document.querySelector('#progress .fp-progress-head')?.innerText.includes('{first}')")
    second = _job_id(page)
    client = server.client()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        progress = client.get(f"/api/jobs/{second}").json().get("progress") or {}
        if progress.get("section", 0) >= 1:
            break
        time.sleep(0.1)
    page.locator("#stop").click()
    assert wait_status(client, second, ("cancelled",), timeout=120)["status"] == "cancelled"
    _wait_status(page, {"cancelled"}, 60)
    page.screenshot(path=str(shots / "03-stopped.png"), full_page=True)
    page.locator("#resume").click()
    assert wait_status(client, second, ("done",), timeout=300)["status"] == "done"
    _wait_status(page, {"done"}, 60)

    page.get_by_role("tab", name="Queue").click()
    time.sleep(3)
    page.screenshot(path=str(shots / "04-queue-before.png"), full_page=True)
    table = page.locator("#queue-table")
    page.wait_for_function(f"() => document.querySelector('#queue-table').innerText.includes('{second}')")
    assert first in table.inner_text() and second in table.inner_text()
    page.screenshot(path=str(shots / "04-queue.png"), full_page=True)

    page.get_by_role("tab", name="Outputs").click()
    page.locator("#finished input").click()
    page.get_by_role("option").filter(has_text=first).first.click()
    page.locator("#output-video video").wait_for()
    assert first in page.locator("#output-metadata").inner_text()
    page.locator("#load-settings").click()
    page.wait_for_function("() => document.querySelector('#prompt textarea').value.includes('it breaks')")
    page.screenshot(path=str(shots / "05-loaded.png"), full_page=True)

    # Presets: the Generate tab's settings under a name, in the service's database.
    page.get_by_role("tab", name="Presets").click()
    page.locator("#preset-name textarea, #preset-name input").first.fill("short wave")
    page.locator("#save-preset").click()
    playwright_api.expect(page.locator("#preset-list input")).to_have_value("short wave", timeout=30_000)
    assert server.client().get("/api/presets").json()  # stored by the service, not the page
    page.get_by_role("tab", name="Generate").click()
    page.locator("#prompt textarea").fill("something else")
    page.get_by_role("tab", name="Presets").click()
    page.locator("#load-preset").click()
    page.wait_for_function("() => document.querySelector('#prompt textarea').value.includes('it breaks')")


def test_extend_a_video_from_the_page(server, page, tmp_path, shots):
    source = write_plain_video(tmp_path / "clip.mp4", 40)
    page.goto(server.url + "/")
    page.locator("#prompt textarea").wait_for()
    _open(page, "extend-box", "#extend-video input[type=file]")
    page.locator("#extend-video input[type=file]").set_input_files(str(source))
    _fill_job(page, None, "the dots drift on", seconds=1.2, steps=1)
    # The plan counts the input's 40 frames before the 3 sections of 12 new ones.
    playwright_api.expect(page.locator("#memory-plan")).to_contain_text("3 sections, 76 frames", timeout=60_000)
    page.locator("#generate-now").click()
    page.locator("#progress [data-status]").wait_for()
    job_id = _job_id(page)
    _wait_status(page, {"done", "failed"})
    job = server.client().get(f"/api/jobs/{job_id}").json()
    page.screenshot(path=str(shots / "07-extended.png"), full_page=True)
    assert job["status"] == "done", job["error"]
    assert set(job["inputs"]) == {"extend"} and job["stats"]["frames"] == 40 + 36  # window 3: 3 sections of 12


def test_phone_width_keeps_the_controls_usable(server, browser, shots):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    page = context.new_page()
    page.goto(server.url + "/")
    page.locator("#prompt textarea").wait_for()
    # The buttons come last: once they are rendered the whole form is (under load that takes a while).
    playwright_api.expect(page.locator("#generate-now")).to_be_visible(timeout=60_000)
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= 400  # nothing forces sideways scrolling
    page.screenshot(path=str(shots / "06-phone.png"), full_page=True)
    context.close()


def test_with_auth_the_login_page_blocks_the_ui(tmp_path, tiny_model, browser, shots):
    srv = Server(f"sqlite:///{tmp_path / 'q.sqlite3'}", tmp_path / "storage", "--model", str(tiny_model),
                 "--workers", "0", token=TOKEN, ui=True).start(timeout=120)
    try:
        assert httpx.get(srv.url + "/api/jobs").status_code == 401
        context = browser.new_context()
        page = context.new_page()
        page.goto(srv.url + "/")
        page.get_by_label("Password").wait_for()
        assert page.locator("#prompt").count() == 0
        page.screenshot(path=str(shots / "07-login.png"))
        page.get_by_label("Username").fill("me")
        page.get_by_label("Password").fill("not the token")
        page.get_by_role("button", name="Login").click()
        page.get_by_text("Incorrect").first.wait_for()
        assert page.locator("#prompt").count() == 0
        page.get_by_label("Username").fill("me")
        page.get_by_label("Password").fill(TOKEN)
        page.get_by_role("button", name="Login").click()
        page.locator("#prompt textarea").wait_for()
        context.close()
    finally:
        srv.stop()


def test_the_memory_plan_reads_no_model_the_service_does_not_offer(server, page):
    page.goto(server.url + "/")
    page.locator("#prompt textarea").wait_for()
    _open(page, "speed-box", "#model textarea, #model input")
    page.locator("#model textarea, #model input").first.fill("/etc")
    page.locator("#model textarea, #model input").first.blur()
    playwright_api.expect(page.locator("#memory-plan")).to_contain_text(
        "model '/etc': not a model this service runs", timeout=60_000)
