#!/usr/bin/env python3
"""Independent test client for the esserver incubator protocol, version 1.

Written only from docs/protocol/incubator.md and docs/protocol/incubator.proto (no server
source), to show that the documents suffice for another vendor to implement a client.

Usage:
    incubator_client_test.py --host 127.0.0.1 --port PORT \
        [--tls --cert SERVER_CERT.pem] --proto-dir DIR

The proto file is compiled at run time with grpc_tools.protoc into a temporary directory.
Runs one scripted scenario, printing every step; exit code 0 only if every check passes.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import random
import secrets
import shutil
import socket
import ssl
import struct
import sys
import tempfile
import time

TIMEOUT_S = 15.0

# incubator.md section 4: message types.
HELLO = 1
HELLO_OK = 2
REGISTER_DISH = 3
IMAGE = 4
TELEMETRY = 5
SYNC_STATE = 6
SYNC_STATE_RESULT = 7
LIST_PATIENTS = 8
PATIENT_LIST = 9
ACK = 10
ERROR = 11
PING = 12

TYPE_NAMES = {
    1: "HELLO", 2: "HELLO_OK", 3: "REGISTER_DISH", 4: "IMAGE", 5: "TELEMETRY",
    6: "SYNC_STATE", 7: "SYNC_STATE_RESULT", 8: "LIST_PATIENTS", 9: "PATIENT_LIST",
    10: "ACK", 11: "ERROR", 12: "PING",
}

# incubator.md section 11: error codes.
ERROR_CODES = {
    1: "malformed_frame",
    2: "frame_too_large",
    3: "unknown_message_type",
    4: "unsupported_version",
    5: "hello_required",
    6: "auth_failed",
    7: "image_conflict",
    8: "unknown_dish",
    9: "unknown_well",
    10: "invalid_field",
    11: "sequence_error",
    12: "storage_unavailable",
    13: "disk_full",
    14: "shutting_down",
    15: "superseded",
    16: "handshake_timeout",
    17: "idle_timeout",
    18: "internal_error",
    19: "unexpected_message",
    20: "capacity_exceeded",
    21: "enrolment_in_progress",
}
ERROR_BY_NAME = {name: code for code, name in ERROR_CODES.items()}

# incubator.md section 3: frame_bytes_max before HELLO_OK.
FRAME_BYTES_MAX_BEFORE_HELLO_OK = 4 * 1024 * 1024

pb = None  # the generated incubator_pb2 module, set by compile_proto()


class CheckFailed(Exception):
    """A check of the scenario failed."""


class ConnectionClosed(Exception):
    """The server closed the connection (EOF, reset, or TLS close)."""


def log(msg: str) -> None:
    print(msg, flush=True)


def check(cond: bool, what: str) -> None:
    if not cond:
        raise CheckFailed(what)
    log(f"    ok: {what}")


def check_eq(actual, expected, what: str) -> None:
    if actual != expected:
        raise CheckFailed(f"{what}: expected {expected!r}, got {actual!r}")
    log(f"    ok: {what} == {expected!r}")


# --------------------------------------------------------------------------------------------
# Proto compilation


def compile_proto(proto_dir: str, out_dir: str):
    from grpc_tools import protoc

    proto_file = os.path.join(proto_dir, "incubator.proto")
    if not os.path.isfile(proto_file):
        raise SystemExit(f"no incubator.proto in {proto_dir}")
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-I{os.path.abspath(proto_dir)}",
        f"--python_out={out_dir}",
        os.path.abspath(proto_file),
    ])
    if rc != 0:
        raise SystemExit(f"protoc failed on {proto_file} (rc {rc})")
    sys.path.insert(0, out_dir)
    return importlib.import_module("incubator_pb2")


def message_class(msg_type: int):
    return {
        HELLO: pb.Hello, HELLO_OK: pb.HelloOk, REGISTER_DISH: pb.RegisterDish,
        IMAGE: pb.Image, TELEMETRY: pb.Telemetry, SYNC_STATE: pb.SyncState,
        SYNC_STATE_RESULT: pb.SyncStateResult, LIST_PATIENTS: pb.ListPatients,
        PATIENT_LIST: pb.PatientList, ACK: pb.Ack, ERROR: pb.Error, PING: pb.Ping,
    }[msg_type]


def describe(msg_type: int, msg) -> str:
    name = TYPE_NAMES.get(msg_type, f"type {msg_type}")
    if msg_type == ERROR:
        return (f"ERROR(seq={msg.seq}, code={msg.code}, name={msg.name!r}, "
                f"message={msg.message!r})")
    if msg_type == ACK:
        return f"ACK(seq={msg.seq}, duplicate={msg.duplicate})"
    if msg_type == HELLO_OK:
        return (f"HELLO_OK(server_id={msg.server_id!r}, accepted_version={msg.accepted_version}, "
                f"frame_bytes_max={msg.frame_bytes_max}, "
                f"inflight_requests_max={msg.inflight_requests_max}, "
                f"issued_secret={'<%d bytes>' % len(msg.issued_secret) if msg.issued_secret else '<empty>'}, "
                f"server_clock_ms={msg.server_clock_ms})")
    if msg_type == SYNC_STATE_RESULT:
        return f"SYNC_STATE_RESULT(seq={msg.seq}, known={msg.known}, wells={len(msg.wells)})"
    return f"{name}(seq={getattr(msg, 'seq', '-')})"


# --------------------------------------------------------------------------------------------
# Connection: framing (section 3), handshake (section 6), requests and seqs (section 7)


def load_pem_der(path: str) -> bytes:
    with open(path, "r", encoding="ascii") as f:
        pem = f.read()
    begin = "-----BEGIN CERTIFICATE-----"
    if begin not in pem:
        raise SystemExit(f"{path}: no PEM certificate")
    # The first certificate of the file is the server's certificate.
    first = pem[pem.index(begin):]
    first = first[: first.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    return ssl.PEM_cert_to_DER_cert(first)


class Conn:
    def __init__(self, host: str, port: int, tls: bool, cert: str | None, label: str):
        self.label = label
        self.buf = bytearray()
        self.closed = False
        self.next_seq = 1
        self.last_seq = 0
        self.inflight: set[int] = set()
        self.pending: dict[int, tuple[int, object]] = {}  # seq -> (type, msg) received early
        self.frame_bytes_max = FRAME_BYTES_MAX_BEFORE_HELLO_OK
        self.inflight_max = 1
        raw = socket.create_connection((host, port), timeout=TIMEOUT_S)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cafile=cert)
            self.sock = ctx.wrap_socket(raw, server_hostname=None)
            self.sock.settimeout(TIMEOUT_S)
            # Pinning (section 2): the presented certificate must be exactly the given one.
            peer_der = self.sock.getpeercert(binary_form=True)
            expected = load_pem_der(cert)
            if peer_der != expected:
                self.sock.close()
                raise CheckFailed(
                    f"[{label}] server certificate does not match the pinned one: sha256 "
                    f"{hashlib.sha256(peer_der or b'').hexdigest()} != "
                    f"{hashlib.sha256(expected).hexdigest()}")
            log(f"  [{label}] TLS {self.sock.version()} {self.sock.cipher()[0]}, "
                f"pinned cert sha256 {hashlib.sha256(peer_der).hexdigest()[:16]}... matches")
        else:
            self.sock = raw
            self.sock.settimeout(TIMEOUT_S)
            log(f"  [{label}] plain TCP connected to {host}:{port}")

    # ---- raw frames

    def send_raw_frame(self, msg_type: int, payload: bytes) -> None:
        length = 1 + len(payload)
        if length > self.frame_bytes_max:
            raise CheckFailed(f"client bug: frame of {length} bytes > frame_bytes_max")
        self.sock.sendall(struct.pack(">IB", length, msg_type) + payload)

    def send(self, msg_type: int, msg) -> None:
        self.send_raw_frame(msg_type, msg.SerializeToString())

    def _fill(self, n: int, deadline: float) -> None:
        while len(self.buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"[{self.label}] timed out waiting for data")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise TimeoutError(f"[{self.label}] timed out waiting for data") from None
            except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError,
                    ssl.SSLZeroReturnError) as e:
                self.closed = True
                raise ConnectionClosed(f"{type(e).__name__}: {e}") from None
            if not chunk:
                self.closed = True
                raise ConnectionClosed("EOF")
            self.buf += chunk

    def read_frame(self, timeout: float = TIMEOUT_S):
        """Read one whole frame; returns (type, decoded message)."""
        deadline = time.monotonic() + timeout
        self._fill(4, deadline)
        (length,) = struct.unpack(">I", self.buf[:4])
        if length < 1 or length > self.frame_bytes_max:
            raise CheckFailed(f"[{self.label}] server sent a frame with invalid length {length}")
        self._fill(4 + length, deadline)
        msg_type = self.buf[4]
        payload = bytes(self.buf[5:4 + length])
        del self.buf[:4 + length]
        if msg_type not in (HELLO_OK, SYNC_STATE_RESULT, PATIENT_LIST, ACK, ERROR):
            raise CheckFailed(f"[{self.label}] server sent non-server message type {msg_type}")
        msg = message_class(msg_type)()
        msg.ParseFromString(payload)
        return msg_type, msg

    def expect_closed(self, timeout: float = TIMEOUT_S) -> None:
        """Check that the server closes the connection (no further frame, then EOF)."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                t, m = self.read_frame(max(0.0, deadline - time.monotonic()))
                raise CheckFailed(f"[{self.label}] expected the connection to close, "
                                  f"got {describe(t, m)}")
        except ConnectionClosed as e:
            log(f"    ok: [{self.label}] connection closed by the server ({e})")
        except TimeoutError:
            raise CheckFailed(f"[{self.label}] connection still open {timeout:.0f} s after "
                              f"a closing ERROR") from None

    def close(self) -> None:
        try:
            if isinstance(self.sock, ssl.SSLSocket):
                try:
                    self.sock.settimeout(1.0)
                    self.sock.unwrap()
                except (OSError, ValueError, ssl.SSLError):
                    pass
            self.sock.close()
        except OSError:
            pass
        self.closed = True

    # ---- handshake

    def hello(self, serial: str, model: str, secret: str):
        """Send HELLO and return (type, msg) of the server's answer."""
        h = pb.Hello(
            protocol_version=1,
            serial_number=serial,
            model=model,
            firmware_version="pyclient-1.0",
            instrument_clock_ms=int(time.time() * 1000),
            secret=secret,
        )
        self.send(HELLO, h)
        t, m = self.read_frame()
        log(f"  [{self.label}] <- {describe(t, m)}")
        if t == HELLO_OK:
            self.frame_bytes_max = m.frame_bytes_max or FRAME_BYTES_MAX_BEFORE_HELLO_OK
            self.inflight_max = m.inflight_requests_max
        return t, m

    # ---- requests

    def request(self, msg_type: int, msg) -> int:
        if len(self.inflight) >= self.inflight_max:
            raise CheckFailed("client bug: in-flight limit would be exceeded")
        seq = self.next_seq
        self.next_seq += 1
        msg.seq = seq
        self.send(msg_type, msg)
        self.inflight.add(seq)
        self.last_seq = seq
        return seq

    def read_response(self, timeout: float = TIMEOUT_S):
        """Read the next response to an in-flight request; returns (seq, type, msg)."""
        t, m = self.read_frame(timeout)
        if t == ERROR and m.seq == 0:
            raise CheckFailed(f"[{self.label}] connection-level error: {describe(t, m)}")
        if t not in (ACK, ERROR, SYNC_STATE_RESULT, PATIENT_LIST):
            raise CheckFailed(f"[{self.label}] unexpected {describe(t, m)}")
        if m.seq not in self.inflight:
            raise CheckFailed(f"[{self.label}] response for a seq not in flight: {describe(t, m)}")
        self.inflight.discard(m.seq)
        return m.seq, t, m

    def wait_for(self, seq: int, timeout: float = TIMEOUT_S):
        """Wait for the response to one seq; responses to other seqs are kept for later."""
        deadline = time.monotonic() + timeout
        while seq not in self.pending:
            s, t, m = self.read_response(max(0.0, deadline - time.monotonic()))
            self.pending[s] = (t, m)
        return self.pending.pop(seq)

    def call(self, msg_type: int, msg, timeout: float = TIMEOUT_S):
        seq = self.request(msg_type, msg)
        log(f"  [{self.label}] -> {TYPE_NAMES[msg_type]} seq={seq}")
        t, m = self.wait_for(seq, timeout)
        log(f"  [{self.label}] <- {describe(t, m)}")
        return seq, t, m


