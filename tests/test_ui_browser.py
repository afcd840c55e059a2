"""The web UI in a real browser (headless Debian Chromium driven by Playwright) against
``video-infinity serve``: fill a 2-prompt timeline, generate 16 frames at 64x64 in 2 steps on 2 CPU
processes while the progress updates, play the video; a bad value shown next to its field with
nothing started; cancel a second run mid-way (no process left, checkpoint kept), resume it, and
find the runs in the gallery; "use these settings" loads a run back into the form; a start image for
the text-to-video demo model refused under the upload, and a run's image loaded back by "use these
settings".

The page's screenshot is saved (``VIDEO_INFINITY_SCREENSHOT=path``: there; the web UI page's picture,
docs/web-ui.png, comes from such a run)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from ui_utils import CHROMIUM, CHROMIUM_ARGS, Server, require_browser
from video_infinity.video_io import read_video

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory, offline_env):
    require_browser()
    base = tmp_path_factory.mktemp("ui-browser") / "runs"
    # Slow steps (0.3 s each): progress is seen step by step, and a cancel lands mid-run.
    server = Server(base, offline_env, "--test-step-sleep", "0.3")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(60_000)
        page.goto(server.url, wait_until="load")
        page.wait_for_selector("#prompt-0 textarea")
        yield page
        browser.close()


def _fill(page, elem_id: str, value: str) -> None:
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(value)


def _text(page, elem_id: str) -> str:
    return page.inner_text(f"#{elem_id}")


def _fill_form(page, steps: int) -> None:
    _fill(page, "start-0", "0")
    _fill(page, "prompt-0", "a red circle moving right")
    _fill(page, "start-1", "8")
    _fill(page, "prompt-1", "a blue square moving down")
    for elem_id, value in (("num-frames", "16"), ("height", "64"), ("width", "64"), ("steps", str(steps)),
                           ("devices", "2"), ("seed", "5")):
        _fill(page, elem_id, value)


def _wait_status(page, *words: str, timeout_s: float = 90) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = _text(page, "status")
        if any(word in status for word in words):
            return status
        time.sleep(0.1)
    raise AssertionError(f"status never showed {words}: {_text(page, 'status')!r}")


def _gallery(page) -> dict[str, str]:
    """The gallery's rows: run name -> status."""
    page.click("#refresh")
    time.sleep(1.0)
    rows = page.locator("#gallery tr[data-run]")
    return {rows.nth(i).get_attribute("data-run"): rows.nth(i).get_attribute("data-status") for i in range(rows.count())}


def test_a_bad_value_is_shown_next_to_its_field_and_nothing_starts(server, page):
    _fill_form(page, steps=2)
    _fill(page, "height", "65")
    page.click("#generate")
    message = "pipe_configs.height: must be a positive multiple of 8, got 65 (use e.g. 64 or 72)"
    page.wait_for_function(f"() => document.querySelector('#height').innerText.includes({message!r})", timeout=20_000)
    assert message not in _text(page, "width")
    assert _text(page, "status").strip() == "Ready."
    assert not list(server.base.glob("*.mp4")) and not server.runs_left()
    _fill(page, "height", "64")


def test_generate_shows_progress_and_a_playable_video(server, page):
    _fill_form(page, steps=2)
    page.click("#generate")
    seen: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "done" not in _text(page, "status"):
        progress = _text(page, "progress")
        if "step" in progress and (not seen or seen[-1] != progress):
            seen.append(progress)
        time.sleep(0.05)
    assert "done" in _text(page, "status"), _text(page, "status")
    assert len(seen) >= 2, seen  # the progress updated while the ranks ran
    assert any("step 1/2" in text for text in seen) and any("2/2" in text for text in seen), seen
    page.wait_for_function("() => { const v = document.querySelector('#result-video video');"
                           " return v !== null && v.readyState >= 1 && v.duration > 0; }", timeout=30_000)
    duration = page.evaluate("document.querySelector('#result-video video').duration")
    assert duration == pytest.approx(16 / 8, abs=0.2)  # 16 frames at the MP4's 8 fps
    facts = _text(page, "facts")
    assert "16 frames 64x64" in facts and "seed 5" in facts and "2 rank(s)" in facts
    assert "colour" in _text(page, "probe-report")
    videos = list(server.base.glob("*.mp4"))
    assert len(videos) == 1 and read_video(videos[0])[0].shape == (16, 64, 64, 3)
    shot = Path(os.environ.get("VIDEO_INFINITY_SCREENSHOT") or server.base.parent / "web-ui.png")
    page.screenshot(path=str(shot), full_page=True)
    from PIL import Image

    with Image.open(shot) as image:
        assert image.width >= 1000 and np.asarray(image.convert("L")).std() > 10


