"""The web client's screenshots in docs/: a desktop and a phone, each panel used once, in Debian's
Chromium against the real server.

    .venv-dev/bin/python -m bench.screenshots
"""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import Page, expect, sync_playwright

from bench.liveserver import REPO_ROOT, running_server

DOCS = REPO_ROOT / "docs"
EXAMPLES = REPO_ROOT / "examples"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def use_every_panel(page: Page) -> None:
    page.get_by_test_id("digits-canvas").scroll_into_view_if_needed()  # the mouse draws in the viewport
    box = page.get_by_test_id("digits-canvas").bounding_box()
    points = [(0.25, 0.2), (0.75, 0.2), (0.45, 0.85)]
    xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*xy[0])
    page.mouse.down()
    for x, y in xy[1:]:
        page.mouse.move(x, y, steps=15)
    page.mouse.up()
    page.get_by_test_id("digits-predict").click()
    expect(page.get_by_test_id("digits-result")).to_contain_text("Digit")
    page.get_by_test_id("emotion-file").set_input_files(str(EXAMPLES / "emodb-08a01Wa-anger.wav"))
    expect(page.get_by_test_id("emotion-result")).to_contain_text("%", timeout=30_000)
    page.get_by_test_id("segmentation-file").set_input_files(str(EXAMPLES / "membrane-slice3-crop.png"))
    expect(page.locator("#segmentation-status")).to_contain_text("done", timeout=30_000)
    page.get_by_test_id("clustering-income").fill("120")
    page.get_by_test_id("clustering-score").fill("85")
    page.get_by_test_id("clustering-predict").click()
    expect(page.get_by_test_id("clustering-result")).to_contain_text("Segment")
    page.get_by_test_id("palette-file").set_input_files(str(EXAMPLES / "sunset.png"))
    expect(page.get_by_test_id("palette-result").locator(".swatch")).to_have_count(5)


def main() -> None:
    with running_server(workers=1) as live, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
        shots = {"web-client.png": {"viewport": {"width": 1280, "height": 900}},
                 "web-client-phone.png": {"viewport": {"width": 390, "height": 844}, "is_mobile": True,
                                          "has_touch": True}}
        for name, context in shots.items():
            page = browser.new_context(**context).new_page()
            page.goto(live.base_url + "/")
            expect(page.locator("#versions")).to_contain_text("digits")
            use_every_panel(page)
            page.screenshot(path=str(DOCS / name), full_page=True)
            print(f"{Path('docs') / name}")
        browser.close()


if __name__ == "__main__":
    main()
