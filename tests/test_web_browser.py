"""The web demo in a real browser (headless Chromium): the page comes up offline, an uploaded image
and a typed prompt give the drawn picture and the detections table, an empty prompt gives a message
on the page and the server keeps answering. A screenshot is left in output/web_demo/."""

import socket
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from glipv2_d2.engine.predictor import GLIPv2Predictor
from glipv2_d2.web.app import build_app, launch_app
from glipv2_d2.web.defaults import ModelChoice
from glipv2_d2.web.session import DemoSession

from .browser import missing_browser, requested_urls, save_screenshot, start_chromium
from .tiny_model import tiny_cfg

SCREENSHOT = Path(__file__).resolve().parents[1] / "output" / "web_demo" / "browser_test.png"
LOCAL_HOSTS = {"127.0.0.1", "localhost"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def page_url(single_thread):
    session = DemoSession(lambda: GLIPv2Predictor(tiny_cfg()))
    session.start()
    app = build_app(session, ModelChoice("tiny", note="Tiny untrained test model."), ["astronaut"])
    port = free_port()
    launch_app(app, "127.0.0.1", port, block=False)
    assert session.wait_until_loaded(120) and session.ready, session.status()
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="module")
def browser():
    assert not missing_browser(), missing_browser()
    driver = start_chromium()
    yield driver
    driver.quit()


def type_prompt(driver, text: str) -> None:
    """Typed as a person would: select all, delete, type (Selenium's clear() sends no input event,
    so the page would keep the old prompt)."""
    box = driver.find_element(By.CSS_SELECTOR, "#prompt textarea")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    box.send_keys(text)


def run_and_wait(driver, condition) -> None:
    driver.find_element(By.CSS_SELECTOR, "#run").click()
    WebDriverWait(driver, 45).until(condition)


def test_upload_prompt_submit_shows_picture_and_table_offline(page_url, browser, tmp_path):
    photo = tmp_path / "shapes.png"
    pixels = np.full((120, 160, 3), 230, np.uint8)
    pixels[20:70, 30:80] = (220, 30, 30)
    Image.fromarray(pixels).save(photo)
    browser.get(page_url)
    WebDriverWait(browser, 60).until(ec.text_to_be_present_in_element((By.ID, "status"), "Model loaded"))
    assert "Tiny untrained test model." in browser.find_element(By.ID, "note").text

    type_prompt(browser, "")
    run_and_wait(browser, ec.text_to_be_present_in_element((By.ID, "message"), "The prompt is empty"))

    browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(photo))
    WebDriverWait(browser, 20).until(ec.text_to_be_present_in_element((By.ID, "upload"), "shapes"))
    type_prompt(browser, "red square, blue circle")
    run_and_wait(browser, ec.text_to_be_present_in_element((By.ID, "message"), "detections at score"))
    WebDriverWait(browser, 20).until(ec.presence_of_element_located((By.CSS_SELECTOR, "#picture img")))
    picture = browser.find_element(By.CSS_SELECTOR, "#picture img")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", picture) >= 640
    table = browser.find_element(By.ID, "table").text
    assert "phrase" in table and "score" in table and ("red square" in table or "blue circle" in table)
    assert "person" not in table  # the previous prompt's phrases are gone
    assert "shapes" in browser.find_element(By.ID, "download").text
    save_screenshot(browser, SCREENSHOT)

    hosts = {urlparse(url).hostname for url in requested_urls(browser) if url.startswith("http")}
    assert hosts and hosts <= LOCAL_HOSTS, f"the page reached beyond this machine: {hosts - LOCAL_HOSTS}"