def expect_error(t, m, seq: int, name: str, what: str) -> None:
    if t != ERROR:
        raise CheckFailed(f"{what}: expected ERROR {name}, got {describe(t, m)}")
    check_eq(m.seq, seq, f"{what}: ERROR seq")
    check_eq(m.code, ERROR_BY_NAME[name], f"{what}: ERROR code")
    check_eq(m.name, name, f"{what}: ERROR name")


def expect_ack(t, m, seq: int, duplicate: bool | None, what: str) -> None:
    if t != ACK:
        raise CheckFailed(f"{what}: expected ACK, got {describe(t, m)}")
    check_eq(m.seq, seq, f"{what}: ACK seq")
    if duplicate is not None:
        check_eq(m.duplicate, duplicate, f"{what}: ACK duplicate")


# --------------------------------------------------------------------------------------------
# Test data


def fake_jpeg(tag: str, size: int = 600) -> bytes:
    """Small valid-looking JPEG: SOI, a JFIF APP0, a COM segment with distinct content, EOI."""
    soi = b"\xff\xd8"
    app0 = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    body = (tag.encode() + b"|" + secrets.token_bytes(size)).replace(b"\xff", b"\xfe")
    body = body[:65000]
    com = b"\xff\xfe" + struct.pack(">H", len(body) + 2) + body
    return soi + app0 + com + b"\xff\xd9"


