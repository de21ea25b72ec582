"""The web interface in a real browser: headless Chromium driven through WebDriver
(selenium and Debian's chromium-driver, installed by scripts/test.sh).

The Rust harness starts a server without a licence, uploads images from one incubator that
then disconnects (and later fails a HELLO with a wrong secret), and keeps three
EmbryoScope+ connected. An administrator then walks every part of the interface: logs in,
sees the header and the invalid licence, installs a basic licence by choosing its file (it
is over its limit with three EmbryoScope+ connected, and says so), and checks the
dashboard's licence card and over-limit banner, the incubators table (three connected, one
disconnected with its last image, today's images and its refusal), the storage card
(disk, growth, days left), viewers, monitoring and warnings; then the Warnings, Audit
trail, Instruments (rename), Users (add) and Licence pages. A screenshot of each page is
saved in --shots (docs/web.md shows them).
"""

import argparse
import os
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


def expect(condition, message):
    if not condition:
        fail(message)
    print("ok:", message.split(":")[0])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--license", required=True, help="a valid basic licence file")
    parser.add_argument("--connected", required=True, help="serials connected, comma-separated")
    parser.add_argument("--gone", required=True, help="the serial that disconnected")
    parser.add_argument("--server-id", required=True)
    parser.add_argument("--fingerprint", required=True)
    parser.add_argument("--shots", required=True, help="directory for the screenshots")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = parser.parse_args()
    connected = args.connected.split(",")
    os.makedirs(args.shots, exist_ok=True)

    options = Options()
    options.binary_location = args.chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        # The server's certificate is self-signed (the test pins nothing in the browser).
        "--ignore-certificate-errors",
        "--window-size=1280,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(args.chromedriver), options=options)
    wait = WebDriverWait(driver, 30)

    def shot(name):
        # The whole page, not only the window.
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": 1280, "height": min(max(height, 600), 6000),
            "deviceScaleFactor": 1, "mobile": False})
        path = os.path.join(args.shots, f"{name}.png")
        driver.save_screenshot(path)
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        print(f"screenshot: {path}")

    def text_of(element_id):
        return driver.find_element(By.ID, element_id).text

    try:
        driver.get(args.base + "/")
        wait.until(ec.presence_of_element_located((By.ID, "username")))
        expect(driver.current_url.endswith("/login"), f"sent to the login page: {driver.current_url}")
        shot("login")
        driver.find_element(By.ID, "username").send_keys(args.user)
        driver.find_element(By.ID, "password").send_keys(args.password)
        driver.find_element(By.ID, "login").click()
        state = wait.until(ec.presence_of_element_located((By.ID, "license-state")))
        expect("licence invalid" in state.text, f"the licence is invalid before: {state.text!r}")

        # The header: product, version, server id, uptime, data directory, fingerprint.
        server = text_of("server")
        expect("esserver " in server and "Up for" in server, f"product, version, uptime: {server!r}")
        expect(text_of("server-id") == args.server_id, f"server id: {text_of('server-id')!r}")
        expect(text_of("fingerprint") == args.fingerprint, f"fingerprint: {text_of('fingerprint')!r}")
        expect("Data directory" in server, f"data directory: {server!r}")
        refresh = driver.find_elements(By.CSS_SELECTOR, "meta[http-equiv=refresh]")
        expect(len(refresh) == 1, "the status page refreshes itself")

        # Install the licence by choosing its file; it is over its limit and says so.
        driver.get(args.base + "/license")
        expect(
            not driver.find_elements(By.CSS_SELECTOR, "meta[http-equiv=refresh]"),
            "the licence form does not refresh away what is typed",
        )
        chooser = wait.until(ec.presence_of_element_located((By.ID, "file")))
        chooser.send_keys(args.license)
        wait.until(lambda d: d.find_element(By.ID, "license-text").get_attribute("value"))
        driver.find_element(By.ID, "install-button").click()
        result = wait.until(ec.presence_of_element_located((By.ID, "result")))
        expect("installed; it applies now" in result.text, f"installed: {result.text!r}")
        warning = text_of("over-limit")
        expect("exceed the licence's basic configuration" in warning, f"install warns: {warning!r}")
        license_table = text_of("license")
        expect("days left" in license_table or "never" in license_table,
               f"licence page: validity: {license_table!r}")
        expect(args.server_id in driver.page_source, "licence page: the server id to order a licence")
        shot("license")

        # The dashboard once every incubator is as the harness left it.
        deadline = time.time() + 30
        while True:
            driver.get(args.base + "/")
            wait.until(ec.presence_of_element_located((By.ID, "incubators")))
            rows = {
                row.get_attribute("id")[len("incubator-"):]: row.text
                for row in driver.find_elements(By.CSS_SELECTOR, "#incubators tr[id^=incubator-]")
            }
            ready = all("connected" in rows.get(s, "") and "disconnected" not in rows.get(s, "")
                        for s in connected)
            ready = ready and "disconnected" in rows.get(args.gone, "")
            ready = ready and "auth_failed" in rows.get(args.gone, "")
            if ready:
                break
            if time.time() > deadline:
                fail(f"incubators: {rows!r}")
            time.sleep(0.5)
        expect(len(rows) == len(connected) + 1, f"every incubator ever seen is listed: {rows!r}")
        gone = rows[args.gone]
        expect("UTC" in gone.split("last seen")[-1], f"the disconnected one: last image time: {gone!r}")
        expect(" 12 " in f" {gone} ", f"the disconnected one: 12 images today: {gone!r}")
        for serial in connected:
            expect("never" in rows[serial], f"{serial}: no image yet: {rows[serial]!r}")

        glance = text_of("glance")
        expect("basic licence, 19 days left" in glance or "basic licence, 20 days left" in glance,
               f"at a glance: licence: {glance!r}")
        expect("3 incubator(s) connected, 1 disconnected" in glance, f"at a glance: incubators: {glance!r}")
        expect("% used" in glance and "warning(s) since the start" in glance, f"at a glance: {glance!r}")
        state = text_of("license-state")
        expect("basic configuration" in state and "days left" in state, f"licence card: {state!r}")
        expect("expires within 30 days" in text_of("license-expiring"),
               f"expiry warning: {text_of('license-expiring')!r}")
        banner = text_of("over-limit")
        expect("Over the licence" in banner and "6 of 2 capacity units" in banner,
               f"over-limit banner: {banner!r}")
        expect("6 of 2 used" in text_of("capacity"), f"capacity: {text_of('capacity')!r}")
        disk = text_of("disk")
        expect("GiB used of" in disk and "%" in disk and "GiB free" in disk, f"disk: {disk!r}")
        growth = text_of("growth")
        expect("GiB/day (today so far)" in growth and "days left" in growth, f"growth: {growth!r}")
        expected = text_of("growth-expected")
        expect("for the 4 instrument(s) enrolled" in expected and "days left" in expected,
               f"expected growth: {expected!r}")
        expect("No viewer is logged in." in text_of("viewers"), "viewers: empty says so")
        expect("records" in text_of("ims-queue"), f"monitoring: {text_of('ims-queue')!r}")
        expect("presented a wrong secret" in text_of("warnings"),
               f"warnings: the refused HELLO: {text_of('warnings')!r}")
        shot("status")

        driver.find_element(By.LINK_TEXT, "Warnings").click()
        wait.until(ec.presence_of_element_located((By.ID, "warnings-count")))
        expect("presented a wrong secret" in text_of("warnings"), "warnings page: the refused HELLO")
        expect("exceed the licence" in text_of("warnings"), "warnings page: the over-limit warning")
        shot("warnings")

        driver.find_element(By.LINK_TEXT, "Audit trail").click()
        audit = wait.until(ec.presence_of_element_located((By.ID, "audit"))).text
        expect("user.login" in audit, f"audit trail: the login: {audit!r}")

        # Rename an instrument: only the name shown changes.
        driver.find_element(By.LINK_TEXT, "Instruments").click()
        wait.until(ec.presence_of_element_located((By.ID, "instruments")))
        expect("Open" in text_of("enrolment"), f"enrolment mode: {text_of('enrolment')!r}")
        name_box = driver.find_element(
            By.XPATH, f"//input[@name='serial' and @value='{connected[0]}']/following-sibling::input[@name='name']")
        name_box.clear()
        name_box.send_keys("Incubator A (lab 2)")
        name_box.find_element(By.XPATH, "following-sibling::button").click()
        result = wait.until(ec.presence_of_element_located((By.ID, "result")))
        expect("is now shown as" in result.text, f"renamed: {result.text!r}")
        expect("Incubator A (lab 2)" in text_of("instruments"), "the new name is listed")
        shot("instruments")

        driver.find_element(By.LINK_TEXT, "Audit trail").click()
        audit = wait.until(ec.presence_of_element_located((By.ID, "audit"))).text
        expect("instrument.rename" in audit, f"audit trail: the rename: {audit!r}")
        shot("audit")

        driver.find_element(By.LINK_TEXT, "Users").click()
        wait.until(ec.presence_of_element_located((By.ID, "add-user")))
        driver.find_element(By.ID, "new-name").send_keys("embryologist1")
        driver.find_element(By.ID, "new-password").send_keys("Culture-2026!")
        driver.find_element(By.ID, "add-button").click()
        result = wait.until(ec.presence_of_element_located((By.ID, "result")))
        expect("embryologist1" in result.text and result.get_attribute("class") == "ok",
               f"user added: {result.text!r}")
        expect("embryologist1" in text_of("users"), "the new user is listed")
        shot("users")
        print("PASS: all checks passed")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
