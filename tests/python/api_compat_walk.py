#!/usr/bin/env python3
"""A client of the original Public API, written the way the field (EMR) clients call it.

Python `requests`, certificate verification off (the server's certificate is self-signed),
the login token in the `API-token` header, a new login whenever a call answers 401, and
back-off on 503. It walks every original call the way an EMR import does:

    LOGIN -> patients -> TREATMENT -> embryoID -> embryodata -> embryodetails, embryofate,
    evaluation, fertilizationtime -> imageruns -> image -> allimages -> IDASCORE ->
    transfers -> ongoingpatients

and checks every documented key (docs/api-compat.md): its presence, its JSON type and its
format (`yyyy.mm.dd` dates, `yyyy.mm.dd HH:MM:SS` times), plus the status codes field clients
rely on (401 then a new login, 400, 204).

Usage:
    api_compat_walk.py --base https://127.0.0.1:PORT --user USER --password PASSWORD

USER needs the edit right: before the walk, a separate setup step writes scores, a fate and
a transfer through the REST API (/api/v1) so that IDASCORE, Evaluation, EmbryoFate and
transfers have content. The walk itself uses only the original calls.

Prints `PASS: all checks passed` and exits 0 when every check passes; otherwise prints what
failed and exits 1.
"""

from __future__ import annotations

import argparse
import datetime
import io
import re
import sys
import time
import urllib.parse
import zipfile

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
TOKEN_RE = re.compile(r"^[0-9a-fA-F]{32}$")
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
    return datetime.datetime.strptime(text, "%Y.%m.%d %H:%M:%S").replace(
        tzinfo=datetime.timezone.utc
    )


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
    if value == "":
        return  # not known
    check(
        isinstance(value, str) and DATE_RE.match(value) is not None,
        f"{what} is yyyy.mm.dd: {value!r}",
    )
    try:
        datetime.datetime.strptime(value, "%Y.%m.%d")
    except ValueError:
        check(False, f"{what} is a real date: {value!r}")


def check_error_body(response: requests.Response, what: str):
    """Errors carry {"code", "message"}."""
    try:
        body = response.json()
    except ValueError:
        check(False, f"{what}: the error body is JSON: {response.text[:200]!r}")
        return
    check_keys(body, ["code", "message"], f"{what}: the error body")
    check(isinstance(body["message"], str) and body["message"] != "", f"{what}: a message")


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

    def raw(self, name: str, params: dict | None = None, token: str | None = None) -> requests.Response:
        """GET /GET/<name> with exactly the given token (no new login)."""
        headers = {} if token is None else {"API-token": token}
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
    """What the setup wrote, to be found again through the original calls."""

    def __init__(self):
        self.scores: dict[str, tuple[str, str]] = {}  # embryo id -> (value, viability)
        self.evaluations: dict[str, tuple[str, str]] = {}  # embryo id -> (model, value)
        self.fates: dict[str, str] = {}
        self.transfer: dict | None = None


def setup_through_rest(base: str, user: str, password: str) -> Expected:
    """Writes scores, a fate and a transfer with outcome through /api/v1 (not the original
    API, which cannot write)."""
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

    patients = rest("GET", "/api/v1/patients").json()["items"]
    target = None
    for patient in patients:
        for treatment in patient["treatments"]:
            name = treatment["name"]
            path = f"/api/v1/patients/{seg(patient['patient_id'])}/treatments/{seg(name)}/embryos"
            embryos = rest("GET", path).json()["items"]
            if len(embryos) >= 2:
                target = (patient["patient_id"], name, [e["embryo_id"] for e in embryos])
                break
        if target:
            break
    if target is None:
        raise CheckFailed("setup: no treatment with two embryos or more")
    patient_id, treatment, embryo_ids = target

    def version(embryo_id: str) -> str:
        return rest("GET", f"/api/v1/embryos/{seg(embryo_id)}").headers["etag"]

    def put(embryo_id: str, what: str, body: dict):
        rest("PUT", f"/api/v1/embryos/{seg(embryo_id)}/{what}", body,
             {"If-Match": version(embryo_id)})

    first, second = embryo_ids[0], embryo_ids[1]
    put(first, "scores/iDAScore", {"value": "8.7", "model_version": "2.0", "viability": "high"})
    expected.scores[first] = ("8.7", "high")
    expected.evaluations[first] = ("iDAScore", "8.7")
    put(second, "scores/iDAScore", {"value": "3.1", "model_version": "2.0", "viability": "low"})
    expected.scores[second] = ("3.1", "low")
    time.sleep(0.05)  # the later score is the embryo's Evaluation
    put(second, "scores/KIDScore", {"value": "5.2", "model_version": "D5 v3"})
    expected.evaluations[second] = ("KIDScore", "5.2")
    put(first, "fate", {"fate": "transfer"})
    expected.fates[first] = "Transfer"

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
        "TransferDate": "2025.10.14 09:30:00",
        "EmbryoIDs": [first],
        "GestationalSacs": 1,
        "FetalHeartbeats": 1,
        "ClinicalPregnancy": True,
        "LiveBirth": None,
        "Comment": "SET, one sac",
    }
    http.post(base + "/api/v1/logout", timeout=TIMEOUT_S, verify=False)
    print(f"setup: scores, a fate and a transfer written for {patient_id}/{treatment}")
    return expected


