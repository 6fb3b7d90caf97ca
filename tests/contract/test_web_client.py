"""The web client at / in headless Chromium (Debian's, driven by Playwright), against the real
server: drawing, the microphone (faked from a real EmoDB clip), uploads, a phone-sized touch
screen, a problem shown for a bad file; no console error and no request leaving the origin.
Screenshots go to test-artifacts/browser/ (not committed)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright
from sqlalchemy import create_engine, text

from bench.liveserver import running_server

CHROMIUM = "/usr/bin/chromium"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"
CLIP = EXAMPLES / "emodb-08a01Wa-anger.wav"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--use-fake-ui-for-media-stream",
         "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={CLIP}"]

if not Path(CHROMIUM).exists() and os.environ.get("CI") != "true":
    pytest.skip("Debian's chromium is not installed (make test installs it under CI)", allow_module_level=True)


@pytest.fixture(scope="module")
def live_site():
    with running_server(workers=1) as live:
        yield live


@pytest.fixture(scope="module")
def site(live_site):
    return live_site.base_url


@pytest.fixture(scope="module")
def browser():
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


class Watched:
    """A page whose console errors and requests to other origins are collected."""

    def __init__(self, page: Page, origin: str) -> None:
        self.page, self.errors, self.foreign = page, [], []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("response", lambda r: self.errors.append(f"{r.status} {r.url} {r.text()[:300]}")
                if r.status >= 500 else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("request", lambda r: None if r.url.startswith((origin, "data:", "blob:")) else self.foreign.append(r.url))

    def clean(self) -> None:
        assert self.errors == [], self.errors
        assert self.foreign == [], self.foreign


def open_page(browser, site: str, **context) -> Watched:
    page = browser.new_context(**context).new_page()
    watched = Watched(page, site)
    response = page.goto(site + "/")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'self'" in csp and "unsafe-inline" not in csp
    expect(page.locator("#versions")).to_contain_text("digits")
    return watched


def draw_seven(page: Page, kind: str = "mouse") -> None:
    box = page.get_by_test_id("digits-canvas").bounding_box()
    points = [(0.25, 0.2), (0.75, 0.2), (0.45, 0.85)]  # the top bar, then the long diagonal
    xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    if kind == "mouse":
        page.mouse.move(*xy[0])
        page.mouse.down()
        for x, y in xy[1:]:
            page.mouse.move(x, y, steps=15)
        page.mouse.up()
        return
    # Touch: the pointer events a finger makes (Playwright's touchscreen only taps).
    page.evaluate("""([points, box]) => {
      const canvas = document.querySelector('[data-testid=digits-canvas]');
      const fire = (type, [x, y]) => canvas.dispatchEvent(new PointerEvent(type, {
        pointerId: 7, pointerType: 'touch', isPrimary: true, clientX: x, clientY: y, bubbles: true, pressure: 0.5}));
      fire('pointerdown', points[0]);
      for (let i = 1; i < points.length; i++)
        for (let s = 1; s <= 15; s++)
          fire('pointermove', [points[i-1][0] + (points[i][0] - points[i-1][0]) * s / 15,
                               points[i-1][1] + (points[i][1] - points[i-1][1]) * s / 15]);
      fire('pointerup', points[points.length - 1]);
    }""", [[[x - 0, y - 0] for x, y in xy], box])


def test_a_drawn_seven_reads_as_seven(browser, site):
    watched = open_page(browser, site)
    page = watched.page
    expect(page.get_by_test_id("digits-result")).to_be_empty()
    draw_seven(page)
    page.get_by_test_id("digits-predict").click()
    expect(page.get_by_test_id("digits-result")).to_contain_text("Digit 7")
    page.screenshot(path=str(SHOTS / "digits.png"), full_page=True)
    watched.clean()


def test_the_consent_box_decides_whether_the_request_asks_to_keep_the_input(browser, site):
    watched = open_page(browser, site)
    page = watched.page
    expect(page.get_by_test_id("consent")).not_to_be_checked()  # nothing is kept unless asked
    draw_seven(page)
    with page.expect_response("**/v1/digits/predict") as unasked:
        page.get_by_test_id("digits-predict").click()
    assert "x-data-consent" not in unasked.value.request.headers
    assert unasked.value.headers["x-inputs-stored"] == "false"
    page.get_by_test_id("consent").check()
    with page.expect_response("**/v1/digits/predict") as granted:
        page.get_by_test_id("digits-predict").click()
    assert granted.value.request.headers["x-data-consent"] == "granted"
    assert granted.value.headers["x-inputs-stored"] == "true"
    watched.clean()


def test_a_recorded_clip_and_an_uploaded_anger_clip_show_an_emotion(browser, site):
    watched = open_page(browser, site)
    page = watched.page
    record = page.get_by_test_id("emotion-record")
    record.click()
    expect(record).to_have_attribute("aria-pressed", "true")
    page.wait_for_timeout(3000)
    record.click()
    result = page.get_by_test_id("emotion-result")
    expect(result).to_contain_text("%", timeout=20_000)
    labels = ("anger", "boredom", "disgust", "fear", "happiness", "neutral", "sadness")
    assert any(label in result.inner_text() for label in labels)
    page.get_by_test_id("emotion-file").set_input_files(str(CLIP))
    expect(result).to_contain_text("anger", timeout=20_000)
    expect(page.locator("#emotion-segments span")).to_have_count(1)
    page.screenshot(path=str(SHOTS / "emotion.png"), full_page=True)
    watched.clean()


def test_a_slice_shows_its_mask_and_the_threshold_changes_it(browser, site):
    watched = open_page(browser, site)
    page = watched.page
    page.get_by_test_id("segmentation-file").set_input_files(str(EXAMPLES / "membrane-slice3-crop.png"))
    expect(page.locator("#segmentation-status")).to_contain_text("done", timeout=20_000)
    size = page.get_by_test_id("segmentation-result").evaluate("img => [img.complete, img.naturalWidth, img.naturalHeight]")
    assert size == [True, 256, 256]
    first = page.locator("#segmentation-mask").get_attribute("src")
    page.locator("#segmentation-threshold").fill("0.8")
    page.locator("#segmentation-threshold").dispatch_event("change")
    expect(page.locator("#segmentation-status")).to_contain_text("0.8", timeout=20_000)
    assert page.locator("#segmentation-mask").get_attribute("src") != first
    page.screenshot(path=str(SHOTS / "segmentation.png"), full_page=True)
    watched.clean()


def test_a_segment_and_a_palette_appear(browser, site):
    watched = open_page(browser, site)
    page = watched.page
    page.get_by_test_id("clustering-income").fill("120")
    page.get_by_test_id("clustering-score").fill("85")
    page.get_by_test_id("clustering-predict").click()
    expect(page.get_by_test_id("clustering-result")).to_contain_text("high income, high spending")
    page.get_by_test_id("palette-file").set_input_files(str(EXAMPLES / "sunset.png"))
    expect(page.get_by_test_id("palette-result").locator(".swatch")).to_have_count(5)
    expect(page.get_by_test_id("palette-result")).to_contain_text("#")
    page.screenshot(path=str(SHOTS / "clustering.png"), full_page=True)
    watched.clean()


def test_a_bad_file_shows_the_problem_detail(browser, site, tmp_path):
    watched = open_page(browser, site)
    page = watched.page
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    page.get_by_test_id("palette-file").set_input_files(str(text))
    expect(page.locator("#palette-problem")).to_contain_text("That file is not a picture this panel can read")
    page.locator("#palette-problem summary").click()  # the service's own detail, one click away
    expect(page.locator("#palette-problem details")).to_contain_text("not an image in a supported format")
    expect(page.get_by_test_id("palette-result")).to_be_empty()
    page.screenshot(path=str(SHOTS / "problem.png"), full_page=True)
    # The 415 the server answered is the only console message allowed here: the browser logs it.
    watched.errors = [e for e in watched.errors if "415" not in e]
    watched.clean()


def test_a_phone_sized_touch_screen_works(browser, site):
    watched = open_page(browser, site, viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True)
    page = watched.page
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    # the threshold's value stays on the slider's line
    slider = page.locator("#segmentation-threshold").bounding_box()
    value = page.locator("#segmentation-threshold-value").bounding_box()
    assert abs((value["y"] + value["height"] / 2) - (slider["y"] + slider["height"] / 2)) < slider["height"]
    page.get_by_test_id("digits-canvas").scroll_into_view_if_needed()
    draw_seven(page, kind="touch")
    page.get_by_test_id("digits-predict").tap()
    expect(page.get_by_test_id("digits-result")).to_contain_text("Digit 7")
    page.screenshot(path=str(SHOTS / "phone.png"), full_page=True)
    watched.clean()


def test_keyboard_alone_reaches_every_control(browser, site):
    watched = open_page(browser, site)
    page = watched.page
    reached = set()
    for _ in range(40):
        page.keyboard.press("Tab")
        reached.add(page.evaluate("document.activeElement.dataset.testid || document.activeElement.id"))
    assert {"digits-predict", "emotion-record", "emotion-file", "segmentation-file", "clustering-income",
            "clustering-score", "clustering-predict", "palette-file"} <= reached
    page.get_by_test_id("clustering-income").focus()
    page.keyboard.press("Enter")
    expect(page.get_by_test_id("clustering-result")).to_contain_text("Segment")
    watched.clean()


@pytest.fixture(scope="module")
def keyed_site():
    """The service with API_KEYS set: every prediction needs the key."""
    digest = hashlib.sha256(PAGE_KEY.encode()).hexdigest()
    with running_server(workers=1, env={"API_KEYS": digest}) as live:
        yield live.base_url


PAGE_KEY = "page-key-for-the-test"


def test_with_api_keys_the_page_asks_for_the_key_and_then_uses_it(browser, keyed_site):
    watched = open_page(browser, keyed_site)
    page = watched.page
    draw_seven(page)
    page.get_by_test_id("digits-predict").click()
    expect(page.locator("#digits-problem")).to_contain_text("API key")
    page.get_by_test_id("api-key").fill(PAGE_KEY)
    with page.expect_response("**/v1/digits/predict") as answered:
        page.get_by_test_id("digits-predict").click()
    assert answered.value.request.headers["x-api-key"] == PAGE_KEY
    expect(page.get_by_test_id("digits-result")).to_contain_text("Digit 7")
    page.reload()  # kept for the tab (sessionStorage), not typed again
    expect(page.get_by_test_id("api-key")).to_have_value(PAGE_KEY)
    # The 401 the server answered first is the only console message allowed: the browser logs it.
    watched.errors = [e for e in watched.errors if "401" not in e]
    watched.clean()


@pytest.mark.parametrize(("path", "rendered"), [("/docs", ".opblock"), ("/redoc", "[data-section-id]")])
def test_the_api_documentation_renders_under_its_content_security_policy(browser, site, path, rendered):
    page = browser.new_context().new_page()
    watched = Watched(page, site)
    response = page.goto(site + path)
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    expect(page.locator(rendered).first).to_be_visible(timeout=20_000)
    # ReDoc's footer links its logo from its CDN: the policy blocking it is the policy working.
    watched.errors = [e for e in watched.errors if not ("violates the following Content Security Policy"
                                                        in e and "https://cdn.redoc.ly/" in e)]
    watched.foreign = [u for u in watched.foreign if not u.startswith("https://cdn.redoc.ly/")]
    watched.clean()  # any other blocked script or style would be a console error


def logged_predictions(live) -> int:
    engine = create_engine(live.database_url)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM predictions")).scalar()
    finally:
        engine.dispose()


def test_loading_the_page_adds_nothing_to_the_prediction_log(browser, live_site):
    site = live_site.base_url
    drift_before = httpx.get(site + "/v1/monitoring/drift").json()["models"]
    rows_before = logged_predictions(live_site)
    watched = open_page(browser, site)
    page = watched.page
    for _ in range(20):
        page.goto(site + "/")
        expect(page.locator("#clustering-legend li")).to_have_count(5)  # the map is drawn
    httpx.get(site + "/v1/monitoring/drift")  # written: this worker flushes before a report
    assert logged_predictions(live_site) == rows_before
    drift_after = httpx.get(site + "/v1/monitoring/drift").json()["models"]
    assert [(m["model"], m["n"], m["status"]) for m in drift_after] == \
        [(m["model"], m["n"], m["status"]) for m in drift_before]
    watched.clean()


def test_an_uploaded_digit_is_shown_where_the_drawing_was(browser, site):
    watched = open_page(browser, site)
    page = watched.page
    blank = page.get_by_test_id("digits-canvas").screenshot()
    page.locator("#digits-file").set_input_files(str(EXAMPLES / "digit-7.png"))
    expect(page.get_by_test_id("digits-result")).to_contain_text("Digit 7")
    ink = page.evaluate("""() => {
      const c = document.getElementById('digits-canvas');
      const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      let dark = 0;
      for (let i = 0; i < d.length; i += 4) if (d[i] < 128) dark++;
      return dark;
    }""")
    assert ink > 500 and page.get_by_test_id("digits-canvas").screenshot() != blank
    watched.clean()
