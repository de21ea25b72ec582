#!/usr/bin/env python3
"""The original Public API, answer for answer, as the field (EMR and data-warehouse) clients
read it.

Python `requests`, certificate verification off (the server's certificate is self-signed),
the login token in the `API-token` header, a new login whenever a call answers 401, and
back-off on 503. It replays every call of the original's recorded answers
(docs/api-compat.md, "answer for answer") the way an extraction does:

    LOGIN -> patients -> TREATMENT -> embryoID -> embryodata -> embryodetails, embryofate,
    evaluation, fertilizationtime -> imageruns -> image -> allimages -> IDASCORE (no
    parameters: every scored embryo) -> transfers -> ongoingpatients

and checks each field's name, JSON type and format: identifiers as text in the original's
formats (`PatientIDx` = `<site>_<serial day>`, `EmbryoID` = `D<date>_S<5 digits>_I<number>_P-<well>`,
`EmbryoDescriptionID` a label such as `AA1`), local times in the clinic's zone
(`yyyy.mm.dd HH:MM:SS`), dates `yyyy.mm.dd` or null, hours as numbers, a timing annotation's
value as a spreadsheet serial day, and the status codes (401 then a new login, 400 with a
text reason, 204). Every identifier is compared with what the REST API shows.

Then it loads the answers into a typed local database (SQLite STRICT tables, PatientIDx
unique) as an extraction does, twice: the second load must add no row.

Usage:
    api_compat_walk.py --base https://127.0.0.1:PORT --user USER --password PASSWORD \
        --reader WEB --site NEXTGEN --time-zone Europe/Copenhagen --database FILE

USER needs the edit right: before the walk, a setup step writes scores, a fate and a transfer
through the REST API (/api/v1) so that IDASCORE, Evaluation, EmbryoFate and transfers have
content. The walk itself logs in as READER (any case: the original's `Web` account is logged
in as `WEB`) and uses only the original calls.

Prints `PASS: all checks passed` and exits 0 when every check passes; otherwise prints what
failed and exits 1.
"""

from __future__ import annotations

import argparse
import datetime
import io
import re
import sqlite3
import sys
import time
import urllib.parse
import zipfile
import zoneinfo

import requests
import urllib3

# The server's certificate is self-signed; field clients do not verify it.
urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

TIMEOUT_S = 60.0
# Field clients send at most 10 requests a second.
MIN_INTERVAL_S = 0.1
# Retries of a call answered 503 (busy), with doubling back-off.
BUSY_RETRIES = 6
BUSY_BACKOFF_S = 0.25
BUSY_BACKOFF_MAX_S = 4.0

DATE_RE = re.compile(r"^\d{4}\.\d{2}\.\d{2}$")
TIME_RE = re.compile(r"^\d{4}\.\d{2}\.\d{2} \d{2}:\d{2}:\d{2}$")
TOKEN_RE = re.compile(r"^[0-9A-F]{32}$")
SERIAL_DAY_RE = re.compile(r"^\d{5}\.\d{10}$")
EMBRYO_ID_RE = re.compile(r"^D(\d{4}\.\d{2}\.\d{2})_S(\d{5})_I(\d+)_P-(\d+)$")
LABEL_RE = re.compile(r"^[A-Z]{2}\d+$")
# Set from the command line.
ZONE = datetime.timezone.utc
SITE = ""
FATES = {"Undecided", "Transfer", "Freeze", "Avoid"}
# A treatment is "in culture" for 7 days after insemination (docs/api-compat.md).
ONGOING_S = 7 * 24 * 3600
UNKNOWN_EMBRYO = "NO-SUCH-EMBRYO-0000"


class CheckFailed(Exception):
    pass


checks = 0


def check(condition: bool, what: str):
    global checks
    if not condition:
        raise CheckFailed(what)
    checks += 1


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_time(text: str) -> datetime.datetime:
    """A local time of the original API (the clinic's zone) as an aware instant."""
    return datetime.datetime.strptime(text, "%Y.%m.%d %H:%M:%S").replace(tzinfo=ZONE)


def iso(text: str) -> datetime.datetime:
    """An RFC 3339 instant of the REST API."""
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def local(instant: datetime.datetime) -> str:
    """An instant as the original API writes it: local time, yyyy.mm.dd HH:MM:SS."""
    return instant.astimezone(ZONE).strftime("%Y.%m.%d %H:%M:%S")


def serial_day(instant: datetime.datetime) -> float:
    """Days since 1899-12-30 of the instant's local time (the spreadsheet serial day)."""
    wall = instant.astimezone(ZONE).replace(tzinfo=None)
    return (wall - datetime.datetime(1899, 12, 30)).total_seconds() / 86400


def check_keys(obj, keys, what: str):
    check(isinstance(obj, dict), f"{what} is a JSON object")
    for key in keys:
        check(key in obj, f"{what} has {key} (keys: {sorted(obj)})")


def check_str(obj: dict, key: str, what: str):
    check(isinstance(obj.get(key), str), f"{what}.{key} is a string: {obj.get(key)!r}")


def check_int(obj: dict, key: str, what: str):
    check(is_int(obj.get(key)), f"{what}.{key} is a whole number: {obj.get(key)!r}")


def check_time(value, what: str, empty_ok: bool = False):
    if empty_ok and value == "":
        return
    check(
        isinstance(value, str) and TIME_RE.match(value) is not None,
        f"{what} is yyyy.mm.dd HH:MM:SS: {value!r}",
    )
    try:
        parse_time(value)
    except ValueError:
        check(False, f"{what} is a real date and time: {value!r}")


def check_date(value, what: str):
    if value is None:
        return  # not known: null, never ""
    check(
        isinstance(value, str) and DATE_RE.match(value) is not None,
        f"{what} is yyyy.mm.dd: {value!r}",
    )
    try:
        datetime.datetime.strptime(value, "%Y.%m.%d")
    except ValueError:
        check(False, f"{what} is a real date: {value!r}")


