"""The README's screenshot of the page: ``fashionrec serve`` on 127.0.0.1, Debian's
Chromium (headless, driven by Selenium) showing an item's recommendations.

    python experiments/screenshot_page.py --run-dir experiments/out/serve/items-5k --item 709 --k 7
    python experiments/screenshot_page.py --run-dir runs/demo-catalog-csv --item 10300 --k 6 \
        --where 'gender == "Women" and price < 50' --out docs/serve-page-filter.png
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--item", default="5033")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--where", default=None, help="a filter typed into the page's Filter box")
    p.add_argument("--height", type=int, default=900, help="window height (px)")
    p.add_argument("--out", default=str(DOCS / "serve-page.png"))
    args = p.parse_args()
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "fashionrec", "serve", "--run-dir",
                               args.run_dir, "--host", "127.0.0.1", "--port", str(port)])
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(url + "/api/ready", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not become ready") from None
                time.sleep(0.3)
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        profile = tempfile.mkdtemp()
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run",
                     f"--window-size=1280,{args.height}", f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=webdriver.ChromeService(
            executable_path=shutil.which("chromedriver")), options=options)
        try:
            driver.get(f"{url}/#item={args.item}")
            k = driver.find_element(By.ID, "k")
            k.clear()
            k.send_keys(str(args.k))
            if args.where:
                where = driver.find_element(By.ID, "where")
                WebDriverWait(driver, 60).until(lambda d: where.is_displayed())
                where.send_keys(args.where)
            driver.find_element(By.ID, "find").click()
            if args.where:  # the filtered answer, not the first one the page showed
                WebDriverWait(driver, 60).until(lambda d: "Filter: " + args.where in
                                                d.find_element(By.ID, "query").text)
            WebDriverWait(driver, 60).until(lambda d: d.execute_script(
                "const i=[...document.querySelectorAll('#grid .card img')];"
                f"return i.length=={args.k} && i.every(x => x.complete && x.naturalWidth>0)"))
            time.sleep(0.5)
            driver.save_screenshot(args.out)
            print(f"screenshot: {args.out}")
        finally:
            driver.quit()
            shutil.rmtree(profile, ignore_errors=True)
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
