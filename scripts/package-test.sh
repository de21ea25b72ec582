#!/usr/bin/env bash
# The Debian package on this machine, as an administrator meets it:
#   1. build it (scripts/package.sh) and install it with dpkg -i;
#   2. systemd-analyze verify the installed unit; the account, the data directory (0700)
#      and the configuration (0640 root:esserver) are as the package promises;
#   3. create the first administrator as root before the first start (the command runs as the
#      service account, so the database it makes is the service's); start the installed binary
#      as the unit does (its User, WorkingDirectory, ExecStart and a clean environment with a
#      notify socket and a watchdog), wait for READY=1, check /healthz and `esserver status`
#      (run as root with no --data: it finds the service), stop it with SIGTERM (STOPPING=1,
#      exit 0); nothing in the data directory belongs to another account;
#   4. dpkg -r leaves the data directory, the configuration and the account; dpkg -P removes
#      the account and the configuration, and leaves the data directory to root;
#   5. installed again: the data is the account's again; installed once more over itself with
#      the configuration deleted by hand: no error; purged.
# Needs root, dpkg and systemd-analyze; says SKIP and exits 0 without them. Changes the system:
# installs and purges the package, and removes /var/lib/esserver at the end (it refuses to
# start when the package or that directory is there already).
set -euo pipefail
cd "$(dirname "$0")/.."

skip() { echo "package test: SKIP ($1)"; exit 0; }
fail() { echo "package test: FAIL: $1" >&2; exit 1; }
[ "$(id -u)" = 0 ] || skip "needs root"
command -v dpkg >/dev/null || skip "no dpkg"
command -v systemd-analyze >/dev/null || skip "no systemd-analyze"
command -v setpriv >/dev/null || skip "no setpriv"
if dpkg -s esserver >/dev/null 2>&1; then
    skip "the esserver package is installed on this machine; not touching it"
fi
[ ! -e /var/lib/esserver ] || skip "/var/lib/esserver exists; not touching it"