def check_error_body(response: requests.Response, what: str):
    """Errors carry their reason as text, as the original's did (and a stable code in the
    `es-error-code` header)."""
    check(response.headers.get("content-type", "").startswith("text/plain"),
          f"{what}: the reason is text ({response.headers.get('content-type')})")
    check(response.text.strip() != "", f"{what}: a reason")
    check(response.headers.get("es-error-code", "") != "", f"{what}: an es-error-code header")


# ------------------------------------------------------------------ the field client


class OriginalApi:
    """The original API as a field client calls it."""

    def __init__(self, base: str, user: str, password: str):
        self.base = base.rstrip("/")
        self.user = user
        self.password = password
        self.session = requests.Session()
        self.token: str | None = None
        self.logins = 0
        self.busy_retries = 0
        self.last_sent = 0.0

    def _pace(self):
        wait = self.last_sent + MIN_INTERVAL_S - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self.last_sent = time.monotonic()

    def _send(self, path: str, params: dict | None, headers: dict | None) -> requests.Response:
        """One request, retried with back-off while the server answers 503 (busy)."""
        delay = BUSY_BACKOFF_S
        for attempt in range(BUSY_RETRIES + 1):
            self._pace()
            # verify=False on the call itself: a session's verify=False loses against
            # REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE in the environment.
            response = self.session.get(
                self.base + path, params=params, headers=headers, timeout=TIMEOUT_S,
                verify=False,
            )
            if response.status_code != 503 or attempt == BUSY_RETRIES:
                return response
            self.busy_retries += 1
            try:
                delay = max(delay, float(response.headers.get("retry-after", "0")))
            except ValueError:
                pass
            time.sleep(min(delay, BUSY_BACKOFF_MAX_S))
            delay *= 2
        raise AssertionError("unreachable")

    def login_raw(self, params: dict) -> requests.Response:
        return self._send("/LOGIN", params, None)

    def login(self):
        response = self.login_raw({"username": self.user, "password": self.password})
        if response.status_code != 200:
            raise CheckFailed(f"LOGIN answered {response.status_code}: {response.text[:300]}")
        token = response.json().get("Token")
        check(isinstance(token, str) and TOKEN_RE.match(token) is not None,
              f"LOGIN answers a Token of 32 hex characters: {token!r}")
        self.token = token
        self.logins += 1

    def raw(self, name: str, params: dict | None = None, token: str | None = None,
            extra: dict | None = None) -> requests.Response:
        """GET /GET/<name> with exactly the given token (no new login)."""
        headers = {} if token is None else {"API-token": token}
        headers.update(extra or {})
        return self._send(f"/GET/{name}", params, headers)

    def call(self, name: str, params: dict | None = None) -> requests.Response:
        """GET /GET/<name>; on 401 (expired token) log in again and repeat the call once."""
        if self.token is None:
            self.login()
        response = self.raw(name, params, self.token)
        if response.status_code == 401:
            self.login()
            response = self.raw(name, params, self.token)
        return response

    def json(self, name: str, params: dict | None = None) -> dict:
        response = self.call(name, params)
        if response.status_code != 200:
            raise CheckFailed(
                f"GET/{name} {params} answered {response.status_code}: {response.text[:300]}"
            )
        check(
            response.headers.get("content-type", "").startswith("application/json"),
            f"GET/{name} answers JSON ({response.headers.get('content-type')})",
        )
        return response.json()

    def status(self, name: str, params: dict | None, expected: int, what: str) -> requests.Response:
        response = self.call(name, params)
        check(
            response.status_code == expected,
            f"{what}: GET/{name} {params} answers {expected}, not "
            f"{response.status_code} {response.text[:200]}",
        )
        if expected >= 400:
            check_error_body(response, what)
        if expected == 204:
            check(response.content == b"", f"{what}: 204 has no body")
        return response


# ------------------------------------------------------------------ setup through the REST API


class Expected:
    """What the setup wrote and what the REST API shows, to be found again through the
    original calls."""

    def __init__(self):
        self.scores: dict[str, tuple[float, str]] = {}  # embryo id -> (viability, version)
        self.evaluations: dict[str, tuple[str, str]] = {}  # embryo id -> (model, value)
        self.fates: dict[str, str] = {}
        self.transfer: dict | None = None
        self.patient_idx: dict[str, str] = {}  # patient id -> patient_idx (REST)
        self.embryos: dict[str, dict] = {}  # embryo id -> REST embryo
        self.dishes: dict[str, dict] = {}  # embryo id -> REST dish
        self.with_transfers: set[str] = set()  # patient ids


