"""The playground page (``GET /``) in a real headless browser: Debian's Chromium driven by Selenium,
against the real server with a tiny random-weights model (exits at layers 1 and 3 of 4) on a free
loopback port. A prompt is typed, Generate is clicked, and the coloured token spans must appear, one per
generated token, coloured by the exit each token left at; a screenshot goes to /tmp/ee_playground*.png.

Needs ``apt-get install -y chromium chromium-driver`` and ``pip install selenium``; skipped (with that
reason) where they are missing."""

import json
import os
import shutil
import tempfile
import urllib.request

import pytest

from megatron.testing.server import PROMPT  # ``served``: tests/conftest.py

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install selenium")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("Debian's chromium and chromium-driver are not installed: apt-get update && apt-get install -y "
                "chromium chromium-driver", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

TOKENS = 12
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1100,800")


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="ee-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS + (f"--user-data-dir={profile}",):
        options.add_argument(flag)
    # an explicit driver path: Selenium Manager would otherwise try to download one
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _api(srv, body):
    req = urllib.request.Request(srv.url + "/api", data=json.dumps(body).encode(), method="PUT")
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def _submit(driver, srv, mode, until="done", **fields):
    driver.get(srv.url + "/")
    wait = WebDriverWait(driver, 30)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#legend .legend-item"))  # /health answered
    prompt = driver.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(PROMPT)
    Select(driver.find_element(By.ID, "mode")).select_by_value(mode)
    for element_id, value in fields.items():
        box = driver.find_element(By.ID, element_id)
        box.clear()
        box.send_keys(str(value))
    driver.find_element(By.ID, "generate").click()
    if until == "done":
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "done"))
    else:
        wait.until(lambda d: d.find_element(By.ID, "error").text)
    return driver.find_elements(By.CSS_SELECTOR, "#output span.tok")


@pytest.mark.parametrize("mode, fields", [("early_exit", {"threshold": 0.5}), ("speculative", {"spec-tokens": 3})])
def test_generated_tokens_appear_coloured_by_exit(served, browser, mode, fields):
    body = {"prompts": [PROMPT], "tokens_to_generate": TOKENS, "decoding": mode}
    if mode == "early_exit":
        body["early_exit_thres"] = fields["threshold"]
    else:
        body["num_speculative_tokens"] = fields["spec-tokens"]
    want = _api(served, body)["exit_layers"][0]
    assert len(want) == TOKENS  # the prompt was chosen so that the random model never stops early
    assert 4 in want and len(set(want)) >= 2  # tokens at an exit and at full depth: both colourings shown

    spans = _submit(browser, served, mode, tokens=TOKENS, **fields)
    assert len(spans) == TOKENS
    assert [int(s.get_attribute("data-exit")) for s in spans] == want
    colours = {}
    for span, layer in zip(spans, want):
        colours.setdefault(layer, set()).add(span.value_of_css_property("background-color"))
    assert all(len(c) == 1 for c in colours.values())  # one colour per exit layer
    assert len({next(iter(c)) for c in colours.values()}) == len(colours)  # and different exits differ
    legend = [e.get_attribute("data-exit") for e in browser.find_elements(By.CSS_SELECTOR, "#legend .legend-item")]
    assert legend == ["1", "3", "4"]
    stats = browser.find_element(By.ID, "stats").text
    assert "tokens/s" in stats and "share of tokens per exit" in stats
    if mode == "speculative":
        assert "acceptance rate" in browser.find_element(By.ID, "acceptance").text
    path = os.path.join(tempfile.gettempdir(), f"ee_playground_{mode}.png")
    assert browser.save_screenshot(path) and os.path.getsize(path) > 0


def test_bad_request_shows_the_server_error(served, browser):
    assert _submit(browser, served, "full", until="error", tokens=70) == []  # over the model's 64 positions
    error = browser.find_element(By.ID, "error").text
    assert "64 positions" in error and "field tokens_to_generate" in error