# ------------------------------------------------------------------ the walk


def check_patient(p, what: str):
    check_keys(p, ["PatientIDx", "PatientID", "FirstName", "LastName", "DateOfBirth"], what)
    check_int(p, "PatientIDx", what)
    for key in ["PatientID", "FirstName", "LastName"]:
        check_str(p, key, what)
    check_date(p["DateOfBirth"], f"{what}.DateOfBirth")
    check(p["PatientID"] != "", f"{what}.PatientID is not empty")


def check_patient_list(body, what: str) -> list:
    check_keys(body, ["Patients"], what)
    check(isinstance(body["Patients"], list), f"{what}.Patients is a list")
    for i, p in enumerate(body["Patients"]):
        check_patient(p, f"{what}.Patients[{i}]")
    ids = [p["PatientIDx"] for p in body["Patients"]]
    check(len(ids) == len(set(ids)), f"{what}: PatientIDx is unique")
    return body["Patients"]


def check_details(d, what: str):
    check_keys(d, ["InstrumentNumber", "Position", "WellNumber", "FertilizationTime",
                   "EmbryoFate", "Description", "EmbryoDescriptionID"], what)
    check_int(d, "InstrumentNumber", what)
    check_int(d, "Position", what)
    check_int(d, "WellNumber", what)
    check(d["WellNumber"] >= 1, f"{what}.WellNumber counts from 1")
    check_time(d["FertilizationTime"], f"{what}.FertilizationTime")
    check(d["EmbryoFate"] in FATES, f"{what}.EmbryoFate is one of {sorted(FATES)}: {d['EmbryoFate']!r}")
    check_str(d, "Description", what)
    check_int(d, "EmbryoDescriptionID", what)


def check_evaluation(e, what: str):
    check_keys(e, ["Model", "Evaluation", "User", "EvaluationDate"], what)
    for key in ["Model", "Evaluation", "User"]:
        check_str(e, key, what)
    if e["Model"] == "":
        check(e == {"Model": "", "Evaluation": "", "User": "", "EvaluationDate": ""},
              f"{what}: no evaluation is all empty fields: {e}")
    else:
        check_time(e["EvaluationDate"], f"{what}.EvaluationDate")


def check_embryo_data(item, what: str):
    check_keys(item, ["EmbryoID", "AnnotationList", "EmbryoDetails", "Evaluation"], what)
    check_str(item, "EmbryoID", what)
    check(isinstance(item["AnnotationList"], list), f"{what}.AnnotationList is a list")
    for i, a in enumerate(item["AnnotationList"]):
        w = f"{what}.AnnotationList[{i}]"
        check_keys(a, ["Name", "Time", "Value", "Timestamp"], w)
        check_str(a, "Name", w)
        check(a["Time"] is None or is_number(a["Time"]), f"{w}.Time is hours or null: {a['Time']!r}")
        check_str(a, "Value", w)
        check_time(a["Timestamp"], f"{w}.Timestamp")
    check_details(item["EmbryoDetails"], f"{what}.EmbryoDetails")
    check_evaluation(item["Evaluation"], f"{what}.Evaluation")