def setup_through_rest(base: str, user: str, password: str) -> Expected:
    """Writes scores, a fate and a transfer with outcome through /api/v1 (not the original
    API, which cannot write), and reads what the REST API shows of every patient and embryo."""
    expected = Expected()
    http = requests.Session()

    def rest(method: str, path: str, body=None, headers=None, ok=(200, 201)) -> requests.Response:
        response = http.request(
            method, base + path, json=body, headers=headers or {}, timeout=TIMEOUT_S,
            verify=False,
        )
        if response.status_code not in ok:
            raise CheckFailed(
                f"setup: {method} {path} answered {response.status_code}: {response.text[:300]}"
            )
        return response

    token = rest("POST", "/api/v1/login", {"username": user, "password": password}).json()["token"]
    http.headers["Authorization"] = f"Bearer {token}"

    def seg(text) -> str:
        return urllib.parse.quote(str(text), safe="")

    target = None
    for patient in rest("GET", "/api/v1/patients").json()["items"]:
        expected.patient_idx[patient["patient_id"]] = patient["patient_idx"]
        for treatment in patient["treatments"]:
            name = treatment["name"]
            base_path = f"/api/v1/patients/{seg(patient['patient_id'])}/treatments/{seg(name)}"
            for dish in rest("GET", base_path).json()["dishes"]:
                for well in dish["wells"]:
                    expected.dishes[well["embryo_id"]] = dish
            embryos = rest("GET", base_path + "/embryos").json()["items"]
            for e in embryos:
                expected.embryos[e["embryo_id"]] = e
            if target is None and len(embryos) >= 2:
                target = (patient["patient_id"], name, [e["embryo_id"] for e in embryos])
    if target is None:
        raise CheckFailed("setup: no treatment with two embryos or more")
    patient_id, treatment, embryo_ids = target

    def version(embryo_id: str) -> str:
        return rest("GET", f"/api/v1/embryos/{seg(embryo_id)}").headers["etag"]

    def put(embryo_id: str, what: str, body: dict):
        rest("PUT", f"/api/v1/embryos/{seg(embryo_id)}/{what}", body,
             {"If-Match": version(embryo_id)})

    first, second = embryo_ids[0], embryo_ids[1]
    put(first, "scores/iDAScore", {"value": "1.03", "model_version": "2.0.4", "viability": ""})
    expected.scores[first] = (1.03, "2.0.4")
    expected.evaluations[first] = ("iDAScore 2.0.4", "1.03")
    put(second, "scores/iDAScore", {"value": "0.31", "model_version": "2.0.4", "viability": ""})
    expected.scores[second] = (0.31, "2.0.4")
    time.sleep(0.05)  # the later score is the embryo's Evaluation
    put(second, "scores/KIDScoreD5", {"value": "9.3", "model_version": "v3"})
    expected.evaluations[second] = ("KIDScoreD5 v3", "9.3")
    put(first, "fate", {"fate": "freeze"})
    expected.fates[first] = "Freeze"
    # Every embryo of the clinic with an iDAScore is in IDASCORE without parameters.
    others = [e for e in expected.embryos if e not in (first, second)]
    if others:
        put(others[-1], "scores/iDAScore", {"value": "5.5", "model_version": "1.2.0", "viability": ""})
        expected.scores[others[-1]] = (5.5, "1.2.0")
        expected.evaluations[others[-1]] = ("iDAScore 1.2.0", "5.5")

    created = rest(
        "POST",
        f"/api/v1/patients/{seg(patient_id)}/treatments/{seg(treatment)}/transfers",
        {"transferred_at": "2025-10-14T09:30:00Z", "embryo_ids": [first], "comment": "SET"},
    )
    transfer_id = created.json()["transfer_id"]
    etag = rest("GET", f"/api/v1/transfers/{transfer_id}").headers["etag"]
    rest(
        "PUT",
        f"/api/v1/transfers/{transfer_id}/outcome",
        {"gestational_sacs": 1, "fetal_heartbeats": 1, "clinical_pregnancy": True,
         "live_birth": None, "comment": "SET, one sac"},
        {"If-Match": etag},
    )
    expected.transfer = {
        "TransferID": transfer_id,
        "TreatmentName": treatment,
        "TransferDate": local(iso("2025-10-14T09:30:00Z")),
        "EmbryoIDs": [first],
        "GestationalSacs": 1,
        "FetalHeartbeats": 1,
        "ClinicalPregnancy": True,
        "LiveBirth": None,
        "Comment": "SET, one sac",
    }
    expected.with_transfers.add(patient_id)
    # The REST API's view of the scored embryos, after the scores.
    for embryo_id in list(expected.embryos):
        expected.embryos[embryo_id] = rest("GET", f"/api/v1/embryos/{seg(embryo_id)}").json()
    http.post(base + "/api/v1/logout", timeout=TIMEOUT_S, verify=False)
    print(f"setup: scores, a fate and a transfer written for {patient_id}/{treatment}")
    return expected


# ------------------------------------------------------------------ the walk


def check_patient(p, what: str, expected: Expected):
    check_keys(p, ["PatientIDx", "PatientID", "FirstName", "LastName", "DateOfBirth"], what)
    for key in ["PatientIDx", "PatientID", "FirstName", "LastName"]:
        check_str(p, key, what)
    check(re.match(rf"^{SITE}_\d{{5}}\.\d{{10}}$", p["PatientIDx"]) is not None,
          f"{what}.PatientIDx is <site>_<serial day>: {p['PatientIDx']!r}")
    check(p["PatientIDx"] == expected.patient_idx.get(p["PatientID"]),
          f"{what}.PatientIDx is the REST API's patient_idx of {p['PatientID']!r}")
    check(p["DateOfBirth"] != "", f"{what}.DateOfBirth is never \"\" (null when unknown)")
    check_date(p["DateOfBirth"], f"{what}.DateOfBirth")
    check(p["PatientID"] != "", f"{what}.PatientID is not empty")


def check_patient_list(body, what: str, expected: Expected) -> list:
    check_keys(body, ["Patients"], what)
    check(isinstance(body["Patients"], list), f"{what}.Patients is a list")
    for i, p in enumerate(body["Patients"]):
        check_patient(p, f"{what}.Patients[{i}]", expected)
    ids = [p["PatientIDx"] for p in body["Patients"]]
    check(len(ids) == len(set(ids)), f"{what}: PatientIDx is unique")
    return body["Patients"]


