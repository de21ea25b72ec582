#!/usr/bin/env bash
# Runs the whole test suite. Installs what the tests need when it is missing, so a fresh
# machine needs nothing by hand: cargo-nextest, and the Python packages of the client tests
# (protobuf, grpcio-tools for its protoc; requests for the original public API's walk;
# schemathesis for the OpenAPI contract; selenium for the browser test; tzdata for the
# time zones of the original API walk; moto[server] for the archive tier's S3-compatible
# object store), and Debian's
# chromium and chromium-driver for the browser test of the web interface; cargo-deb for the
# Debian package, which the last phase builds, installs, runs and removes (as root; see
# scripts/package-test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

phase_start=$(date +%s)
phase() {
  local now; now=$(date +%s)
  echo "== phase '$1' took $((now - phase_start)) s"
  phase_start=$now
}

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "== installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
if [ "$(id -u)" -eq 0 ] && ! cargo deb --version >/dev/null 2>&1; then
  echo "== installing cargo-deb"
  cargo install --locked cargo-deb
fi
schemathesis_pin=$(sed -n 's/^schemathesis==//p' tests/python/requirements.txt)
if ! python3 -c 'import google.protobuf, grpc_tools, requests, schemathesis, selenium, tzdata, moto.server' >/dev/null 2>&1 \
  || [ "$(python3 -c 'import schemathesis; print(schemathesis.__version__)' 2>/dev/null)" != "$schemathesis_pin" ]; then
  echo "== installing Python packages for the client and contract tests"
  python3 -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
fi
if ! [ -x /usr/bin/chromium ] || ! [ -x /usr/bin/chromedriver ]; then
  echo "== installing chromium and chromium-driver for the browser test"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver >/dev/null
fi
phase setup

# Free space first: the tests write bounded data (well under 2 GiB) into temporary directories.
avail_kb=$(df -Pk "${TMPDIR:-/tmp}" | awk 'NR==2 {print $4}')
if [ "${avail_kb:-0}" -lt $((2 * 1024 * 1024)) ]; then
  echo "error: less than 2 GiB free in ${TMPDIR:-/tmp}; the tests need that much scratch space" >&2
  exit 1
fi

cargo build --workspace --all-targets --release
phase build

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -- -D warnings
phase lint

cargo nextest run --workspace --release --no-fail-fast "$@"
phase test

# The Debian package, installed and run as the service account the way its unit does.
# (CI runs it after its performance gate instead: ESSERVER_PACKAGE_TEST=later.)
if [ $# -eq 0 ] && [ "${ESSERVER_PACKAGE_TEST:-now}" != later ]; then
  ./scripts/package-test.sh
  phase package
fi
