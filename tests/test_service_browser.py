"""The cloud service's Swagger/OpenAPI page in a real headless Chromium.

The page (served by BentoML itself, its scripts and styles local) must render the operations,
``/predict`` among them, on a closed network: it also asks Google Tag Manager for a script,
which the test refuses at once (a machine without internet would otherwise wait on it). On
``/predict``, "Try it out" then "Execute" with the page's own example must show the
service's 200 answer (with Playwright; Chromium's command line cannot click).

Debian's ``chromium`` (``make test`` installs it when missing and root) is driven by Python
Playwright, or by Chromium's own ``--dump-dom``/``--screenshot`` when Playwright is missing.
The test skips only when no Chromium can be found, and says so. Screenshots go to
``$REPORT_SCREENSHOT_DIR`` when set (the test's temp folder otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

from tests.tiny_models import CLASS_NAMES, IMAGE_SHAPE

pytestmark = pytest.mark.slow

# Without the networking flags Chromium stalls on a closed network (see PITFALLS.md).
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
ROUTES = ("/predict", "/predict_batch", "/predict_image", "/info")


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def _shots_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("REPORT_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_swagger_page_lists_the_predict_endpoints_in_chromium(request, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium on this machine (make test installs Debian's chromium as root)")
    url = request.getfixturevalue("cloud").url  # after the skip: no server for nothing
    shot = _shots_dir(tmp_path) / "swagger.png"
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError:
        _check_with_chromium_cli(browser, url, shot, tmp_path)
        return
    _check_with_playwright(browser, url, shot)


def _check_with_playwright(browser: str, url: str, shot: Path) -> None:
    from playwright.sync_api import sync_playwright

    own = urlsplit(url).netloc
    refused: list[str] = []

    def only_the_service(route) -> None:
        if urlsplit(route.request.url).netloc == own:
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort("internetdisconnected")

    started = time.monotonic()
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=browser, args=CHROMIUM_FLAGS)
        try:
            page = chromium.new_page(viewport={"width": 1200, "height": 1600})
            page.route("**/*", only_the_service)
            page.goto(url + "/", wait_until="load", timeout=30_000)
            page.wait_for_selector(".opblock-summary-path", timeout=30_000)
            paths = page.eval_on_selector_all(
                ".opblock-summary-path", "els => els.map(e => e.getAttribute('data-path'))"
            )
            title = page.title()
            sent, status, answer = _try_it_out(page, "/predict")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            chromium.close()
    assert set(ROUTES) <= set(paths), paths
    # "Try it out", then "Execute", with the page's own example: the model's 8x8 image, and
    # the answer the page shows is the service's 200 with a label.
    assert np.array(json.loads(sent)["image"]).shape == IMAGE_SHAPE[1:], sent[:200]
    assert status == "200", (status, answer[:500])
    assert json.loads(answer)["label"] in CLASS_NAMES, answer[:500]
    assert title
    assert time.monotonic() - started < 60  # no wait on the unreachable tag manager
    assert all("googletagmanager" in u for u in refused), refused
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one


def _try_it_out(page, path: str) -> tuple[str, str, str]:
    """Open ``path``'s operation, click "Try it out" and "Execute" with the example the page
    fills in; (the body sent, the status and the body the page shows as the answer)."""
    block = page.locator(".opblock", has=page.locator(f'.opblock-summary-path[data-path="{path}"]'))
    block.locator(".opblock-summary").click()
    block.locator("button.try-out__btn").click()
    sent = block.locator("textarea.body-param__text").input_value()
    block.locator("button.execute").click()
    live = block.locator(".live-responses-table .response")
    live.first.wait_for(timeout=30_000)
    status = live.first.locator(".response-col_status").inner_text().strip()
    answer = live.first.locator(".response-col_description pre").first.inner_text()
    return sent, status, answer


def _check_with_chromium_cli(browser: str, url: str, shot: Path, tmp_path: Path) -> None:
    """Without Playwright: the DOM Chromium built, and its own screenshot."""
    common = [
        browser,
        "--headless",
        *CHROMIUM_FLAGS,
        f"--user-data-dir={tmp_path / 'profile'}",
        # Every host but the service fails at once: no wait on Google Tag Manager.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--virtual-time-budget=15000",
    ]
    dom = subprocess.run(
        [*common, "--dump-dom", url + "/"], check=True, capture_output=True, text=True, timeout=120
    ).stdout
    for route in ROUTES:
        assert f'data-path="{route}"' in dom, route
    subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1200,1600", url + "/"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert shot.stat().st_size > 20_000
