"""The browser viewer in a real browser: headless Chromium driven through WebDriver, once
as a phone and once as a tablet (device emulation: the viewport, pixel ratio, touch and a
mobile user agent).

The Rust harness (tests/browser_view.rs) starts a server with a DEMO licence, two users
with edit rights and one dish whose embryos have a 200-frame time-lapse at three focal
planes. For each device the user logs in, names the device, searches the patient, opens the
treatment and the dish (where the other user's edit redraws the grid), and an embryo; plays the time-lapse through at 25 frames/s; switches the
focal plane; adds an annotation; sees the other user's annotation arrive without a reload
(the other user works through HTTP from this script, as another browser would); and hits a
stale-version conflict, shown with the current value. A screenshot of each page is saved in
--shots (docs/web.md shows them). The figures (first frame, playback rate) are printed.
"""

import argparse
import json
import os
import re
import sys
import time
import warnings

import requests
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

PROFILES = {
    # A 6.1-inch phone and an 11-inch tablet, in CSS pixels.
    "phone": {"width": 390, "height": 844, "ratio": 3,
              "agent": "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 "
                       "(KHTML, like Gecko) Chrome/126.0 Mobile Safari/537.36"},
    "tablet": {"width": 820, "height": 1180, "ratio": 2,
               "agent": "Mozilla/5.0 (Linux; Android 14; Tablet) AppleWebKit/537.36 "
                        "(KHTML, like Gecko) Chrome/126.0 Safari/537.36"},
}


def fail(message):
    print(f"FAIL: {message}")
    sys.exit(1)


def expect(condition, message):
    if not condition:
        fail(message)
    print("ok:", message.split(":")[0])


class Other:
    """The other user, in another browser: the same pages and JSON, through HTTP."""

    def __init__(self, base, user, password, embryo):
        warnings.filterwarnings("ignore")
        self.base, self.embryo = base, embryo
        self.http = requests.Session()
        # The server's certificate is self-signed. (Per request: a session's verify=False
        # loses to REQUESTS_CA_BUNDLE in the environment.)
        self.http.request = self._unverified(self.http.request)
        r = self.http.post(f"{base}/view/login", data={"username": user, "password": password})
        device = self.http.get(f"{base}/view/device")
        csrf = re.search(r"name=csrf value='([0-9a-f]+)'", device.text).group(1)
        r = self.http.post(f"{base}/view/device", data={"csrf": csrf, "name": "Other browser"})
        page = self.http.get(f"{base}/view/embryo", params={"id": embryo})
        if page.status_code != 200:
            fail(f"the other user's embryo page: {page.status_code} {page.text[:300]}")
        self.csrf = re.search(r"data-csrf='([0-9a-f]+)'", page.text).group(1)

    @staticmethod
    def _unverified(request):
        def call(*args, **kwargs):
            kwargs["verify"] = False
            return request(*args, **kwargs)
        return call

    def embryo_json(self):
        return self.http.get(f"{self.base}/view/embryo.json", params={"id": self.embryo}).json()

    def annotate(self, name, at_ms, annotation_id=None):
        read = self.embryo_json()
        body = {"embryo_id": self.embryo, "version": read["version"], "name": name,
                "value": "", "event_at_ms": at_ms}
        if annotation_id is not None:
            body["annotation_id"] = annotation_id
        r = self.http.post(f"{self.base}/view/annotate", data=json.dumps(body),
                           headers={"content-type": "application/json",
                                    "x-csrf-token": self.csrf})
        if r.status_code != 200:
            fail(f"the other user's annotation: {r.status_code} {r.text[:300]}")
        return r.json()


