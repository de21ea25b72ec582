"""The web interface in a real browser: headless Chromium driven through WebDriver
(selenium and Debian's chromium-driver, installed by scripts/test.sh).

An administrator logs in, sees the dashboard say the licence is invalid, installs a licence
by choosing its file in the licence form, sees the dashboard show the licensed
configuration, and sees a simulated incubator appear (the Rust harness connects it while this
runs). A screenshot of the dashboard is saved as the test's artefact.
"""

import argparse
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait


def fail(message):
    print(f"FAIL: {message}")
    sys.exit(1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--license", required=True, help="a valid licence file")
    parser.add_argument("--serial", required=True, help="the incubator that connects")
    parser.add_argument("--screenshot", required=True)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = parser.parse_args()

    options = Options()
    options.binary_location = args.chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        # The server's certificate is self-signed (the test pins nothing in the browser).
        "--ignore-certificate-errors",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(args.chromedriver), options=options)
    wait = WebDriverWait(driver, 30)
    try:
        driver.get(args.base + "/")
        wait.until(ec.presence_of_element_located((By.ID, "username")))
        if not driver.current_url.endswith("/login"):
            fail(f"not sent to the login page: {driver.current_url}")
        driver.find_element(By.ID, "username").send_keys(args.user)
        driver.find_element(By.ID, "password").send_keys(args.password)
        driver.find_element(By.ID, "login").click()
        state = wait.until(ec.presence_of_element_located((By.ID, "license-state")))
        if "licence invalid" not in state.text:
            fail(f"the dashboard should say the licence is invalid: {state.text!r}")
        print("dashboard before:", state.text)

        driver.get(args.base + "/license")
        chooser = wait.until(ec.presence_of_element_located((By.ID, "file")))
        chooser.send_keys(args.license)
        wait.until(lambda d: d.find_element(By.ID, "license-text").get_attribute("value"))
        driver.find_element(By.ID, "install-button").click()
        result = wait.until(ec.presence_of_element_located((By.ID, "result")))
        if "installed; it applies now" not in result.text:
            fail(f"the licence was not installed: {result.text!r}")
        print("install:", result.text)

        deadline = time.time() + 30
        while True:
            driver.get(args.base + "/")
            state = wait.until(ec.presence_of_element_located((By.ID, "license-state")))
            incubators = driver.find_element(By.ID, "incubators").text
            if "configuration, licence" in state.text and args.serial in incubators:
                break
            if time.time() > deadline:
                fail(f"dashboard: {state.text!r}, incubators: {incubators!r}")
            time.sleep(0.5)
        print("dashboard after:", state.text, "|", incubators.replace("\n", " / "))
        driver.save_screenshot(args.screenshot)
        print(f"screenshot: {args.screenshot}")
        print("PASS: all checks passed")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
