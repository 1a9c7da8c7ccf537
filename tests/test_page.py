"""The web page in a real browser: Debian's Chromium driven by Selenium, against
``fashionrec serve`` started on 127.0.0.1. Skipped where Chromium or its driver is
missing, unless FASHIONREC_REQUIRE_BROWSER=1 (CI sets it, after installing them)."""

import os
import shutil

import numpy as np
import pytest
from serving import fashionrec_serve

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (BROWSER and DRIVER):
    if os.environ.get("FASHIONREC_REQUIRE_BROWSER") == "1":
        pytest.fail("Chromium and chromedriver are required (apt-get install chromium "
                    "chromium-driver)", pytrace=False)
    pytest.skip("Chromium or chromedriver is not installed", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

K = 5


@pytest.fixture
def server(trained_run, tmp_path):
    _, run_dir = trained_run
    yield from serve(run_dir, tmp_path / "run")


@pytest.fixture
def styles_server(tmp_path):
    """A styles.csv catalog with attributes (names, gender, price, ...), trained and
    served."""
    from catalogs import make_styles

    from fashionrec.cli import main

    rows = make_styles(tmp_path / "styles", n_per_class=8)
    assert main(["train", "--catalog", str(tmp_path / "styles/styles.csv"), "--label-column",
                 "articleType", "--image-size", "32", "--weights", "none", "--epochs", "2",
                 "--run-dir", str(tmp_path / "trained"), "--no-progress"]) == 0
    for url, run in serve(tmp_path / "trained", tmp_path / "run"):
        yield url, run, rows


def serve(run_dir, run):
    """``fashionrec serve`` of a copy of ``run_dir`` on 127.0.0.1: yields ``(url, run)``
    once ready, then stops it cleanly."""
    shutil.copytree(run_dir, run)
    proc, url = fashionrec_serve(run)
    yield url, run
    proc.terminate()  # SIGTERM: a clean stop
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "fashionrec serve: stopped" in out


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER),
                              options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def cards(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#grid .card")


def card_ids(driver):
    return driver.execute_script(
        "return [...document.querySelectorAll('#grid .card .card-id')].map(e => e.textContent)")


def loaded_pictures(driver):
    """How many result pictures the browser actually decoded."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#grid .card img')]"
        ".filter(i => i.complete && i.naturalWidth > 0).length")


def wait_for_results(driver, k, timeout=60):
    WebDriverWait(driver, timeout).until(
        lambda d: len(cards(d)) == k and loaded_pictures(d) == k)


def test_the_page_searches_uploads_and_browses(server, browser, tmp_path):
    url, run = server
    from PIL import Image

    from fashionrec import Recommender

    rec = Recommender.load(run)
    expected = [i.id for i in rec.recommend(item=3, k=K).items]

    browser.get(url + "/")
    WebDriverWait(browser, 60).until(lambda d: len(cards(d)) > 0)  # a random item at first
    k_box = browser.find_element(By.ID, "k")
    k_box.clear()
    k_box.send_keys(str(K))
    item_box = browser.find_element(By.ID, "item-id")
    item_box.clear()
    item_box.send_keys("3")
    browser.find_element(By.ID, "find").click()
    WebDriverWait(browser, 60).until(lambda d: "item=3" in d.current_url)
    wait_for_results(browser, K)
    assert card_ids(browser) == [str(i) for i in expected]  # the library's answer, in order
    if os.environ.get("FASHIONREC_SCREENSHOT"):
        browser.save_screenshot(os.environ["FASHIONREC_SCREENSHOT"])

    # upload a photo (test image 30, not in the catalog)
    image, _ = rec.query_image(30)
    Image.fromarray(np.asarray(image, np.uint8)).save(tmp_path / "photo.png")
    browser.find_element(By.ID, "photo").send_keys(str(tmp_path / "photo.png"))
    photo_first = rec.recommend(str(tmp_path / "photo.png"), k=K).items[0].id
    WebDriverWait(browser, 60).until(
        lambda d: card_ids(d)[:1] == [str(photo_first)]
        and "predicted" in d.find_element(By.ID, "results").text.lower())
    wait_for_results(browser, K)

    # click a result: its own recommendations
    clicked = card_ids(browser)[1]
    cards(browser)[1].click()
    WebDriverWait(browser, 60).until(
        lambda d: d.current_url.endswith(f"#item={clicked}")
        and d.find_element(By.ID, "item-id").get_attribute("value") == clicked)
    wait_for_results(browser, K)
    assert card_ids(browser) == [str(i.id) for i in rec.recommend(item=int(clicked), k=K).items]

    # a bad id: a clear message, not a broken page
    item_box = browser.find_element(By.ID, "item-id")
    item_box.clear()
    item_box.send_keys("no-such-item")
    browser.find_element(By.ID, "find").click()
    WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.ID, "error").is_displayed()
        and "not in the catalog" in d.find_element(By.ID, "error").text)


def test_the_page_filters_by_attributes_and_shows_names(styles_server, browser):
    url, run, rows = styles_server
    from fashionrec import Recommender

    where = 'gender == "Women" and price < 50'
    expected = Recommender.load(run).recommend(item="103", k=4, where=where).items
    browser.get(url + "/#item=103")
    field = browser.find_element(By.ID, "where")
    WebDriverWait(browser, 60).until(lambda d: field.is_displayed())  # the catalog has attributes
    k_box = browser.find_element(By.ID, "k")
    k_box.clear()
    k_box.send_keys("4")
    field.send_keys(where)
    browser.find_element(By.ID, "find").click()
    WebDriverWait(browser, 60).until(
        lambda d: "Filter: " + where in d.find_element(By.ID, "query").text)
    wait_for_results(browser, 4)
    assert card_ids(browser) == [i.id for i in expected]
    by_id = {r["id"]: r for r in rows}
    names = browser.execute_script(
        "return [...document.querySelectorAll('#grid .card .card-name')].map(e => e.textContent)")
    assert names == [by_id[i.id]["name"] for i in expected]  # the product's name as title
    lists = [c.find_element(By.CSS_SELECTOR, ".card-attrs").text.splitlines()
             for c in cards(browser)]
    for lines, item in zip(lists, expected, strict=True):  # the filter's attributes first
        assert lines[:2] == ["gender: Women", f"price: {float(by_id[item.id]['price']):g}"]
    if os.environ.get("FASHIONREC_SCREENSHOT_FILTER"):
        browser.save_screenshot(os.environ["FASHIONREC_SCREENSHOT_FILTER"])
    field.clear()
    field.send_keys("colour == \"Red\"")
    browser.find_element(By.ID, "find").click()
    WebDriverWait(browser, 60).until(
        lambda d: "unknown attribute 'colour'" in d.find_element(By.ID, "error").text)
