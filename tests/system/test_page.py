"""The web page at `/`, in a real browser (Debian's headless chromium through chromium-driver and Selenium), served
by a real `fpet serve`: upload an image, wait for both variants and the merge map, compare with the API.

FPET_SCREENSHOT=PATH also saves the screenshot there (the README's was taken this way, with the default model:
FPET_PAGE_BUNDLES=default)."""

import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.helpers.servers import start_server

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")


@pytest.fixture(scope="module")
def page_server(tiny_bundles, tmp_path_factory):
    bundles = tiny_bundles
    if os.environ.get("FPET_PAGE_BUNDLES") == "default":
        from export.defaults import ensure_default_bundles

        bundles = ensure_default_bundles(log=lambda _: None)
    process, base = start_server(bundles, tmp_path_factory.mktemp("page"))
    yield base
    process.kill()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,1400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(browser, script: str, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(lambda b: b.execute_script(script))


def top1(browser, model: str) -> str:
    return browser.execute_script(f"return document.querySelector('#model-{model} .top li')?.dataset.label")


def test_the_page_classifies_an_upload_and_shows_the_merges(page_server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    photo = Path(__file__).parents[2] / "fpet" / "assets" / "photos" / "coffee.jpg"
    browser.get(page_server + "/")
    wait_for(browser, "return document.querySelectorAll('#samples button').length === 4")
    browser.find_element(By.ID, "file").send_keys(str(photo))
    wait_for(browser, "return document.getElementById('result').dataset.done === 'true'")
    wait_for(browser, "const o = document.getElementById('overlay'); return o.complete && o.naturalWidth > 0")

    answer = httpx.post(
        f"{page_server}/classify/compare?top_k=5",
        content=photo.read_bytes(),
        headers={"Content-Type": "image/jpeg"},
        timeout=30,
    ).json()
    for model in ("fpet", "backbone"):
        assert top1(browser, model) == answer["models"][model]["predictions"][0]["label"]
        shown = browser.find_elements(By.CSS_SELECTOR, f"#model-{model} .top li")
        assert len(shown) == len(answer["models"][model]["predictions"])  # top-5, or every class of a small task
    assert "faster than the backbone" in browser.find_element(By.ID, "speedup").text
    assert "tokens" in browser.find_element(By.ID, "overlay-caption").text
    assert browser.find_element(By.ID, "error").get_attribute("hidden")
    wait_for(browser, "return document.querySelectorAll('#live tbody tr').length >= 2", timeout=10)
    runtime = httpx.get(f"{page_server}/models/fpet").json()
    shown = browser.find_element(By.ID, "runtime").text
    assert f"fpet: {runtime['runtime']} {runtime['compute_precision']}" in shown and "CPU features" in shown, shown

    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(url.startswith(page_server) or url.startswith("blob:") for url in resources), resources
    assert "http" not in browser.execute_script("return document.documentElement.outerHTML").replace(
        page_server, ""
    ).replace("http://www.w3.org", "")  # no external URL anywhere in the page

    shot = tmp_path / "page.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("FPET_SCREENSHOT"):
        shutil.copy(shot, os.environ["FPET_SCREENSHOT"])


def test_a_bad_file_gets_a_clear_message(page_server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    fake = tmp_path / "notes.png"
    fake.write_bytes(b"this is not a picture")
    browser.get(page_server + "/")
    browser.find_element(By.ID, "file").send_keys(str(fake))
    wait_for(browser, "return !document.getElementById('error').hidden")
    message = browser.find_element(By.ID, "error").text
    assert "HTTP 400" in message and "image" in message.lower()


def test_the_page_works_from_the_keyboard_on_a_phone_screen(page_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.set_window_size(390, 844)
    browser.get(page_server + "/")
    wait_for(browser, "return document.querySelectorAll('#samples button').length === 4")
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    body = browser.find_element(By.TAG_NAME, "body")
    for _ in range(10):  # tab to the first sample photo and press Enter
        body.send_keys(Keys.TAB)
        if browser.switch_to.active_element.tag_name == "button":
            break
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    wait_for(browser, "return document.getElementById('result').dataset.done === 'true'")
    assert top1(browser, "fpet")
