"""Make docs/images/webui.png: the web UI after a txt2img run on the built-in model, in headless chromium.

    .venv/bin/python scripts/webui_screenshot.py [--out docs/images/webui.png]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "webui.png")
    parser.add_argument("--prompt", default="a red apple")
    args = parser.parse_args()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from server_process import ServerProcess
    from test_webui_browser import chromium_driver, wait_for

    with tempfile.TemporaryDirectory(prefix="webui_shot_") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "models").mkdir()
        server = ServerProcess(tmp_path / "data", tmp_path / "models").start()
        driver = chromium_driver(tmp_path / "profile")
        try:
            driver.set_window_size(1280, 860)
            driver.get(server.url + "/")
            wait_for(lambda: len(Select(driver.find_element(By.ID, "sampler")).options) > 5, what="the page")
            driver.find_element(By.ID, "prompt").send_keys(args.prompt)
            driver.find_element(By.ID, "negative_prompt").send_keys("blurry")
            for field, value in (("width", "128"), ("height", "128"), ("seed", "1000"), ("batch_size", "4")):
                box = driver.find_element(By.ID, field)
                box.clear()
                box.send_keys(value)
            driver.find_element(By.ID, "generate").click()
            wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#results img")) == 4, timeout_s=600,
                     what="four results")
            wait_for(lambda: driver.execute_script(
                "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth)"),
                what="the images to load")
            wait_for(lambda: driver.find_element(By.ID, "queue-count").text == "", what="the queue to show empty")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
            print(args.out)
        finally:
            driver.quit()
            server.stop()


if __name__ == "__main__":
    main()