def check_details(d, what: str, embryo_id: str, expected: Expected):
    keys = ["InstrumentNumber", "Position", "WellNumber", "FertilizationTime",
            "FertilizationMethod", "EmbryoFate", "EmbryoDescriptionID"]
    check_keys(d, keys, what)
    allowed = set(keys) | {"Description"}
    check(set(d) <= allowed, f"{what} has only the original's fields: {sorted(d)}")
    check_int(d, "InstrumentNumber", what)
    check_int(d, "Position", what)
    check_int(d, "WellNumber", what)
    check(d["WellNumber"] >= 1, f"{what}.WellNumber counts from 1")
    check_time(d["FertilizationTime"], f"{what}.FertilizationTime")
    check(d["FertilizationMethod"] in ("ICSI", "IVF"), f"{what}.FertilizationMethod: {d['FertilizationMethod']!r}")
    check(d["EmbryoFate"] in FATES, f"{what}.EmbryoFate is one of {sorted(FATES)}: {d['EmbryoFate']!r}")
    if "Description" in d:
        check(isinstance(d["Description"], str) and d["Description"] != "",
              f"{what}.Description only when set")
    check(isinstance(d["EmbryoDescriptionID"], str) and LABEL_RE.match(d["EmbryoDescriptionID"]),
          f"{what}.EmbryoDescriptionID is a label such as AA1: {d['EmbryoDescriptionID']!r}")
    # The identifiers are the same everywhere: the embryo id's I<number>, the REST API's.
    match = EMBRYO_ID_RE.match(embryo_id)
    check(match is not None, f"{embryo_id!r} is D<date>_S<5 digits>_I<number>_P-<well>")
    check(d["InstrumentNumber"] == int(match.group(3)),
          f"{what}.InstrumentNumber is the instrument's own number {match.group(3)}: {d['InstrumentNumber']}")
    check(d["WellNumber"] == int(match.group(4)), f"{what}.WellNumber is the id's well")
    rest = expected.embryos[embryo_id]
    check(rest["instrument_number"] == d["InstrumentNumber"], f"{what}: REST instrument_number")
    check(rest["label"] == d["EmbryoDescriptionID"], f"{what}: REST label")
    check(rest["fertilization_method"] == d["FertilizationMethod"], f"{what}: REST fertilization_method")
    check(d["FertilizationTime"] == local(iso(rest["insemination_at"])),
          f"{what}.FertilizationTime is the insemination in the clinic's zone: "
          f"{d['FertilizationTime']} vs {rest['insemination_at']}")
    check(d["Position"] == expected.dishes[embryo_id]["slot"], f"{what}.Position is the dish's slot")


def check_evaluation(e, what: str):
    check_keys(e, ["Model", "Evaluation", "User", "EvaluationDate"], what)
    if e["Model"] is None:
        check(e == {"Model": None, "Evaluation": None, "User": None, "EvaluationDate": None},
              f"{what}: no evaluation is all null: {e}")
        return
    for key in ["Model", "Evaluation", "User"]:
        check_str(e, key, what)
    check(isinstance(e["EvaluationDate"], str) and DATE_RE.match(e["EvaluationDate"]) is not None,
          f"{what}.EvaluationDate is yyyy.mm.dd: {e['EvaluationDate']!r}")


def check_embryo_data(item, what: str, expected: Expected):
    check_keys(item, ["EmbryoID", "EmbryoDetails", "AnnotationList", "Evaluation"], what)
    check_str(item, "EmbryoID", what)
    embryo_id = item["EmbryoID"]
    rest = expected.embryos[embryo_id]
    check(isinstance(item["AnnotationList"], list), f"{what}.AnnotationList is a list")
    check(len(item["AnnotationList"]) == len(rest["annotations"]), f"{what}: every annotation")
    for i, (a, r) in enumerate(zip(item["AnnotationList"], rest["annotations"])):
        w = f"{what}.AnnotationList[{i}]"
        check_keys(a, ["Name", "Time", "Value", "Timestamp"], w)
        check_str(a, "Name", w)
        check_str(a, "Value", w)
        check_time(a["Timestamp"], f"{w}.Timestamp")
        check(a["Timestamp"] == local(iso(r["set_at"])), f"{w}.Timestamp is when it was made")
        if r["event_at"] is None:
            check(a["Time"] is None, f"{w}.Time is null without an event")
            check(a["Value"] == r["value"], f"{w}.Value is the value as text: {a['Value']!r}")
        else:
            check(is_number(a["Time"]) and round(a["Time"], 1) == a["Time"],
                  f"{w}.Time is hours to one decimal: {a['Time']!r}")
            check(abs(a["Time"] - r["hours"]) <= 0.05, f"{w}.Time is the hours after insemination")
            check(SERIAL_DAY_RE.match(a["Value"]) is not None,
                  f"{w}.Value of a timing annotation is a serial day: {a['Value']!r}")
            check(abs(float(a["Value"]) - serial_day(iso(r["event_at"]))) < 1e-8,
                  f"{w}.Value is the event's local instant as a serial day")
    check_details(item["EmbryoDetails"], f"{what}.EmbryoDetails", embryo_id, expected)
    check_evaluation(item["Evaluation"], f"{what}.Evaluation")