def walk(args, name, profile, mine, theirs, noted, figures):
    options = Options()
    options.binary_location = args.chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 # The server's certificate is self-signed (the test pins nothing here).
                 "--ignore-certificate-errors"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(args.chromedriver), options=options)
    wait = WebDriverWait(driver, 30)

    def emulate(height=None, ratio=None):
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": profile["width"], "height": height or profile["height"],
            "deviceScaleFactor": ratio or profile["ratio"], "mobile": True})

    emulate()
    driver.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": True})
    driver.execute_cdp_cmd("Emulation.setUserAgentOverride", {"userAgent": profile["agent"]})

    def shot(page):
        # The whole page at one pixel per CSS pixel (small files), then the device again.
        height = driver.execute_script("return document.documentElement.scrollHeight")
        emulate(min(max(height, 400), 4000), 1)
        time.sleep(0.2)
        driver.save_screenshot(os.path.join(args.shots, f"view-{page}-{name}.png"))
        emulate()

    def present(css):
        return wait.until(lambda d: d.find_element(By.CSS_SELECTOR, css))

    def js(script):
        return driver.execute_script(script)

    try:
        driver.get(f"{args.base}/view/login")
        width = js("return window.innerWidth")
        expect(width == profile["width"], f"{name}: the viewport is {profile['width']} wide ({width})")
        present("#username").send_keys(args.user)
        driver.find_element(By.ID, "password").send_keys(args.password)
        shot("login")
        driver.find_element(By.ID, "login").click()
        present("#device-name").send_keys(f"Anna's {name}")
        shot("device")
        driver.find_element(By.ID, "register").click()
        present("#search").send_keys(args.patient)
        driver.find_element(By.ID, "find").click()
        wait.until(lambda d: "q=" in d.current_url)
        present("#patients li.patient")
        patients = driver.find_elements(By.CSS_SELECTOR, "#patients li.patient")
        expect(len(patients) == 1 and args.patient in patients[0].text,
               f"{name}: the search finds the patient: {[p.text for p in patients]}")
        scroll = js("return document.documentElement.scrollWidth")
        expect(scroll <= profile["width"], f"{name}: no sideways scrolling ({scroll} px)")
        shot("patients")
        driver.find_element(By.CSS_SELECTOR, "a.treatment").click()
        present("#dishes li.dish a")
        shot("treatment")
        driver.find_element(By.CSS_SELECTOR, "#dishes li.dish a").click()
        present("#grid .embryo")
        wait.until(lambda d: d.execute_script(
            "return Array.from(document.querySelectorAll('#grid img')).every("
            "function(i){return i.complete && i.naturalWidth > 0;})"))
        cells = driver.find_elements(By.CSS_SELECTOR, "#grid .embryo")
        expect(len(cells) == 3, f"{name}: the dish grid shows its 3 embryos")
        shot("dish")
        # The other user annotates the first embryo: its cell is redrawn without a reload.
        embryo = cells[0].get_attribute("data-embryo")
        other = Other(args.base, args.other, args.password, embryo)
        other.annotate(noted, other.embryo_json()["acquisitions"][10]["at"])
        wait.until(lambda d: "Updated" in d.find_element(By.ID, "live").text)
        wait.until(lambda d: noted in d.execute_script(
            "return document.querySelector('#grid .embryo .timings').textContent"))
        expect(True, f"{name}: the dish grid shows the other user's edit live")

        # The embryo: the latest frame first, then the whole time-lapse at 25 frames/s.
        driver.find_element(By.CSS_SELECTOR, "#grid .embryo a.open").click()
        present("#player")
        wait.until(lambda d: d.execute_script("return window.esPlayer && window.esPlayer.stats.firstFrameMs !== null"))
        first_ms = js("return window.esPlayer.stats.firstFrameMs")
        frames = js("return window.esPlayer.state.frames.length")
        expect(frames == 200, f"{name}: the time-lapse has 200 frames ({frames})")
        expect(driver.find_element(By.ID, "player").get_attribute("data-embryo") == embryo,
               f"{name}: the first embryo's page")
        shot("embryo")
        Select(driver.find_element(By.ID, "speed")).select_by_value("25")
        driver.find_element(By.ID, "play").click()
        WebDriverWait(driver, 120).until(lambda d: d.execute_script(
            "return window.esPlayer.stats.playFps !== null"))
        played = js("return window.esPlayer.stats")
        expect(played["playShown"] >= 199 and js("return window.esPlayer.state.index") == 199,
               f"{name}: the time-lapse played through: {played}")
        figures[name] = {"first_frame_ms": round(first_ms), "fps": round(played["playFps"], 1),
                         "stalls": played["stalls"]}
        expect("End of the time-lapse" in driver.find_element(By.ID, "status").text,
               f"{name}: the end is shown")

        # Another focal plane, same moment.
        Select(driver.find_element(By.ID, "plane")).select_by_value("15")
        wait.until(lambda d: "plane=15" in d.find_element(By.ID, "frame").get_attribute("src"))
        wait.until(lambda d: d.execute_script(
            "var i=document.getElementById('frame');return i.complete && i.naturalWidth>0"))
        expect("plane 15" in driver.find_element(By.ID, "when").text, f"{name}: the plane switched")
        driver.find_element(By.ID, "back").click()
        wait.until(lambda d: "frame 199 of 200" in d.find_element(By.ID, "when").text)
        expect(True, f"{name}: a step back")

        # An annotation of mine at this frame.
        driver.find_element(By.ID, "annotation-name").send_keys(mine)
        driver.find_element(By.ID, "save").click()
        wait.until(lambda d: f"Saved {mine}" in d.find_element(By.ID, "message").text)
        # In one script call: the live updates re-render the table at any moment.
        rows = lambda: js("return Array.from(document.querySelectorAll('#annotations tbody tr'))"
                          ".map(function(r){return r.innerText;})")
        expect(any(r.startswith(mine) and "anna" in r for r in rows()), f"{name}: my annotation is listed")
        # Changing it starts from its own frame, not the one on screen: move away first.
        Select(driver.find_element(By.ID, "plane")).select_by_value("0")
        driver.find_element(By.ID, "next").click()
        mine_hours = js("var a=window.esPlayer.state.embryo.annotations.filter(function(a){"
                        f"return a.name==='{mine}';}}).pop(); return a.hours.toFixed(1)")
        js("Array.from(document.querySelectorAll('#annotations tbody tr')).filter(function(r){"
           f"return r.cells[0].textContent==='{mine}';}})[0].querySelector('button.change').click()")
        wait.until(lambda d: d.find_element(By.ID, "at-hours").text == f"{mine_hours} h")
        expect(driver.find_element(By.ID, "annotation-at-frame").is_selected(),
               f"{name}: Change goes to the annotation's own frame ({mine_hours} h)")
        driver.find_element(By.ID, "cancel-change").click()

        # The other user's annotation arrives without a reload.
        at = js("return window.esPlayer.state.frames[120].at")
        theirs_saved = other.annotate(theirs, at)
        wait.until(lambda d: any(r.startswith(theirs) and args.other in r for r in rows()))
        expect("Updated" in driver.find_element(By.ID, "live").text,
               f"{name}: the other user's edit arrived live")

        # A stale version: I start an entry, the other user changes theirs meanwhile, I save.
        driver.find_element(By.ID, "annotation-name").send_keys(theirs)
        updates = js("return window.esPlayer.stats.updates")
        their_id = [a for a in theirs_saved["annotations"] if a["name"] == theirs][0]["annotation_id"]
        other.annotate(theirs, at + 600_000, annotation_id=their_id)
        wait.until(lambda d: d.execute_script("return window.esPlayer.stats.updates") > updates)
        driver.find_element(By.ID, "save").click()
        wait.until(lambda d: "Not saved" in d.find_element(By.ID, "message").text)
        message = driver.find_element(By.ID, "message").text
        their_hours = (at + 600_000 - js("return window.esPlayer.state.insemination")) / 3_600_000
        expect(f"{theirs} is now at {their_hours:.1f} h set by {args.other}" in message
               and "conflict" in driver.find_element(By.ID, "message").get_attribute("class"),
               f"{name}: the conflict is shown with the current value: {message}")
        shot("conflict")
        # Script errors only: the 412 above is a network "error" the page expects.
        errors = [e for e in driver.get_log("browser")
                  if e.get("level") == "SEVERE" and e.get("source") != "network"]
        expect(not errors, f"{name}: no script errors: {errors}")
    finally:
        driver.quit()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--other", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--patient", required=True)
    parser.add_argument("--shots", required=True)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = parser.parse_args()
    os.makedirs(args.shots, exist_ok=True)
    figures = {}
    walk(args, "phone", PROFILES["phone"], "t2", "t3", "tPNf", figures)
    walk(args, "tablet", PROFILES["tablet"], "t4", "t5", "t8", figures)
    print("figures:", json.dumps(figures))
    print("PASS: all checks passed")


if __name__ == "__main__":
    main()