work=$(mktemp -d)
pid=""
listener=""
cleanup() {
    [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
    [ -n "$listener" ] && kill "$listener" 2>/dev/null || true
    dpkg -P esserver >/dev/null 2>&1 || true
    rm -rf /var/lib/esserver "$work"
}
trap cleanup EXIT

rm -rf target/debian
./scripts/package.sh >"$work/package.log" 2>&1 || { tail -30 "$work/package.log"; fail "the package does not build"; }
deb=$(ls target/debian/esserver_*.deb | head -1)
echo "== dpkg -i $deb"
dpkg -i "$deb"

unit=/usr/lib/systemd/system/esserver.service
[ -f "$unit" ] || unit=/lib/systemd/system/esserver.service
echo "== systemd-analyze verify $unit"
systemd-analyze verify "$unit"

getent passwd esserver >/dev/null || fail "no account esserver"
[ "$(stat -c '%a %U' /var/lib/esserver)" = "700 esserver" ] || fail "/var/lib/esserver is $(stat -c '%a %U' /var/lib/esserver)"
[ "$(stat -c '%a %U %G' /etc/esserver/EmbryoServer.ini)" = "640 root esserver" ] || fail "the configuration is $(stat -c '%a %U %G' /etc/esserver/EmbryoServer.ini)"
grep -q '^data_dir = /var/lib/esserver$' /etc/esserver/EmbryoServer.ini || fail "the configuration names another data directory"

# An administrator's edit of the conffile: free ports, so that nothing else on the machine
# is disturbed.
read -r p1 p2 p3 p4 < <(python3 -c '
import socket
s = [socket.socket() for _ in range(4)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])')
sed -i "s/^port = 3000$/port = $p1/; s/^port = 3010$/port = $p2/; s/^port = 4000$/port = $p3/; s/^port = 4010$/port = $p4/" /etc/esserver/EmbryoServer.ini

# The unit's way of starting it.
exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
user=$(sed -n 's/^User=//p' "$unit")
directory=$(sed -n 's/^WorkingDirectory=//p' "$unit")
[ -n "$exec_start" ] && [ -n "$user" ] && [ -n "$directory" ] || fail "the unit lacks ExecStart, User or WorkingDirectory"

# The fake service manager: a datagram socket the service account may write to.
socket="$work/notify.sock"
python3 - "$socket" "$work/notify.log" <<'PY' &
import os, socket, sys
path, log = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
os.chmod(path, 0o777)
with open(log, "a", buffering=1) as out:
    while True:
        out.write(s.recv(4096).decode() + "\n")
PY
listener=$!
chmod 755 "$work"
for _ in $(seq 50); do [ -S "$socket" ] && break; sleep 0.1; done

echo "== the first administrator, before the first start (as root, no --data)"
printf 'Admin-2026!\n' | esserver user add admin1 --admin --password-stdin
[ "$(stat -c %U /var/lib/esserver/esserver.redb)" = esserver ] || fail "the database made by an admin command is not the service's"

echo "== $exec_start (as $user, in $directory)"
# setpriv execs (no process of its own): $! is the server.
# shellcheck disable=SC2086
(cd "$directory" && exec setpriv --reuid="$user" --regid="$user" --init-groups \
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME="$directory" \
    NOTIFY_SOCKET="$socket" WATCHDOG_USEC=2000000 $exec_start) >"$work/server.log" 2>&1 &
pid=$!
for _ in $(seq 600); do
    grep -q '^READY=1$' "$work/notify.log" 2>/dev/null && break
    kill -0 "$pid" 2>/dev/null || { cat "$work/server.log"; fail "the server exited before it was ready"; }
    sleep 0.1
done
grep -q '^READY=1$' "$work/notify.log" || { cat "$work/server.log"; fail "no READY=1 within 60 s"; }
[ "$(stat -c %U "/proc/$pid")" = "$user" ] || fail "the server does not run as $user"
echo "ready: $(grep -c . "$work/notify.log") notify messages"

health=$(curl -sk --max-time 10 "https://127.0.0.1:$p4/healthz")
echo "healthz: $health"
echo "$health" | grep -q '"status":"ok"' || fail "/healthz is not ok"
echo "$health" | grep -q '"commit"' || fail "/healthz has no commit"
echo "== esserver status (as root, no --data)"
status=$(esserver status)
echo "$status" | head -3
echo "$status" | grep -q "server:     running, pid $pid," || fail "status does not find the running service"
sleep 1.5
grep -q '^WATCHDOG=1$' "$work/notify.log" || fail "no watchdog ping"

left=$(find /var/lib/esserver ! -user esserver | head -3)
[ -z "$left" ] || fail "not the service's: $left"

echo "== SIGTERM"
kill -TERM "$pid"
code=0
wait "$pid" || code=$?
pid=""
[ "$code" = 0 ] || { cat "$work/server.log"; fail "the server exited with $code"; }
grep -q '^STOPPING=1$' "$work/notify.log" || fail "no STOPPING=1"
grep -q 'stopped cleanly' "$work/server.log" || fail "no clean stop in the log"

echo "== dpkg -r esserver"
dpkg -r esserver
[ -f /var/lib/esserver/esserver.redb ] || fail "dpkg -r removed the data"
[ -f /etc/esserver/EmbryoServer.ini ] || fail "dpkg -r removed the configuration"
getent passwd esserver >/dev/null || fail "dpkg -r removed the account"
echo "== dpkg -P esserver"
dpkg -P esserver
[ -f /var/lib/esserver/esserver.redb ] || fail "the purge removed the data"
[ ! -e /etc/esserver ] || fail "the purge left /etc/esserver"
! getent passwd esserver >/dev/null || fail "the purge left the account"
[ "$(stat -c %U /var/lib/esserver/esserver.redb)" = root ] || fail "the purge left the data to a removed account's number"

echo "== dpkg -i again: the kept data is the new account's"
dpkg -i "$deb" >/dev/null
[ "$(stat -c %U /var/lib/esserver/esserver.redb)" = esserver ] || fail "the kept data is not the account's again"
echo "== dpkg -i over itself, the configuration deleted by hand"
rm /etc/esserver/EmbryoServer.ini
dpkg -i "$deb" >/dev/null || fail "reinstalling without the configuration failed"
dpkg -P esserver >/dev/null
echo "package test: PASS"
