"""The web UI in a real headless browser (Debian's chromium + chromedriver through selenium):
generate, watch the progress and the result, find it in the gallery, inpaint with a painted mask."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from huabi.models.family import ModelFamily
from server_process import ServerProcess
from tiny_models import write_tiny_single_file

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (bash setup.sh --dev installs them)",
)
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,900")


def chromium_driver(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def wait_for(condition, timeout_s: float = 120, what: str = "condition"):
    """Poll ``condition`` until truthy; elements re-rendered meanwhile (stale) are looked up again."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = condition()
        except StaleElementReferenceException:
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture()
def browser_server(tmp_path):
    models = tmp_path / "models"
    write_tiny_single_file(models, ModelFamily.SD1, filename="tiny_sd1.safetensors")
    process = ServerProcess(tmp_path / "data", models, "--model", "tiny_sd1").start()
    try:  # the server stops even if the browser fails to start
        driver = chromium_driver(tmp_path / "profile")
        try:
            yield process, driver
        finally:
            driver.quit()
    finally:
        process.stop()


def test_generate_see_progress_and_result_then_find_it_in_the_gallery(browser_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    server, driver = browser_server
    driver.get(server.url + "/")
    wait_for(lambda: len(Select(driver.find_element(By.ID, "sampler")).options) > 5, what="the sampler list")
    assert "tiny_sd1" in [o.text for o in Select(driver.find_element(By.ID, "model")).options]
    driver.find_element(By.ID, "prompt").send_keys("a browser fox")
    for field, value in (("steps", "40"), ("width", "64"), ("height", "64"), ("seed", "4242")):
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    Select(driver.find_element(By.ID, "sampler")).select_by_visible_text("Euler")
    driver.find_element(By.ID, "generate").click()
    # The progress bar moves with the job's steps (live events over SSE)...
    seen = wait_for(lambda: "step" in driver.find_element(By.ID, "progress-text").text and
                    driver.find_element(By.ID, "progress-text").text, what="progress steps")
    assert seen.endswith("/ 40")
    # ...and the result appears with its infotext.
    wait_for(lambda: driver.execute_script(
        "const i = document.querySelector('#results img'); return i && i.complete && i.naturalWidth") == 64,
        what="the result image")
    info = driver.find_element(By.ID, "result-info").text
    assert info.startswith("a browser fox") and "Seed: 4242" in info and "Sampler: Euler," in info
    assert driver.find_element(By.ID, "progress-text").text == "done"
    driver.save_screenshot(str(tmp_path / "txt2img.png"))

    # The gallery finds it by prompt text; its PNG info is shown.
    driver.find_element(By.CSS_SELECTOR, "nav button[data-tab=gallery]").click()
    driver.find_element(By.ID, "gallery-q").send_keys("browser fox")
    driver.find_element(By.CSS_SELECTOR, "#gallery-search button").click()

    def open_hit():
        figures = driver.find_elements(By.CSS_SELECTOR, "#gallery-grid figure")
        if len(figures) != 1 or "browser fox" not in figures[0].text:
            return False
        figures[0].click()
        return driver.find_element(By.ID, "detail-info").text

    assert "Seed: 4242" in wait_for(open_hit, what="the gallery hit and its PNG info")

    # Send to inpaint, paint a mask on the canvas, generate: an edit with "Mask blur" in its infotext.
    driver.find_element(By.ID, "detail-inpaint").click()
    wait_for(lambda: driver.execute_script("return document.getElementById('init-canvas').width") == 64,
             what="the init image in the canvas")
    canvas = driver.find_element(By.ID, "mask-canvas")
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).move_to_element(canvas).click_and_hold().move_by_offset(20, 10).release().perform()
    steps = driver.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys("3")
    driver.find_element(By.ID, "generate").click()
    wait_for(lambda: "Mask blur" in driver.find_element(By.ID, "result-info").text, what="the inpainted result")
    assert "Denoising strength: 0.75" in driver.find_element(By.ID, "result-info").text
    assert not driver.find_element(By.ID, "error").text


def test_page_loads_nothing_from_other_hosts(browser_server):
    """Every asset is served locally: the page has no URL pointing elsewhere."""
    server, driver = browser_server
    driver.get(server.url + "/")
    from selenium.webdriver.common.by import By

    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#sampler option"), what="the page")
    resources = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name).concat([location.href])")
    assert resources and all(url.startswith(server.url) for url in resources), resources
    html = (Path(__file__).resolve().parents[1] / "src/huabi/server/webui/index.html").read_text()
    assert "http://" not in html and "https://" not in html
    assert os.path.exists(CHROMIUM)
