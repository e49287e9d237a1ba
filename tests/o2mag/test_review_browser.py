"""The review page in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
driven by selenium through the system chromedriver; nothing is downloaded): the grid shows every
sample with its mask outlined, a click and a key press reject, the counts follow, and the manifest
says so after a server restart. With ``O2MAG_SCREENSHOTS=DIR`` the screenshots are also written
there (how ``docs/review-*.png`` were made)."""
import os
import shutil
import threading
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
if not CHROMIUM.exists():
    pytest.skip("no /usr/bin/chromium (Debian package 'chromium'; .ci/run installs it)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from o2mag.cli import main  # noqa: E402
from o2mag.curation.server import create_app, serve  # noqa: E402
from o2mag.runs.store import complete_samples  # noqa: E402

CAT, DEF = "synthetic_surface", "scratch"
N = 6
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,900"]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "out"
    assert main(["generate", "--out", str(out), "--num", str(N), "--steps", "2", "--ago-steps", "1",
                 "--quiet"]) == 0
    shutil.rmtree(out / ".o2mag-cache")
    return out


class Server:
    def __init__(self, out):
        self.server = serve(create_app(out), "127.0.0.1", 0)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def browser(tmp_path):
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _open(driver, url):
    driver.get(url)
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    wait.until(lambda d: all(c.get_attribute("data-drawn") == "1" for c in d.find_elements(By.CSS_SELECTOR, "canvas")))
    wait.until(lambda d: d.execute_script("const i = document.querySelector('.reference img'); "
                                          "return i.complete && i.naturalWidth > 0"))


def _cards(driver):
    return driver.find_elements(By.CSS_SELECTOR, ".card")


def _card(driver, index):
    return driver.find_element(By.CSS_SELECTOR, f'.card[data-index="{index}"]')


def _shot(driver, tmp_path, name):
    path = tmp_path / name
    assert driver.save_screenshot(str(path))
    target = os.environ.get("O2MAG_SCREENSHOTS")
    if target:
        shutil.copy(path, Path(target) / name)
    return path


def test_the_page_reviews_by_click_and_key_and_the_manifest_keeps_it(out, browser, tmp_path):
    server = Server(out)
    try:
        _open(browser, server.url)
        cards = _cards(browser)
        assert sorted(int(c.get_attribute("data-index")) for c in cards) == list(range(N))
        # the target mask is outlined in red on the canvas (pixels read from the page itself)
        red = browser.execute_script("""
            const c = document.querySelector('.card[data-index="0"] canvas');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0; for (let k = 0; k < d.length; k += 4) if (d[k] == 255 && d[k+1] == 40 && d[k+2] == 40) n++;
            return n;""")
        assert red > 10
        _shot(browser, tmp_path, "review-page.png")

        # a click rejects sample 0
        _card(browser, 0).find_element(By.CSS_SELECTOR, "button.reject").click()
        WebDriverWait(browser, 30).until(lambda d: _card(d, 0).get_attribute("data-review") == "rejected")
        # a key press rejects sample 1, the focus moves on, and "a" accepts sample 2
        _card(browser, 1).click()
        browser.switch_to.active_element.send_keys("r")
        WebDriverWait(browser, 30).until(lambda d: _card(d, 1).get_attribute("data-review") == "rejected")
        WebDriverWait(browser, 30).until(lambda d: d.switch_to.active_element.get_attribute("data-index") == "2")
        browser.switch_to.active_element.send_keys("a")
        WebDriverWait(browser, 30).until(lambda d: _card(d, 2).get_attribute("data-review") == "accepted")
        counts = browser.find_element(By.CSS_SELECTOR, ".folder .counts").text
        assert counts == f"accepted 1 · rejected 2 · unreviewed {N - 3}"
        _shot(browser, tmp_path, "review-decisions.png")
    finally:
        server.stop()

    reviews = {i: rec.get("review") for i, _, _, rec in complete_samples(out / CAT / DEF)}
    assert reviews == {0: "rejected", 1: "rejected", 2: "accepted", **{i: None for i in range(3, N)}}

    server = Server(out)  # a restart: the page shows the saved decisions
    try:
        _open(browser, server.url)
        assert {int(c.get_attribute("data-index")): c.get_attribute("data-review") for c in _cards(browser)} == \
            {0: "rejected", 1: "rejected", 2: "accepted", **{i: "" for i in range(3, N)}}
        Select(browser.find_element(By.ID, "show")).select_by_value("rejected")
        assert sorted(int(c.get_attribute("data-index")) for c in _cards(browser)) == [0, 1]
        Select(browser.find_element(By.ID, "show")).select_by_value("all")
        Select(browser.find_element(By.ID, "sort")).select_by_value("score-desc")
        scores = [float(c.find_element(By.CSS_SELECTOR, ".score").text.split()[1]) for c in _cards(browser)]
        assert scores == sorted(scores, reverse=True) and len(scores) == N
    finally:
        server.stop()


def test_the_reference_shown_is_the_focused_samples_own(out, browser):
    """o2mag dataset folders use reference i mod R: the panel follows the focused sample."""
    server = Server(out)
    try:
        _open(browser, server.url)
        src = lambda d: d.find_element(By.CSS_SELECTOR, ".reference img").get_attribute("src")  # noqa: E731
        assert src(browser).endswith(f"/api/samples/{CAT}/{DEF}/0/reference.png")
        _card(browser, 3).click()
        WebDriverWait(browser, 30).until(lambda d: src(d).endswith(f"/api/samples/{CAT}/{DEF}/3/reference.png"))
        assert browser.find_element(By.CSS_SELECTOR, ".reference .caption").text == "reference of #003"
    finally:
        server.stop()