def walk_images(api: OriginalApi, embryo_id: str, runs: list, planes: list, state: dict):
    """image and allimages of one embryo at one of its focal planes."""
    plane = planes[0]
    jpegs = {}
    for run in runs:
        number = run["Run"]
        response = api.call("image", {"EmbryoID": embryo_id, "ImageRun": number, "focalPlane": plane})
        w = f"image {embryo_id} run {number} plane {plane}"
        check(response.status_code == 200, f"{w} answers 200, not {response.status_code}")
        check(response.headers.get("content-type") == "image/jpeg",
              f"{w} is image/jpeg ({response.headers.get('content-type')})")
        check(response.content[:2] == b"\xff\xd8", f"{w} starts with the JPEG magic FF D8")
        jpegs[number] = response.content
    state["images"] += len(jpegs)
    api.status("image", {"EmbryoID": embryo_id, "ImageRun": len(runs) + 1, "focalPlane": plane},
               204, "image past the last run")
    for overlay in (["false", "true"] if state["zips"] == 0 else ["false"]):
        response = api.call("allimages",
                            {"EmbryoID": embryo_id, "ImageOverlay": overlay, "focalPlane": plane})
        w = f"allimages {embryo_id} plane {plane} overlay {overlay}"
        check(response.status_code == 200, f"{w} answers 200, not {response.status_code}")
        check(response.headers.get("content-type") == "application/zip",
              f"{w} is application/zip ({response.headers.get('content-type')})")
        try:
            archive = zipfile.ZipFile(io.BytesIO(response.content))
        except zipfile.BadZipFile as error:
            raise CheckFailed(f"{w} is a ZIP archive: {error}")
        check(archive.testzip() is None, f"{w}: every entry's CRC is right")
        names = archive.namelist()
        check(len(names) == len(runs), f"{w}: {len(runs)} entries, not {len(names)}")
        prefix = "".join(c if c.isalnum() or c in "-_." else "_" for c in embryo_id)
        for n, name in enumerate(names, start=1):
            check(name == f"{prefix}_{n:05}.jpg", f"{w}: entry {n} is named {prefix}_{n:05}.jpg: {name!r}")
            check(archive.read(name) == jpegs[n], f"{w}: entry {name} is the image of run {n}")
        state["zips"] += 1
    api.status("allimages", {"EmbryoID": embryo_id, "ImageOverlay": "false", "focalPlane": 99},
               204, "allimages at a plane without images")
    api.status("image", {"EmbryoID": embryo_id, "ImageRun": 1, "focalPlane": 99}, 204,
               "image at a plane without images")


def walk_embryo(api: OriginalApi, item: dict, expected: Expected, state: dict):
    embryo_id = item["EmbryoID"]
    details = item["EmbryoDetails"]
    params = {"EmbryoID": embryo_id}

    body = api.json("embryodetails", params)
    check(body == details, f"embryodetails of {embryo_id} is the flat EmbryoDetails of embryodata: {body}")

    body = api.json("embryofate", params)
    check(body == {"EmbryoFate": details["EmbryoFate"]}, f"embryofate of {embryo_id}: {body}")
    check(body["EmbryoFate"] == expected.fates.get(embryo_id, "Undecided"),
          f"embryofate of {embryo_id} is the fate set: {body['EmbryoFate']}")

    body = api.json("evaluation", params)
    check_evaluation(body, "evaluation")
    check(body == item["Evaluation"], f"evaluation of {embryo_id} is the flat Evaluation of embryodata")
    if embryo_id in expected.evaluations:
        model, value = expected.evaluations[embryo_id]
        check((body["Model"], body["Evaluation"]) == (model, value),
              f"evaluation of {embryo_id} is the latest score {model} {value}: {body}")
        check(body["User"] == "emr", f"evaluation of {embryo_id} names its user: {body['User']!r}")
        scored_at = max(iso(s["set_at"]) for s in expected.embryos[embryo_id]["scores"])
        check(body["EvaluationDate"] == scored_at.astimezone(ZONE).strftime("%Y.%m.%d"),
              f"evaluation of {embryo_id} is dated the local day it was set: {body['EvaluationDate']}")
    else:
        check(body["Model"] is None, f"{embryo_id} has no evaluation")

    body = api.json("fertilizationtime", params)
    check(body == {"FertilizationTime": details["FertilizationTime"]},
          f"fertilizationtime of {embryo_id}: {body}")

    body = api.json("imageruns", params)
    check_keys(body, ["ImageRuns"], "imageruns")
    runs = body["ImageRuns"]
    check(isinstance(runs, list), "imageruns.ImageRuns is a list")
    previous = None
    for n, run in enumerate(runs, start=1):
        w = f"imageruns {embryo_id}[{n - 1}]"
        check(set(run) == {"Run", "Time"}, f"{w} is {{Run, Time}}: {run}")
        check(run["Run"] == n, f"{w}.Run counts from 1: {run['Run']!r}")
        check(is_number(run["Time"]) and round(run["Time"], 1) == run["Time"],
              f"{w}.Time is hours since fertilization, one decimal: {run['Time']!r}")
        check(previous is None or run["Time"] >= previous, f"{w}: runs are in time order")
        previous = run["Time"]
    state["runs"] += len(runs)
    if runs:
        walk_images(api, embryo_id, runs, [0, -15, 15], state)
    else:
        api.status("image", {"EmbryoID": embryo_id, "ImageRun": 1}, 204, "image of an embryo without runs")
    return runs


