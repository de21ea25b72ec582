#!/usr/bin/env python3
"""Independent test client for the esserver viewer protocol, version 1.

Written only from docs/protocol/viewer.md and docs/protocol/viewer.proto (no server source),
to show that the documents suffice to implement a viewer.

Usage:
    viewer_client_test.py --host 127.0.0.1 --port PORT --cert SERVER_CERT.pem \
        --proto-dir DIR --editor USER --editor2 USER --viewer USER --password PASSWORD

The server must hold at least one patient with a dish whose embryos have images, and the three
users (two with the `edit` right, one with `view`), all with PASSWORD.
Exit code 0 only if every check passes.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import socket
import ssl
import struct
import sys
import tempfile
import time

TIMEOUT_S = 15.0
# viewer.md section 3: largest frame before login.
LOGIN_BYTES_MAX = 65536

# viewer.md section 10.
AUTH_FAILED = 5
LOGIN_REQUIRED = 4
PERMISSION_DENIED = 9
CONFLICT = 13

pb = None


class CheckFailed(Exception):
    pass


class ServerError(Exception):
    def __init__(self, error):
        super().__init__(f"{error.name} ({error.code}): {error.message}")
        self.error = error


def check(condition: bool, what: str):
    if not condition:
        raise CheckFailed(what)
    print(f"  ok: {what}")


def compile_proto(proto_dir: str, out_dir: str):
    from grpc_tools import protoc

    proto_file = os.path.join(proto_dir, "viewer.proto")
    rc = protoc.main(["grpc_tools.protoc", f"-I{os.path.abspath(proto_dir)}",
                      f"--python_out={out_dir}", os.path.abspath(proto_file)])
    if rc != 0:
        raise SystemExit(f"protoc failed on {proto_file}")
    sys.path.insert(0, out_dir)
    return importlib.import_module("viewer_pb2")


def pem_to_der(path: str) -> bytes:
    text = open(path, encoding="ascii").read()
    begin = "-----BEGIN CERTIFICATE-----"
    first = text[text.index(begin): text.index("-----END CERTIFICATE-----") + 25]
    return ssl.PEM_cert_to_DER_cert(first)


class Conn:
    """One TLS connection, the certificate pinned (section 2)."""

    def __init__(self, host: str, port: int, cert: str):
        raw = socket.create_connection((host, port), timeout=TIMEOUT_S)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=cert)
        self.sock = ctx.wrap_socket(raw, server_hostname=None)
        self.sock.settimeout(TIMEOUT_S)
        presented = self.sock.getpeercert(binary_form=True)
        if presented != pem_to_der(cert):
            raise CheckFailed("the server's certificate is not the pinned one: "
                              + hashlib.sha256(presented or b"").hexdigest())
        self.buf = bytearray()
        self.seq = 0
        self.notices = []   # ChangeNotice messages (pushed with seq 0)
        self.early = []     # answers that arrived while waiting for another seq
        self.closed = False

    def send(self, **request) -> int:
        self.seq += 1
        message = pb.ClientMessage(seq=self.seq, **request)
        payload = message.SerializeToString()
        self.sock.sendall(struct.pack(">I", len(payload)) + payload)
        return self.seq

    def _read_message(self):
        while True:
            if len(self.buf) >= 4:
                (length,) = struct.unpack(">I", self.buf[:4])
                if len(self.buf) >= 4 + length:
                    payload = bytes(self.buf[4: 4 + length])
                    del self.buf[: 4 + length]
                    message = pb.ServerMessage()
                    message.ParseFromString(payload)
                    return message
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                self.closed = True
                raise EOFError("the server closed the connection")
            self.buf += chunk

    def wait(self, seq: int):
        """The next answer to `seq`: (body name, body). An Error raises ServerError."""
        while True:
            for index, message in enumerate(self.early):
                if message.seq == seq:
                    del self.early[index]
                    return self._unpack(message)
            message = self._read_message()
            body = message.WhichOneof("body")
            if message.seq == 0 and body == "change":
                self.notices.append(message.change)
            elif message.seq == 0 and body == "error":
                raise ServerError(message.error)
            else:
                self.early.append(message)

    @staticmethod
    def _unpack(message):
        body = message.WhichOneof("body")
        if body == "error":
            raise ServerError(message.error)
        return body, getattr(message, body)

    def call(self, **request):
        return self.wait(self.send(**request))

    def poll_notices(self, until_seq: int):
        deadline = time.monotonic() + TIMEOUT_S
        while not any(n.change_seq >= until_seq for n in self.notices):
            if time.monotonic() > deadline:
                raise CheckFailed(f"no change notice up to seq {until_seq}")
            message = self._read_message()
            if message.seq == 0 and message.WhichOneof("body") == "change":
                self.notices.append(message.change)
            else:
                self.early.append(message)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def login(args, user: str, password: str | None = None) -> tuple[Conn, object]:
    conn = Conn(args.host, args.port, args.cert)
    kind, ok = conn.call(login=pb.Login(protocol_version=1, user=user,
                                        password=password or args.password,
                                        computer=f"PY-{user}", client="python test client"))
    if kind != "login_ok":
        raise CheckFailed(f"Login answered by {kind}")
    return conn, ok


def scenario(args):
    print("1. login, limits, rights")
    anna, ok = login(args, args.editor)
    check(ok.rights == "edit", "the editor has the `edit` right")
    check(ok.accepted_version == 1, "protocol version 1 accepted")
    check(ok.request_bytes_max >= LOGIN_BYTES_MAX and ok.response_bytes_max > 0,
          "LoginOk announces the frame limits")
    check(len(ok.session_token) >= 32, "a session token is issued")

    print("2. browse: patients, treatment, dishes, embryo")
    _, page = anna.call(list_patients=pb.ListPatients(limit=10))
    check(len(page.patients) >= 1, "ListPatients returns the patients")
    patient = page.patients[0]
    check(len(patient.treatments) >= 1, "the patient has a treatment")
    _, one = anna.call(get_patient=pb.GetPatient(patient_id=patient.patient_id))
    check(one.patient_id == patient.patient_id, "GetPatient returns the same patient")
    _, dishes = anna.call(list_dishes=pb.ListDishes(patient_id=patient.patient_id,
                                                   treatment_name=patient.treatments[0].name))
    check(len(dishes.dishes) >= 1, "ListDishes returns the dish")
    _, dish = anna.call(get_dish=pb.GetDish(dish_key=dishes.dishes[0].dish_key))
    check(len(dish.embryos) >= 1, "GetDish lists the embryos")
    embryo_id = dish.embryos[0].embryo_id
    _, embryo = anna.call(get_embryo=pb.GetEmbryo(embryo_id=embryo_id))
    check(embryo.version >= 1 and embryo.fate == "undecided", "a new embryo: version, fate")

    print("3. acquisitions, one image, overview, playback")
    _, acquisitions = anna.call(list_acquisitions=pb.ListAcquisitions(embryo_id=embryo_id))
    count = len(acquisitions.acquisitions)
    check(count >= 2, f"the embryo has {count} acquisitions")
    first = acquisitions.acquisitions[0]
    plane = first.focal_planes[0]
    _, image = anna.call(get_image=pb.GetImage(embryo_id=embryo_id,
                                               acquired_at_ms=first.acquired_at_ms,
                                               focal_plane=plane))
    check(image.jpeg[:2] == b"\xff\xd8", "GetImage returns a JPEG")
    _, overview = anna.call(dish_overview=pb.DishOverview(dish_key=dish.dish_key, focal_plane=plane))
    check(len(overview.wells) == len(dish.embryos), "DishOverview has one image per well")
    seq = anna.send(playback=pb.Playback(embryo_id=embryo_id, focal_plane=plane))
    times = []
    while True:
        _, frame = anna.wait(seq)
        if frame.HasField("image"):
            times.append(frame.image.acquired_at_ms)
        if frame.last:
            break
    check(len(times) == count and times == sorted(times), "Playback streams every frame in order")
    try:
        anna.call(get_embryo=pb.GetEmbryo(embryo_id="NO-SUCH-EMBRYO"))
        raise CheckFailed("an unknown embryo was found")
    except ServerError as e:
        check(e.error.name == "not_found", "an unknown embryo is not_found")

    print("4. a save is pushed to another viewer; a stale save is a conflict")
    bert, _ = login(args, args.editor2)
    annotation = pb.AnnotationInput(name="t2", event_at_ms=first.acquired_at_ms, has_event=True,
                                    source="manual")
    kind, saved = anna.call(add_annotation=pb.AddAnnotation(
        embryo_id=embryo_id, expected_version=embryo.version, annotation=annotation))
    check(kind == "saved" and saved.version == embryo.version + 1, "Saved with the next version")
    bert.poll_notices(saved.change_seq)
    notice = [n for n in bert.notices if n.change_seq == saved.change_seq][0]
    check(notice.entity == "embryo" and notice.id == embryo_id and notice.version == saved.version,
          "the other viewer is pushed the change with the new version")
    try:
        bert.call(set_fate=pb.SetFate(embryo_id=embryo_id, expected_version=embryo.version,
                                      fate="transfer"))
        raise CheckFailed("a stale write was accepted")
    except ServerError as e:
        check(e.error.code == CONFLICT and e.error.current_version == saved.version,
              "a stale version is refused with conflict and the current version")
        check('"t2"' in e.error.current_json, "the conflict carries the current state")
    kind, _ = bert.call(set_fate=pb.SetFate(embryo_id=embryo_id, expected_version=saved.version,
                                           fate="transfer"))
    check(kind == "saved", "a save on the current version succeeds")

    print("5. rights: a view user cannot write")
    vera, ok = login(args, args.viewer)
    check(ok.rights == "view", "the viewer has the `view` right")
    try:
        vera.call(set_embryo_comment=pb.SetEmbryoComment(embryo_id=embryo_id,
                                                         expected_version=saved.version + 1,
                                                         comment="x"))
        raise CheckFailed("a view user wrote")
    except ServerError as e:
        check(e.error.code == PERMISSION_DENIED, "permission_denied")
    kind, _ = vera.call(ping=pb.Ping())
    check(kind == "done", "the connection stays open after permission_denied")

    print("6. refusals that close the connection")
    conn = Conn(args.host, args.port, args.cert)
    try:
        conn.call(ping=pb.Ping())
        raise CheckFailed("a request before login was answered")
    except ServerError as e:
        check(e.error.code == LOGIN_REQUIRED, "a request before Login is login_required")
    conn.close()
    try:
        login(args, args.editor, "Not-the-password-1")
        raise CheckFailed("a wrong password logged in")
    except ServerError as e:
        check(e.error.code == AUTH_FAILED, "a wrong password is auth_failed")

    print("7. resume after a dropped connection; logout")
    token, last = ok.session_token, ok.last_change_seq
    vera.close()
    again = Conn(args.host, args.port, args.cert)
    kind, resumed = again.call(resume=pb.Resume(protocol_version=1, session_token=token,
                                                changes_after=last))
    check(kind == "login_ok" and resumed.user == args.viewer, "Resume continues the session")
    kind, _ = again.call(logout=pb.Logout())
    check(kind == "done", "Logout is answered by Done")
    for conn in (anna, bert, again):
        conn.close()
    print("PASS: all checks passed")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--proto-dir", required=True)
    parser.add_argument("--editor", required=True)
    parser.add_argument("--editor2", required=True)
    parser.add_argument("--viewer", required=True)
    parser.add_argument("--password", required=True)
    args = parser.parse_args()
    global pb
    with tempfile.TemporaryDirectory() as out_dir:
        pb = compile_proto(args.proto_dir, out_dir)
        try:
            scenario(args)
        except (CheckFailed, ServerError, EOFError, OSError) as e:
            print(f"FAIL: {type(e).__name__}: {e}")
            sys.exit(1)


if __name__ == "__main__":
    main()