def walk_images(api: OriginalApi, embryo_id: str, runs: list, state: dict):
    """image and allimages of one embryo at the first focal plane of its first run."""
    plane = runs[0]["FocalPlanes"][0]
    with_plane = [r["ImageRun"] for r in runs if plane in r["FocalPlanes"]]
    jpegs = {}
    for run in with_plane:
        response = api.call("image", {"EmbryoID": embryo_id, "ImageRun": run, "focalPlane": plane})
        w = f"image {embryo_id} run {run} plane {plane}"
        check(response.status_code == 200, f"{w} answers 200, not {response.status_code}")
        check(response.headers.get("content-type") == "image/jpeg",
              f"{w} is image/jpeg ({response.headers.get('content-type')})")
        check(response.content[:2] == b"\xff\xd8", f"{w} starts with the JPEG magic FF D8")
        jpegs[run] = response.content
    state["images"] += len(jpegs)

    last = runs[-1]["ImageRun"]
    api.status("image", {"EmbryoID": embryo_id, "ImageRun": last + 1, "focalPlane": plane}, 204,
               "image past the last run")

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
        check(len(names) == len(with_plane),
              f"{w}: {len(with_plane)} entries (the image runs at plane {plane}), not {len(names)}")
        # Entry names: the embryo id (characters other than letters, digits, - _ . made _),
        # then the entry's number in the archive.
        prefix = "".join(c if c.isalnum() or c in "-_." else "_" for c in embryo_id)
        for n, name in enumerate(names, start=1):
            check(name == f"{prefix}_{n:05}.jpg", f"{w}: entry {n} is named {prefix}_{n:05}.jpg: {name!r}")
            data = archive.read(name)
            check(data[:2] == b"\xff\xd8", f"{w}: entry {name} is a JPEG")
            check(data == jpegs[with_plane[n - 1]],
                  f"{w}: entry {name} is the image of run {with_plane[n - 1]}")
        state["zips"] += 1

    every_plane = {p for r in runs for p in r["FocalPlanes"]}
    empty_plane = next(p for p in range(99, 200) if p not in every_plane)
    api.status("allimages", {"EmbryoID": embryo_id, "ImageOverlay": "false",
                             "focalPlane": empty_plane}, 204, "allimages at a plane without images")
    api.status("image", {"EmbryoID": embryo_id, "ImageRun": 1, "focalPlane": empty_plane}, 204,
               "image at a plane without images")


def walk_embryo(api: OriginalApi, item: dict, expected: Expected, state: dict):
    embryo_id = item["EmbryoID"]
    details = item["EmbryoDetails"]
    params = {"EmbryoID": embryo_id}

    body = api.json("embryodetails", params)
    check_keys(body, ["EmbryoID", "EmbryoDetails"], "embryodetails")
    check(body["EmbryoID"] == embryo_id, "embryodetails names the embryo")
    check_details(body["EmbryoDetails"], "embryodetails.EmbryoDetails")
    check(body["EmbryoDetails"] == details, f"embryodetails of {embryo_id} equals its embryodata")

    body = api.json("embryofate", params)
    check_keys(body, ["EmbryoID", "EmbryoFate"], "embryofate")
    check(body["EmbryoID"] == embryo_id, "embryofate names the embryo")
    check(body["EmbryoFate"] == details["EmbryoFate"], f"embryofate of {embryo_id} equals its details")
    check(body["EmbryoFate"] == expected.fates.get(embryo_id, "Undecided"),
          f"embryofate of {embryo_id} is the fate set: {body['EmbryoFate']}")

    body = api.json("evaluation", params)
    check_keys(body, ["EmbryoID", "Evaluation"], "evaluation")
    check(body["EmbryoID"] == embryo_id, "evaluation names the embryo")
    check_evaluation(body["Evaluation"], "evaluation.Evaluation")
    check(body["Evaluation"] == item["Evaluation"], f"evaluation of {embryo_id} equals its embryodata")
    if embryo_id in expected.evaluations:
        model, value = expected.evaluations[embryo_id]
        e = body["Evaluation"]
        check((e["Model"], e["Evaluation"]) == (model, value),
              f"evaluation of {embryo_id} is the latest score {model} {value}: {e}")
        check(e["User"] == api.user, f"evaluation of {embryo_id} names its user: {e['User']!r}")
    else:
        check(body["Evaluation"]["Model"] == "", f"{embryo_id} has no evaluation")

    body = api.json("fertilizationtime", params)
    check_keys(body, ["EmbryoID", "FertilizationTime"], "fertilizationtime")
    check(body["EmbryoID"] == embryo_id, "fertilizationtime names the embryo")
    check_time(body["FertilizationTime"], "fertilizationtime.FertilizationTime")
    check(body["FertilizationTime"] == details["FertilizationTime"],
          f"fertilizationtime of {embryo_id} equals its details")

    body = api.json("imageruns", params)
    check_keys(body, ["EmbryoID", "ImageRuns"], "imageruns")
    check(body["EmbryoID"] == embryo_id, "imageruns names the embryo")
    runs = body["ImageRuns"]
    check(isinstance(runs, list), "imageruns.ImageRuns is a list")
    previous = None
    for n, run in enumerate(runs, start=1):
        w = f"imageruns {embryo_id}[{n - 1}]"
        check_keys(run, ["ImageRun", "Time", "FocalPlanes"], w)
        check(run["ImageRun"] == n, f"{w}.ImageRun counts from 1: {run['ImageRun']!r}")
        check_time(run["Time"], f"{w}.Time")
        check(previous is None or parse_time(run["Time"]) >= previous, f"{w}: runs are in time order")
        previous = parse_time(run["Time"])
        planes = run["FocalPlanes"]
        check(isinstance(planes, list) and planes and all(is_int(p) for p in planes),
              f"{w}.FocalPlanes is a list of whole numbers: {planes!r}")
    state["runs"] += len(runs)
    if runs:
        walk_images(api, embryo_id, runs, state)
    else:
        api.status("image", {"EmbryoID": embryo_id, "ImageRun": 1}, 204, "image of an embryo without runs")