def walk(api: OriginalApi, expected: Expected) -> dict:
    """Every call; returns what an extraction would load."""
    state = {"patients": 0, "treatments": 0, "embryos": 0, "runs": 0, "images": 0, "zips": 0,
             "scores": 0, "transfers": 0}
    loaded = {"patients": [], "treatments": [], "embryos": [], "annotations": [], "runs": [],
              "scores": [], "transfers": []}

    # Login, and a token that is no longer valid: 401, then the wrapper logs in again.
    api.login()
    check(api.logins == 1, "logged in")
    stale = api.token
    response = api.raw("patients", None, "0" * 32)
    check(response.status_code == 401, f"a bogus token answers 401, not {response.status_code}")
    check_error_body(response, "bogus token")
    response = api.raw("patients", None, None)
    check(response.status_code == 401, f"no token answers 401, not {response.status_code}")
    api.token = "F" * 32  # the token expired while the client was idle
    patients = check_patient_list(api.json("patients"), "patients", expected)
    check(api.logins == 2, "the 401 made the client log in again, once")
    check(api.token != stale and TOKEN_RE.match(api.token), "the new login gave a new token")
    response = api.raw("patients", None, stale)
    check(response.status_code == 200, "an earlier token stays valid until it expires")
    check(len(patients) >= 2, "patients lists the uploaded patients")
    check(any(p["DateOfBirth"] is None for p in patients), "an unknown date of birth is null")
    # A client that sends HTTP Basic on every call: the API-token decides.
    basic = requests.auth._basic_auth_str("nobody", "wrong")
    response = api.raw("patients", None, api.token, {"Authorization": basic})
    check(response.status_code == 200, f"Basic beside a valid API-token: 200, not {response.status_code}")
    response = api.raw("patients", None, "0" * 32, {"Authorization": basic})
    check(response.status_code == 401, "Basic beside a bogus API-token: 401")
    # LOGIN by HTTP Basic, and the user name in any case.
    response = api.session.get(api.base + "/LOGIN", auth=(api.user.lower(), api.password),
                               timeout=TIMEOUT_S, verify=False)
    check(response.status_code == 200 and TOKEN_RE.match(response.json().get("Token", "")),
          f"LOGIN by HTTP Basic as {api.user.lower()!r}: {response.status_code} {response.text[:100]}")

    bad = api.login_raw({"username": api.user, "password": api.password + "-wrong"})
    check(bad.status_code == 401, f"LOGIN with a wrong password answers 401, not {bad.status_code}")
    check("Token" not in bad.text, "a refused LOGIN gives no token")
    bad = api.login_raw({"username": api.user})
    check(bad.status_code == 400, f"LOGIN without password answers 400, not {bad.status_code}")

    # Names of calls and parameters in any case.
    check(api.json("PATIENTS") == api.json("patients"), "call names ignore case")

    treatments_seen = {}
    embryo_ids_seen = set()
    fertilization = {}  # PatientIDx -> latest FertilizationTime
    for p in patients:
        state["patients"] += 1
        loaded["patients"].append(p)
        idx = p["PatientIDx"]
        body = api.json("TREATMENT", {"patientIDx": idx})
        check(set(body) == {"TreatmentList"}, f"TREATMENT is {{TreatmentList}}: {sorted(body)}")
        names = body["TreatmentList"]
        check(isinstance(names, list) and all(isinstance(n, str) for n in names),
              f"TREATMENT.TreatmentList is a list of strings: {names!r}")
        check(len(names) == len(set(names)), "treatment names are unique")
        treatments_seen[idx] = names
        for name in names:
            state["treatments"] += 1
            loaded["treatments"].append({"PatientIDx": idx, "TreatmentName": name})
            params = {"PatientIDx": idx, "TreatmentName": name}
            body = api.json("embryoID", params)
            check(set(body) == {"EmbryoIDList"}, f"embryoID is {{EmbryoIDList}}: {sorted(body)}")
            ids = body["EmbryoIDList"]
            check(isinstance(ids, list) and all(isinstance(i, str) for i in ids),
                  f"embryoID.EmbryoIDList is a list of strings: {ids!r}")
            body = api.json("embryodata", params)
            check(set(body) == {"EmbryoDataList"}, f"embryodata is {{EmbryoDataList}}: {sorted(body)}")
            data = body["EmbryoDataList"]
            for i, item in enumerate(data):
                check_embryo_data(item, f"embryodata {name}[{i}]", expected)
            check([item["EmbryoID"] for item in data] == ids,
                  f"embryodata of {name} holds the embryos embryoID lists, in order")
            lower = api.json("embryodata", {"patientidx": idx, "treatmentname": name})
            check(lower == body, "parameter names ignore case")
            for item in data:
                state["embryos"] += 1
                embryo_ids_seen.add(item["EmbryoID"])
                t = parse_time(item["EmbryoDetails"]["FertilizationTime"])
                fertilization[idx] = max(fertilization.get(idx, t), t)
                runs = walk_embryo(api, item, expected, state)
                d = item["EmbryoDetails"]
                loaded["embryos"].append({"EmbryoID": item["EmbryoID"], "PatientIDx": idx,
                                          "TreatmentName": name, **{k: d.get(k) for k in (
                                              "InstrumentNumber", "Position", "WellNumber",
                                              "FertilizationTime", "FertilizationMethod",
                                              "EmbryoFate", "Description", "EmbryoDescriptionID")}})
                for a in item["AnnotationList"]:
                    loaded["annotations"].append({"EmbryoID": item["EmbryoID"], **a})
                for run in runs:
                    loaded["runs"].append({"EmbryoID": item["EmbryoID"], **run})
            one = api.json("IDASCORE", params)
            check(set(one) == {"Scores"}, "IDASCORE of a treatment is {Scores}")
            check(all(s["EmbryoID"] in ids for s in one["Scores"]), "IDASCORE of a treatment: its embryos")

    check(state["embryos"] >= 1, "the walk reached embryos")
    check(state["images"] >= 1 and state["zips"] >= 1, "the walk reached images and archives")

    # IDASCORE as clients call it: no parameters, every scored embryo of the clinic.
    body = api.json("IDASCORE")
    check(set(body) == {"Scores"}, f"IDASCORE is {{Scores}}: {sorted(body)}")
    scores = body["Scores"]
    for i, s in enumerate(scores):
        w = f"IDASCORE[{i}]"
        check(set(s) == {"EmbryoID", "Viability", "Time", "Version", "Timestamp"},
              f"{w} has the original's fields: {sorted(s)}")
        check_str(s, "EmbryoID", w)
        check(is_number(s["Viability"]), f"{w}.Viability is a number: {s['Viability']!r}")
        check(is_number(s["Time"]), f"{w}.Time is hours, a number: {s['Time']!r}")
        check_str(s, "Version", w)
        check_time(s["Timestamp"], f"{w}.Timestamp")
        check(s["EmbryoID"] in expected.scores, f"{w}: only embryos given an iDAScore are listed")
        viability, version = expected.scores[s["EmbryoID"]]
        check((s["Viability"], s["Version"]) == (viability, version), f"{w} is the score set: {s}")
        one = api.json("IDASCORE", {"EmbryoID": s["EmbryoID"]})
        check(one == {"Scores": [s]}, f"IDASCORE of embryo {s['EmbryoID']} alone: {one}")
        loaded["scores"].append(s)
        state["scores"] += 1
    check(state["scores"] == len(expected.scores),
          f"IDASCORE lists every score set ({state['scores']} of {len(expected.scores)})")
    check(len({s["EmbryoID"] for s in scores}) == len(scores), "IDASCORE lists each embryo once")

    by_id = {p["PatientID"]: p for p in patients}
    for p in patients:
        idx = p["PatientIDx"]
        if p["PatientID"] not in expected.with_transfers:
            api.status("transfers", {"PatientIDx": idx}, 204, "a patient without transfers")
            continue
        body = api.json("transfers", {"PatientIDx": idx})
        check_keys(body, ["PatientIDx", "Transfers"], "transfers")
        check(body["PatientIDx"] == idx, "transfers names the patient")
        for i, t in enumerate(body["Transfers"]):
            w = f"transfers {idx}[{i}]"
            check_int(t, "TransferID", w)
            check(t["TreatmentName"] in treatments_seen[idx], f"{w}.TreatmentName is the patient's")
            check_time(t["TransferDate"], f"{w}.TransferDate")
            check(all(e in embryo_ids_seen for e in t["EmbryoIDs"]), f"{w}.EmbryoIDs are known embryos")
            if expected.transfer and t["TransferID"] == expected.transfer["TransferID"]:
                check(t == expected.transfer, f"{w} is the transfer written: {t}")
            loaded["transfers"].append({"PatientIDx": idx, **t})
            state["transfers"] += 1
    check(state["transfers"] >= 1, "transfers lists the transfer written")
    del by_id

    ongoing = check_patient_list(api.json("ongoingpatients"), "ongoingpatients", expected)
    by_idx = {p["PatientIDx"]: p for p in patients}
    for p in ongoing:
        check(by_idx.get(p["PatientIDx"]) == p, "an ongoing patient is one of patients, alike")
    now = datetime.datetime.now(datetime.timezone.utc)
    for idx in by_idx:
        latest = fertilization.get(idx)
        if latest is None:
            continue
        age = (now - latest).total_seconds()
        if abs(age - ONGOING_S) < 600:
            continue  # at the boundary while the walk runs
        listed = any(p["PatientIDx"] == idx for p in ongoing)
        check(listed == (age < ONGOING_S),
              f"patient {idx} (inseminated {latest:%Y-%m-%d %H:%M}) is listed by ongoingpatients "
              f"exactly while in culture (listed: {listed})")
    check(len(ongoing) >= 1, "a treatment in culture")

    # Refusals: 400 with the reason in text, as the original.
    some_embryo = sorted(embryo_ids_seen)[0]
    some_patient = patients[0]["PatientIDx"]
    api.status("embryodetails", None, 400, "a missing EmbryoID")
    api.status("embryodetails", {"EmbryoID": ""}, 400, "an empty EmbryoID")
    api.status("TREATMENT", None, 400, "a missing patientIDx")
    api.status("embryodata", {"PatientIDx": some_patient}, 400, "a missing TreatmentName")
    api.status("image", {"EmbryoID": some_embryo, "focalPlane": 0}, 400, "a missing ImageRun")
    api.status("image", {"EmbryoID": some_embryo, "ImageRun": 0}, 400, "ImageRun 0")
    api.status("allimages", {"ImageOverlay": "false"}, 400, "allimages without EmbryoID")
    for name in ["embryodetails", "embryofate", "evaluation", "fertilizationtime", "imageruns"]:
        response = api.status(name, {"EmbryoID": UNKNOWN_EMBRYO}, 400, f"{name} of an unknown embryo")
        check(response.text.strip() == f"EmbryoID is invalid: {UNKNOWN_EMBRYO}",
              f"the original's wording: {response.text!r}")
    api.status("image", {"EmbryoID": UNKNOWN_EMBRYO, "ImageRun": 1, "focalPlane": 0}, 400,
               "image of an unknown embryo")
    api.status("allimages", {"EmbryoID": UNKNOWN_EMBRYO, "ImageOverlay": "false", "focalPlane": 0},
               400, "allimages of an unknown embryo")
    api.status("TREATMENT", {"patientIDx": "NOSUCH_1.0"}, 400, "an unknown patient")
    api.status("TREATMENT", {"patientIDx": "1"}, 400, "a server key is not a PatientIDx")
    api.status("embryoID", {"PatientIDx": some_patient, "TreatmentName": "no-such-treatment"}, 400,
               "an unknown treatment")
    api.status("IDASCORE", {"TreatmentName": "2023-0107"}, 400,
               "IDASCORE with a TreatmentName but no PatientIDx")
    api.status("nosuchcall", None, 400, "an unknown call")

    print(
        f"walked {state['patients']} patients, {state['treatments']} treatments, "
        f"{state['embryos']} embryos, {state['runs']} image runs, {state['images']} images, "
        f"{state['zips']} archives, {state['scores']} scores, {state['transfers']} transfers; "
        f"{api.logins} logins, {api.busy_retries} busy retries"
    )
    return loaded


