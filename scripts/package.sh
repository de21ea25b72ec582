#!/usr/bin/env bash
# Builds the Debian package of esserver (target/debian/esserver_<version>-1_<arch>.deb) with
# cargo-deb, installing cargo-deb when it is missing. The binaries are the release build of
# the workspace (esserver and loadtest); the configuration is the server's own defaults with
# the data directory /var/lib/esserver. docs/operations.md, "Running as a service".
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deb --version >/dev/null 2>&1; then
    echo "== installing cargo-deb (cargo install --locked cargo-deb)"
    cargo install --locked cargo-deb
fi
echo "== release build of the workspace"
cargo build --release --workspace --bins
mkdir -p target/package
target/release/esserver default-config --data-dir /var/lib/esserver > target/package/EmbryoServer.ini
echo "== cargo deb"
cargo deb --no-build --no-strip -p esserver "$@"
ls -l target/debian/*.deb