def test_cancel_stops_every_rank_keeps_the_checkpoint_and_resume_finishes(server, page):
    _fill_form(page, steps=6)
    page.get_by_text("Engine and advanced settings").click()
    _fill(page, "checkpoint-every", "1")
    page.click("#generate")
    page.wait_for_function("() => /step [2-4]\\/6/.test(document.querySelector('#progress').innerText)", timeout=90_000)
    started = time.monotonic()
    page.click("#cancel")
    status = _wait_status(page, "cancelled", timeout_s=30)
    assert time.monotonic() - started < 10
    assert "checkpoint is kept" in status
    assert not server.runs_left()  # no launcher, rank or fork server left
    checkpoints = list(server.base.glob("*.ckpt"))
    assert len(checkpoints) == 1
    cancelled = checkpoints[0].name.removesuffix(".ckpt")
    runs = _gallery(page)
    assert runs[cancelled] == "unfinished" and list(runs.values()).count("done") == 1, runs

    # Resume: pick the run, continue it from its checkpoint to the end.
    page.locator("#run-choice input").fill(cancelled)
    page.keyboard.press("Enter")
    page.click("#resume")
    _wait_status(page, "done", "failed", "refused", timeout_s=120)
    assert "done" in _text(page, "status"), _text(page, "status")
    assert not list(server.base.glob("*.ckpt"))
    assert '"resumed_from"' in page.inner_text("#sidecar") or (server.base / f"{cancelled}.json").is_file()
    import json

    sidecar = json.loads((server.base / f"{cancelled}.json").read_text())
    assert sidecar["resumed_from"]["step"] >= 2
    assert _gallery(page) == {**runs, cancelled: "done"}


def test_use_these_settings_loads_a_run_into_the_form(server, page):
    first = min(server.base.glob("*.mp4"), key=lambda p: p.stat().st_mtime)  # the 2-step run
    _fill(page, "steps", "13")
    _fill(page, "prompt-0", "something else")
    page.locator("#run-choice input").fill(first.stem)
    page.keyboard.press("Enter")
    page.click("#use-settings")
    page.wait_for_function("() => document.querySelector('#steps input').value === '2'", timeout=20_000)
    assert page.locator("#prompt-0 textarea").input_value() == "a red circle moving right"
    assert page.locator("#prompt-1 textarea").input_value() == "a blue square moving down"
    assert page.locator("#start-1 input").input_value() == "8"


def _has_image(page, elem_id: str) -> bool:
    return page.evaluate(f"() => document.querySelector('#{elem_id} img') !== null")


def test_an_image_upload_is_refused_for_the_demo_model_under_it_and_use_these_settings_restores_one(server, page,
                                                                                                   tmp_path):
    from video_infinity.demo import default_model_path
    from video_infinity.ui.form import GenerationForm, Limits, run_config

    first = tmp_path / "first.png"
    from PIL import Image

    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(first)
    before, status = sorted(p.name for p in server.base.iterdir()), _text(page, "status")
    _fill_form(page, steps=2)
    page.set_input_files("#image input[type=file]", str(first))
    page.wait_for_function("() => document.querySelector('#image img') !== null", timeout=20_000)
    page.click("#generate")
    message = (f"pipe_configs.image: {default_model_path()} is a text-to-video model (its transformer takes no image); "
               "use an image-to-video model or leave image out")
    page.wait_for_function(f"() => document.querySelector('#image').innerText.includes({message!r})", timeout=20_000)
    assert message not in _text(page, "last-image") and message not in _text(page, "prompt-0")
    assert _text(page, "status") == status  # nothing ran
    assert sorted(p.name for p in server.base.iterdir()) == before and not server.runs_left()

    # A run whose image is kept under base_path (as the UI keeps an upload), and one without an image.
    for name, image in (("with_image", server.base / "with_image.image.png"), ("text_only", None)):
        if image is not None:
            image.write_bytes(first.read_bytes())
        form = GenerationForm(prompts={0: f"the {name} run"}, steps=3, image=str(image or ""))
        config = run_config(form, base_path=str(server.base), file_name=name, limits=Limits())
        (server.base / f"{name}.config.json").write_text(json.dumps(config.model_dump(mode="json")))
    page.click("#refresh")
    for name, shown in (("text_only", False), ("with_image", True), ("text_only", False)):
        page.locator("#run-choice input").fill(name)
        page.keyboard.press("Enter")
        page.click("#use-settings")
        page.wait_for_function(f"() => document.querySelector('#prompt-0 textarea').value === 'the {name} run'",
                               timeout=20_000)
        page.wait_for_function(f"() => (document.querySelector('#image img') !== null) === {str(shown).lower()}",
                               timeout=20_000)
        assert not _has_image(page, "last-image")