# ------------------------------------------------------------------ the typed load

SCHEMA = """
CREATE TABLE IF NOT EXISTS patients (
  patient_idx TEXT NOT NULL UNIQUE, patient_id TEXT NOT NULL, first_name TEXT NOT NULL,
  last_name TEXT NOT NULL,
  date_of_birth TEXT CHECK (date_of_birth IS NULL OR date_of_birth GLOB '[0-9][0-9][0-9][0-9].[0-1][0-9].[0-3][0-9]')
) STRICT;
CREATE TABLE IF NOT EXISTS treatments (
  patient_idx TEXT NOT NULL REFERENCES patients(patient_idx), name TEXT NOT NULL,
  UNIQUE (patient_idx, name)
) STRICT;
CREATE TABLE IF NOT EXISTS embryos (
  embryo_id TEXT NOT NULL UNIQUE, patient_idx TEXT NOT NULL REFERENCES patients(patient_idx),
  treatment TEXT NOT NULL, instrument_number INTEGER NOT NULL, position INTEGER NOT NULL,
  well INTEGER NOT NULL, fertilization_time TEXT NOT NULL, fertilization_method TEXT,
  fate TEXT NOT NULL, description TEXT, label TEXT NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS annotations (
  embryo_id TEXT NOT NULL REFERENCES embryos(embryo_id), name TEXT NOT NULL, hours REAL,
  value TEXT NOT NULL, made TEXT NOT NULL, UNIQUE (embryo_id, name, made)
) STRICT;
CREATE TABLE IF NOT EXISTS image_runs (
  embryo_id TEXT NOT NULL REFERENCES embryos(embryo_id), run INTEGER NOT NULL,
  hours REAL NOT NULL, UNIQUE (embryo_id, run)
) STRICT;
CREATE TABLE IF NOT EXISTS scores (
  embryo_id TEXT NOT NULL UNIQUE REFERENCES embryos(embryo_id), viability REAL NOT NULL,
  hours REAL NOT NULL, version TEXT NOT NULL, at TEXT NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS transfers (
  transfer_id INTEGER NOT NULL UNIQUE, patient_idx TEXT NOT NULL, treatment TEXT NOT NULL,
  at TEXT NOT NULL, sacs INTEGER, heartbeats INTEGER, pregnancy INTEGER, live_birth INTEGER
) STRICT;
"""