def walk(api: OriginalApi, expected: Expected):
    state = {"patients": 0, "treatments": 0, "embryos": 0, "runs": 0, "images": 0, "zips": 0,
             "scores": 0, "transfers": 0}

    # Login, and a token that is no longer valid: 401, then the wrapper logs in again.
    api.login()
    check(api.logins == 1, "logged in")
    stale = api.token
    response = api.raw("patients", None, "0" * 32)
    check(response.status_code == 401, f"a bogus token answers 401, not {response.status_code}")
    check_error_body(response, "bogus token")
    response = api.raw("patients", None, None)
    check(response.status_code == 401, f"no token answers 401, not {response.status_code}")
    api.token = "f" * 32  # the token expired while the client was idle
    patients = check_patient_list(api.json("patients"), "patients")
    check(api.logins == 2, "the 401 made the client log in again, once")
    check(api.token != stale and TOKEN_RE.match(api.token), "the new login gave a new token")
    response = api.raw("patients", None, stale)
    check(response.status_code == 200, "an earlier token stays valid until it expires")
    check(len(patients) >= 1, "patients lists the uploaded patient")

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
        idx = p["PatientIDx"]
        body = api.json("TREATMENT", {"patientIDx": idx})
        check_keys(body, ["TreatmentList"], "TREATMENT")
        names = body["TreatmentList"]
        check(isinstance(names, list) and all(isinstance(n, str) for n in names),
              f"TREATMENT.TreatmentList is a list of strings: {names!r}")
        check(len(names) == len(set(names)), "treatment names are unique")
        treatments_seen[idx] = names
        for name in names:
            state["treatments"] += 1
            params = {"PatientIDx": idx, "TreatmentName": name}
            body = api.json("embryoID", params)
            check_keys(body, ["EmbryoIDs"], "embryoID")
            ids = body["EmbryoIDs"]
            check(isinstance(ids, list) and all(isinstance(i, str) for i in ids),
                  f"embryoID.EmbryoIDs is a list of strings: {ids!r}")
            body = api.json("embryodata", params)
            check_keys(body, ["EmbryoDataList"], "embryodata")
            data = body["EmbryoDataList"]
            check(isinstance(data, list), "embryodata.EmbryoDataList is a list")
            for i, item in enumerate(data):
                check_embryo_data(item, f"embryodata {name}[{i}]")
            check([item["EmbryoID"] for item in data] == ids,
                  f"embryodata of {name} holds the embryos embryoID lists, in order")
            lower = api.json("embryodata", {"patientidx": idx, "treatmentname": name})
            check(lower == body, "parameter names ignore case")
            for item in data:
                state["embryos"] += 1
                embryo_ids_seen.add(item["EmbryoID"])
                t = parse_time(item["EmbryoDetails"]["FertilizationTime"])
                fertilization[idx] = max(fertilization.get(idx, t), t)
                walk_embryo(api, item, expected, state)

            body = api.json("IDASCORE", params)
            check_keys(body, ["Scores"], "IDASCORE")
            check(isinstance(body["Scores"], list), "IDASCORE.Scores is a list")
            for i, s in enumerate(body["Scores"]):
                w = f"IDASCORE {name}[{i}]"
                check_keys(s, ["EmbryoID", "Score", "Viability"], w)
                for key in ["EmbryoID", "Score", "Viability"]:
                    check_str(s, key, w)
                check(s["EmbryoID"] in ids, f"{w} is an embryo of the treatment")
                check(s["EmbryoID"] in expected.scores, f"{w}: only embryos given a score are listed")
                check((s["Score"], s["Viability"]) == expected.scores[s["EmbryoID"]],
                      f"{w} is the score set: {s}")
                state["scores"] += 1
                one = api.json("IDASCORE", {"EmbryoID": s["EmbryoID"]})
                check(one == {"Scores": [s]}, f"IDASCORE of embryo {s['EmbryoID']} alone: {one}")

    check(state["embryos"] >= 1, "the walk reached embryos")
    check(state["images"] >= 1 and state["zips"] >= 1, "the walk reached images and archives")
    check(state["scores"] == len(expected.scores),
          f"IDASCORE lists every score set ({state['scores']} of {len(expected.scores)})")

    for p in patients:
        idx = p["PatientIDx"]
        body = api.json("transfers", {"PatientIDx": idx})
        check_keys(body, ["PatientIDx", "Transfers"], "transfers")
        check(body["PatientIDx"] == idx, "transfers names the patient")
        check(isinstance(body["Transfers"], list), "transfers.Transfers is a list")
        for i, t in enumerate(body["Transfers"]):
            w = f"transfers {idx}[{i}]"
            check_keys(t, ["TransferID", "TreatmentName", "TransferDate", "EmbryoIDs",
                           "GestationalSacs", "FetalHeartbeats", "ClinicalPregnancy",
                           "LiveBirth", "Comment"], w)
            check_int(t, "TransferID", w)
            check(t["TreatmentName"] in treatments_seen[idx], f"{w}.TreatmentName is the patient's")
            check_time(t["TransferDate"], f"{w}.TransferDate")
            check(isinstance(t["EmbryoIDs"], list) and all(e in embryo_ids_seen for e in t["EmbryoIDs"]),
                  f"{w}.EmbryoIDs are known embryos: {t['EmbryoIDs']!r}")
            for key in ["GestationalSacs", "FetalHeartbeats"]:
                check(t[key] is None or is_int(t[key]), f"{w}.{key} is a whole number or null")
            for key in ["ClinicalPregnancy", "LiveBirth"]:
                check(t[key] is None or isinstance(t[key], bool), f"{w}.{key} is true, false or null")
            check_str(t, "Comment", w)
            if expected.transfer and t["TransferID"] == expected.transfer["TransferID"]:
                check(t == expected.transfer, f"{w} is the transfer written: {t}")
            state["transfers"] += 1
    check(state["transfers"] >= (1 if expected.transfer else 0), "transfers lists the transfer written")

    ongoing = check_patient_list(api.json("ongoingpatients"), "ongoingpatients")
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

    # Refusals.
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
        api.status(name, {"EmbryoID": UNKNOWN_EMBRYO}, 400, f"{name} of an unknown embryo")
    api.status("image", {"EmbryoID": UNKNOWN_EMBRYO, "ImageRun": 1, "focalPlane": 0}, 400,
               "image of an unknown embryo")
    api.status("allimages", {"EmbryoID": UNKNOWN_EMBRYO, "ImageOverlay": "false", "focalPlane": 0},
               400, "allimages of an unknown embryo")
    api.status("TREATMENT", {"patientIDx": 987654321}, 400, "an unknown patient")
    api.status("TREATMENT", {"patientIDx": "abc"}, 400, "a PatientIDx that is not a number")
    api.status("embryoID", {"PatientIDx": some_patient, "TreatmentName": "no-such-treatment"}, 400,
               "an unknown treatment")
    api.status("nosuchcall", None, 400, "an unknown call")

    print(
        f"walked {state['patients']} patients, {state['treatments']} treatments, "
        f"{state['embryos']} embryos, {state['runs']} image runs, {state['images']} images, "
        f"{state['zips']} archives, {state['scores']} scores, {state['transfers']} transfers; "
        f"{api.logins} logins, {api.busy_retries} busy retries"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="https://HOST:PORT")
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    args = parser.parse_args()
    base = args.base.rstrip("/")
    try:
        expected = setup_through_rest(base, args.user, args.password)
        walk(OriginalApi(base, args.user, args.password), expected)
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
