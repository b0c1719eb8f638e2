"""The web page in headless Chromium (Debian's chromium + chromedriver): type a query, see results,
open one. The screenshot is kept in .artifacts/web-page.png."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, free_port, make_images, run_cli

ARTIFACTS = ROOT / ".artifacts"


def browser():
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.environ.get("BLIPSEARCH_REQUIRE_BROWSER"):
            raise AssertionError("chromium and chromedriver are required (apt-get install chromium chromium-driver)")
        pytest.skip("no chromium/chromedriver on this machine")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


@pytest.fixture
def server(tmp_path, tiny_model):
    make_images(tmp_path / "photos", 11, seed=61, size=(320, 240))
    from PIL import Image
    from pillow_heif import register_heif_opener

    register_heif_opener()  # an iPhone's photo: Chromium cannot show HEIC, so the viewer shows a preview
    Image.open(tmp_path / "photos" / "img0000.jpg").resize((300, 200)).save(tmp_path / "photos" / "phone.heic")
    run_cli("index", str(tmp_path / "photos"), "--index", str(tmp_path / "idx"), "--model", str(tiny_model), "-q",
            check=True)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "serve", "--index", str(tmp_path / "idx"), "--port", str(port)],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    yield base
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)


def test_search_and_open_a_result(server):
    """Results with their thumbnails; a result opened shows the image itself, or a JPEG of it where
    the browser cannot show the file (HEIC here)."""
    import json
    import urllib.request

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser()
    try:
        driver.get(server + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "12 images indexed"))
        driver.find_element(By.ID, "query").send_keys("a red circle on a blue background")
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "results for"))
        cards = driver.find_elements(By.CSS_SELECTOR, "#results .card")
        assert len(cards) == 12
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
        cards[0].click()
        wait.until(ready.visibility_of_element_located((By.ID, "viewer")))
        wait.until(lambda d: d.execute_script("const i = document.querySelector('#viewer img'); "
                                              "return i.complete && i.naturalWidth === 320"))
        details = driver.find_element(By.CSS_SELECTOR, "#viewer dl").text
        assert "img0" in details and " kB\n" in details  # the size, as people read it
        original = driver.find_element(By.CSS_SELECTOR, "#viewer dd a")  # the path opens the file itself
        assert original.get_attribute("href").endswith("/file") and "img0" in original.text
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "web-page.png"))
        driver.find_element(By.ID, "viewer").click()
        wait.until(ready.invisibility_of_element_located((By.ID, "viewer")))
        driver.save_screenshot(str(ARTIFACTS / "web-results.png"))
        phone = json.load(urllib.request.urlopen(f"{server}/api/images?path=*.heic"))["images"][0]
        driver.find_element(By.CSS_SELECTOR, f"#results .card[data-id='{phone['id']}']").click()
        wait.until(lambda d: d.execute_script("const i = document.querySelector('#viewer img'); "
                                              "return i.complete && i.naturalWidth === 300"))
        assert driver.find_element(By.CSS_SELECTOR, "#viewer img").get_attribute("src").endswith("/preview")
        # More like this one: the images nearest its vectors, all but itself, at an address of its own.
        driver.find_element(By.ID, "like").click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "11 results for “images like phone.heic”"))
        assert not driver.find_element(By.ID, "viewer").is_displayed()
        assert driver.current_url == f"{server}/?like={phone['id']}"
        driver.refresh()
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "11 results for “images like phone.heic”"))
        shown = {card.get_attribute("data-id") for card in driver.find_elements(By.CSS_SELECTOR, "#results .card")}
        assert len(shown) == 11 and str(phone["id"]) not in shown
    finally:
        driver.quit()


def test_the_address_holds_the_search_and_a_gone_image_is_an_error(server):
    """A search's address can be shared or reloaded, and Back returns to the search before. A result
    forgotten since it was shown says so when opened, instead of doing nothing. A full page of
    results offers more."""
    import json
    import urllib.request

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser()
    try:
        driver.get(server + "/?q=a+blue+square&mode=itc")
        wait = WebDriverWait(driver, 30)
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "12 results for “a blue square”"))
        assert driver.find_element(By.ID, "query").get_attribute("value") == "a blue square"
        assert driver.find_element(By.ID, "mode").get_attribute("value") == "itc"
        query = driver.find_element(By.ID, "query")
        query.clear()
        query.send_keys("a green circle")
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "“a green circle”"))
        assert driver.current_url == server + "/?q=a+green+circle&mode=itc"
        driver.back()
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "“a blue square”"))
        assert driver.find_element(By.ID, "query").get_attribute("value") == "a blue square"
        card = driver.find_elements(By.CSS_SELECTOR, "#results .card")[0]
        request = urllib.request.Request(f"{server}/api/images/{card.get_attribute('data-id')}", method="DELETE")
        assert json.load(urllib.request.urlopen(request))["deleted"] == int(card.get_attribute("data-id"))
        card.click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "Error: no image with id"))
        assert not driver.find_element(By.ID, "viewer").is_displayed()
        # A page of results that is full offers more: twice as many each time, until fewer come back.
        driver.get(server + "/?q=a+green+circle&mode=itc&k=5")
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "5 results for"))
        more = driver.find_element(By.ID, "more")
        assert more.is_displayed()
        more.click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "10 results for"))
        assert driver.current_url == server + "/?q=a+green+circle&mode=itc&k=10"
        driver.find_element(By.ID, "more").click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "11 results for"))  # 12, one deleted
        assert not driver.find_element(By.ID, "more").is_displayed()
        assert len(driver.find_elements(By.CSS_SELECTOR, "#results .card")) == 11
        # And so do the images like one: more of them, at the address too.
        like = driver.find_elements(By.CSS_SELECTOR, "#results .card")[0].get_attribute("data-id")
        driver.get(f"{server}/?like={like}&k=5")
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "5 results for “images like"))
        driver.find_element(By.ID, "more").click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "10 results for “images like"))
        assert driver.current_url == f"{server}/?like={like}&k=10"
    finally:
        driver.quit()


def test_a_search_within_a_folder_or_a_glob(server, tmp_path):
    """The folder field: its folder's files or its glob's, kept in the address; a relative path, which
    means nothing to the server, is an error that says what to give."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser()
    try:
        driver.get(server + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "12 images indexed"))
        driver.find_element(By.ID, "query").send_keys("a red circle")
        driver.find_element(By.ID, "path").send_keys("*img000[0-2]*")
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "3 results for “a red circle” within *img000[0-2]*"))
        names = {card.text.split("\n")[-1] for card in driver.find_elements(By.CSS_SELECTOR, "#results .card")}
        assert names == {"img0000.jpg", "img0001.jpg", "img0002.jpg"}
        driver.refresh()  # the address holds the glob too
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "3 results for “a red circle” within"))
        assert driver.find_element(By.ID, "path").get_attribute("value") == "*img000[0-2]*"
        driver.find_elements(By.CSS_SELECTOR, "#results .card")[0].click()  # more like it, within the glob
        wait.until(ready.visibility_of_element_located((By.ID, "viewer")))
        driver.find_element(By.ID, "like").click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "2 results for “images like img000"))
        folder = driver.find_element(By.ID, "path")
        folder.clear()
        folder.send_keys(str(tmp_path / "photos"))  # a folder, no wildcard: the files under it
        query = driver.find_element(By.ID, "query")
        query.send_keys("a red circle")
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), f"12 results for “a red circle” within {tmp_path}"))
        folder.clear()
        folder.send_keys("photos")
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "Error: path must be an absolute glob"))
    finally:
        driver.quit()