def load(path: str, loaded: dict) -> int:
    """Loads the answers as an extraction does (insert what is new, keyed by the original's
    identifiers); returns the rows added. A value of the wrong type stops it, as a typed
    column does."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA foreign_keys = ON")
    db.executescript(SCHEMA)
    before = db.total_changes
    rows = [
        ("INSERT INTO patients VALUES (?,?,?,?,?) ON CONFLICT DO NOTHING",
         [(p["PatientIDx"], p["PatientID"], p["FirstName"], p["LastName"], p["DateOfBirth"])
          for p in loaded["patients"]]),
        ("INSERT INTO treatments VALUES (?,?) ON CONFLICT DO NOTHING",
         [(t["PatientIDx"], t["TreatmentName"]) for t in loaded["treatments"]]),
        ("INSERT INTO embryos VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
         [(e["EmbryoID"], e["PatientIDx"], e["TreatmentName"], e["InstrumentNumber"],
           e["Position"], e["WellNumber"], e["FertilizationTime"], e["FertilizationMethod"],
           e["EmbryoFate"], e["Description"], e["EmbryoDescriptionID"]) for e in loaded["embryos"]]),
        ("INSERT INTO annotations VALUES (?,?,?,?,?) ON CONFLICT DO NOTHING",
         [(a["EmbryoID"], a["Name"], a["Time"], a["Value"], a["Timestamp"])
          for a in loaded["annotations"]]),
        ("INSERT INTO image_runs VALUES (?,?,?) ON CONFLICT DO NOTHING",
         [(r["EmbryoID"], r["Run"], r["Time"]) for r in loaded["runs"]]),
        ("INSERT INTO scores VALUES (?,?,?,?,?) ON CONFLICT DO NOTHING",
         [(s["EmbryoID"], s["Viability"], s["Time"], s["Version"], s["Timestamp"])
          for s in loaded["scores"]]),
        ("INSERT INTO transfers VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
         [(t["TransferID"], t["PatientIDx"], t["TreatmentName"], t["TransferDate"],
           t["GestationalSacs"], t["FetalHeartbeats"], t["ClinicalPregnancy"], t["LiveBirth"])
          for t in loaded["transfers"]]),
    ]
    try:
        with db:
            for sql, values in rows:
                db.executemany(sql, values)
    except sqlite3.Error as error:
        raise CheckFailed(f"the typed load stopped: {error}")
    added = db.total_changes - before
    db.close()
    return added


def main() -> int:
    global ZONE, SITE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="https://HOST:PORT")
    parser.add_argument("--user", required=True, help="a user with the edit right (REST setup)")
    parser.add_argument("--password", required=True)
    parser.add_argument("--reader", help="the account the walk logs in as (default: --user)")
    parser.add_argument("--site", required=True, help="the server's [Clinic] site_name")
    parser.add_argument("--time-zone", required=True, help="the server's [Clinic] time_zone")
    parser.add_argument("--database", required=True, help="the SQLite file to load into")
    args = parser.parse_args()
    ZONE = zoneinfo.ZoneInfo(args.time_zone)
    SITE = args.site
    base = args.base.rstrip("/")
    try:
        expected = setup_through_rest(base, args.user, args.password)
        loads = []
        for attempt in (1, 2):
            loaded = walk(OriginalApi(base, args.reader or args.user, args.password), expected)
            loads.append(load(args.database, loaded))
        check(loads[0] > 0, f"the first load added rows ({loads[0]})")
        check(loads[1] == 0, f"the second load added no row ({loads[1]}): no duplicates")
        print(f"first load: {loads[0]} rows; second load: {loads[1]} new rows")
    except CheckFailed as failure:
        print(f"FAIL: {failure}")
        print(f"({checks} checks passed before it)")
        return 1
    except (requests.RequestException, ValueError, KeyError) as error:
        print(f"FAIL: {type(error).__name__}: {error}")
        print(f"({checks} checks passed before it)")
        return 1
    print(f"{checks} checks")
    print("PASS: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