# --------------------------------------------------------------------------------------------
# The scenario


def scenario(args) -> None:
    host, port, tls, cert = args.host, args.port, args.tls, args.cert
    tag = secrets.token_hex(4).upper()
    serial = f"PY-{tag}"
    model = "es-d"
    dish_id = f"PYDISH-{tag}"
    patient_id = f"PY-MRN-{tag}"
    wells = {1: f"{dish_id}_E1", 2: f"{dish_id}_E2"}
    now_ms = int(time.time() * 1000)
    insemination_ms = now_ms - 3 * 24 * 3600 * 1000

    # ---------------------------------------------------------------- step 1
    log(f"STEP 1: connect, HELLO as new instrument serial={serial} model={model}")
    c = Conn(host, port, tls, cert, "conn1")
    t, m = c.hello(serial, model, "")
    if t != HELLO_OK:
        raise CheckFailed(f"HELLO: expected HELLO_OK, got {describe(t, m)}")
    check_eq(m.accepted_version, 1, "HELLO_OK.accepted_version")
    check(m.server_id != "", "HELLO_OK.server_id is non-empty")
    check(m.issued_secret != "", "HELLO_OK.issued_secret is non-empty (first connection)")
    check(len(m.issued_secret.encode()) <= 128, "issued_secret at most 128 bytes")
    check(m.inflight_requests_max >= 1, "HELLO_OK.inflight_requests_max >= 1")
    check(m.frame_bytes_max >= 1, "HELLO_OK.frame_bytes_max >= 1")
    stored_secret = m.issued_secret
    server_id = m.server_id

    # ---------------------------------------------------------------- step 2
    log(f"STEP 2: REGISTER_DISH {dish_id} (patient {patient_id}, wells {sorted(wells)})")
    reg = pb.RegisterDish(
        dish_id=dish_id,
        slot=2,
        patient=pb.Patient(patient_id=patient_id, first_name="Ada", last_name="Python",
                           date_of_birth="1990-04-17"),
        treatment_name=f"PY-{tag}-T1",
        insemination_time_ms=insemination_ms,
        wells=[pb.DishWell(well=w, embryo_id=e) for w, e in sorted(wells.items())],
    )
    seq, t, m = c.call(REGISTER_DISH, reg)
    expect_ack(t, m, seq, False, "REGISTER_DISH")

    # ---------------------------------------------------------------- step 3
    planes = [-30, -15, 0, 15, 30]  # EmbryoScope D style: offsets in micrometres
    acq_times = {1: [now_ms - 600_000, now_ms - 300_000],
                 2: [now_ms - 590_000, now_ms - 290_000]}
    images: dict[tuple[int, int, int], bytes] = {}
    for w in sorted(wells):
        for at in acq_times[w]:
            for p in planes:
                images[(w, at, p)] = fake_jpeg(f"{dish_id}/w{w}/t{at}/p{p}")
    keys = list(images)
    random.shuffle(keys)  # send in an arbitrary order; the server must sort
    window = max(1, min(c.inflight_max, 16))
    log(f"STEP 3: upload {len(keys)} IMAGEs, pipelined with window {window} "
        f"(inflight_requests_max={c.inflight_max})")
    check(len(set(images.values())) == len(images), "all JPEGs have distinct contents")
    check(all(j[:2] == b"\xff\xd8" and j[-2:] == b"\xff\xd9" for j in images.values()),
          "all JPEGs start with FF D8 and end with FF D9")
    seq_to_key: dict[int, tuple[int, int, int]] = {}
    acked: set[tuple[int, int, int]] = set()
    order_sent: list[int] = []
    order_acked: list[int] = []
    max_inflight = 0
    next_i = 0
    # A SYNC_STATE in the middle of the upload: reads are answered at once (section 7), so its
    # answer may overtake the ACKs of earlier IMAGEs; responses are matched by seq only.
    mid_sync_seq = None
    mid_sync_sent_keys: set[tuple[int, int, int]] = set()
    mid_sync_result = None
    deadline = time.monotonic() + 60
    while len(acked) < len(keys) or mid_sync_result is None:
        while next_i < len(keys) and len(c.inflight) < window:
            if mid_sync_seq is None and next_i == len(keys) // 2:
                mid_sync_seq = c.request(SYNC_STATE, pb.SyncState(dish_id=dish_id))
                mid_sync_sent_keys = set(keys[:next_i])
                order_sent.append(mid_sync_seq)
                max_inflight = max(max_inflight, len(c.inflight))
                continue
            w, at, p = keys[next_i]
            s = c.request(IMAGE, pb.Image(dish_id=dish_id, well=w, focal_plane=p,
                                          acquired_at_ms=at, jpeg=images[keys[next_i]]))
            seq_to_key[s] = keys[next_i]
            order_sent.append(s)
            next_i += 1
            max_inflight = max(max_inflight, len(c.inflight))
        if time.monotonic() > deadline:
            raise CheckFailed("image upload did not finish within 60 s")
        s, t, m = c.read_response()
        if s == mid_sync_seq:
            if t != SYNC_STATE_RESULT:
                raise CheckFailed(f"mid-upload SYNC_STATE: expected SYNC_STATE_RESULT, "
                                  f"got {describe(t, m)}")
            mid_sync_result = m
            order_acked.append(s)
            continue
        if s not in seq_to_key:
            raise CheckFailed(f"IMAGE: response for unknown seq {s}: {describe(t, m)}")
        if t != ACK:
            raise CheckFailed(f"IMAGE seq {s} {seq_to_key[s]}: expected ACK, got {describe(t, m)}")
        if m.duplicate:
            raise CheckFailed(f"IMAGE seq {s}: first upload acknowledged as duplicate")
        acked.add(seq_to_key[s])
        order_acked.append(s)
    log(f"    sent seqs {order_sent[0]}..{order_sent[-1]}, max in flight {max_inflight}, "
        f"ACK order {'matches' if order_acked == order_sent else 'differs from'} send order")
    check(max_inflight > 1 or window == 1, f"pipelined ({max_inflight} requests in flight at once)")
    # The mid-upload answer lists only durable images: a subset of those sent before it.
    listed = {(ws.well, a.acquired_at_ms, p) for ws in mid_sync_result.wells
              for a in ws.acquisitions for p in a.focal_planes}
    log(f"    mid-upload SYNC_STATE (seq {mid_sync_seq}) listed {len(listed)} images; "
        f"{len(mid_sync_sent_keys)} had been sent before it")
    check(mid_sync_result.known and listed <= mid_sync_sent_keys,
          "mid-upload SYNC_STATE_RESULT lists only images sent before it")
    check_eq(len(acked), len(keys), "number of acknowledged images")

    # ---------------------------------------------------------------- step 4
    dup_key = keys[0]
    log(f"STEP 4: resend acknowledged image well={dup_key[0]} t={dup_key[1]} plane={dup_key[2]}")
    seq, t, m = c.call(IMAGE, pb.Image(dish_id=dish_id, well=dup_key[0], focal_plane=dup_key[2],
                                       acquired_at_ms=dup_key[1], jpeg=images[dup_key]))
    expect_ack(t, m, seq, True, "resent IMAGE")

    # ---------------------------------------------------------------- step 5
    log("STEP 5: same key, different bytes -> image_conflict; connection stays open")
    other = fake_jpeg("conflicting bytes")
    assert other != images[dup_key]
    seq, t, m = c.call(IMAGE, pb.Image(dish_id=dish_id, well=dup_key[0], focal_plane=dup_key[2],
                                       acquired_at_ms=dup_key[1], jpeg=other))
    expect_error(t, m, seq, "image_conflict", "conflicting IMAGE")
    seq, t, m = c.call(PING, pb.Ping())
    expect_ack(t, m, seq, None, "PING after image_conflict")

    # ---------------------------------------------------------------- step 6
    log(f"STEP 6: SYNC_STATE {dish_id}")
    seq, t, m = c.call(SYNC_STATE, pb.SyncState(dish_id=dish_id))
    if t != SYNC_STATE_RESULT:
        raise CheckFailed(f"SYNC_STATE: expected SYNC_STATE_RESULT, got {describe(t, m)}")
    check_eq(m.seq, seq, "SYNC_STATE_RESULT.seq")
    check_eq(m.known, True, "SYNC_STATE_RESULT.known")
    check_eq(m.dish_id, dish_id, "SYNC_STATE_RESULT.dish_id")
    got_wells = [ws.well for ws in m.wells]
    check_eq(got_wells, sorted(wells), "registered wells, ascending")
    for ws in m.wells:
        check_eq(ws.embryo_id, wells[ws.well], f"well {ws.well} embryo_id")
        got = [(a.acquired_at_ms, list(a.focal_planes)) for a in ws.acquisitions]
        expected = []
        for at in sorted({k[1] for k in acked if k[0] == ws.well}):
            expected.append((at, sorted(k[2] for k in acked if k[0] == ws.well and k[1] == at)))
        check_eq(got, expected, f"well {ws.well} acquisitions (time, ascending planes)")

    # ---------------------------------------------------------------- step 7
    log("STEP 7: IMAGE for an unknown dish -> unknown_dish")
    seq, t, m = c.call(IMAGE, pb.Image(dish_id=f"PYNODISH-{tag}", well=1, focal_plane=0,
                                       acquired_at_ms=now_ms, jpeg=fake_jpeg("nodish")))
    expect_error(t, m, seq, "unknown_dish", "IMAGE for unknown dish")
    seq, t, m = c.call(PING, pb.Ping())
    expect_ack(t, m, seq, None, "PING after unknown_dish")

    # ---------------------------------------------------------------- step 8
    log("STEP 8: disconnect, reconnect with the stored secret")
    check_eq(len(c.inflight), 0, "no unanswered requests before closing")
    c.close()
    c2 = Conn(host, port, tls, cert, "conn2")
    t, m = c2.hello(serial, model, stored_secret)
    if t != HELLO_OK:
        raise CheckFailed(f"HELLO with stored secret: expected HELLO_OK, got {describe(t, m)}")
    check_eq(m.accepted_version, 1, "HELLO_OK.accepted_version")
    check_eq(m.issued_secret, "", "HELLO_OK.issued_secret (no new secret)")
    check_eq(m.server_id, server_id, "HELLO_OK.server_id is stable")
    seq, t, m = c2.call(PING, pb.Ping())
    check_eq(seq, 1, "seq starts again at 1 on a new connection")
    expect_ack(t, m, seq, None, "PING on reconnected connection")
    c2.close()

    log("STEP 8b: reconnect with a wrong secret -> auth_failed (seq 0), closed")
    c3 = Conn(host, port, tls, cert, "conn3")
    wrong = "wrong-" + secrets.token_hex(8)
    if wrong == stored_secret:
        wrong += "x"
    t, m = c3.hello(serial, model, wrong)
    expect_error(t, m, 0, "auth_failed", "HELLO with wrong secret")
    c3.expect_closed()
    c3.close()

    # ---------------------------------------------------------------- step 9
    log("STEP 9: unknown message type 200 on an established connection")
    c4 = Conn(host, port, tls, cert, "conn4")
    t, m = c4.hello(serial, model, stored_secret)
    if t != HELLO_OK:
        raise CheckFailed(f"HELLO with stored secret: expected HELLO_OK, got {describe(t, m)}")
    check_eq(m.issued_secret, "", "HELLO_OK.issued_secret (no new secret)")
    # A payload that would be a valid Ping; the type byte alone must be rejected.
    c4.send_raw_frame(200, pb.Ping(seq=1).SerializeToString())
    log("  [conn4] -> frame type 200")
    try:
        t, m = c4.read_frame()
    except ConnectionClosed as e:
        raise CheckFailed(f"connection closed without ERROR after type 200 ({e})") from None
    log(f"  [conn4] <- {describe(t, m)}")
    expect_error(t, m, 0, "unknown_message_type", "frame of type 200")
    c4.expect_closed()
    c4.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", required=True, type=int)
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--cert", help="server certificate (PEM) to pin, required with --tls")
    ap.add_argument("--proto-dir", required=True, help="directory containing incubator.proto")
    args = ap.parse_args()
    if args.tls and not args.cert:
        ap.error("--tls needs --cert")

    global pb
    tmp = tempfile.mkdtemp(prefix="incubator_pb_")
    try:
        pb = compile_proto(args.proto_dir, tmp)
        scenario(args)
    except CheckFailed as e:
        log(f"FAIL: {e}")
        return 1
    except (TimeoutError, ConnectionClosed, OSError, ssl.SSLError) as e:
        log(f"FAIL: {type(e).__name__}: {e}")
        return 1
    except Exception as e:  # decode errors and the like: report, never hang or crash silently
        import traceback
        traceback.print_exc()
        log(f"FAIL: {type(e).__name__}: {e}")
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log("PASS: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
