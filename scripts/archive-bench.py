"""Archive tier figures (docs/benchmarks.md): one archive pass to a local moto (upload, read
back, record, remove) and image read latency through the public API over HTTPS: archived
images on their first read (range requests), the same from the local cache, and images of the
local active volume. Needs `cargo build --release` and moto[server] (scripts/test.sh installs
it). Writes about 250 MB into a temporary directory and removes it."""
import json, os, ssl, subprocess, sys, time, urllib.request, statistics, shutil, socket, tempfile

repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ES = os.path.join(repo, "target/release/esserver")
LT = os.path.join(repo, "target/release/loadtest")
if shutil.disk_usage(tempfile.gettempdir()).free < 2 * 1024**3:
    sys.exit("less than 2 GiB free in the temporary directory")
root = tempfile.mkdtemp(prefix="esserver-archive-bench-")
os.chdir(root)

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

moto_port = free_port()
moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
for _ in range(100):
    try:
        socket.create_connection(("127.0.0.1", moto_port)).close(); break
    except OSError:
        time.sleep(0.1)
urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{moto_port}/bench", method="PUT"))
open("EmbryoServer.ini", "w").write(f"""[Storage]
data_dir = data
volume_bytes_max = 16 MiB
[Archive]
target = s3://bench/site
endpoint = http://127.0.0.1:{moto_port}
access_key_id = AKIDBENCH
secret_access_key = benchsecret
after_days = 0
check_interval_ms = 3600000
cache_bytes_max = 256 MiB
""")
server = subprocess.Popen([ES, "serve"], stdout=subprocess.DEVNULL, stderr=open("server.log", "w"))
for _ in range(100):
    if os.path.exists("data/server.json"): break
    time.sleep(0.1)
time.sleep(0.5)
info = json.load(open("data/server.json"))
api_addr = [l["address"] for l in info["listeners"] if l["service"] == "public-api"][0]
inc_addr = [l["address"] for l in info["listeners"] if l["service"] == "incubator"][0]
subprocess.run([LT, "run", "--server", inc_addr, "--server-cert", "data/tls/server.crt",
                "--devices", "es-plus:2", "--speedup", "50", "--duration", "20s"],
               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(1)

def cpu_s(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

cpu0 = cpu_s(server.pid)
t0 = time.time()
out = subprocess.run([ES, "archive", "--json"], check=True, capture_output=True, text=True)
elapsed = time.time() - t0
cpu1 = cpu_s(server.pid)
report = json.loads(out.stdout)
mb = report["bytes_archived"] / 1e6
print(f"archive pass: {report['volumes_archived']} volumes, {mb:.1f} MB in {elapsed:.2f} s = {mb/elapsed:.1f} MB/s; "
      f"server CPU {cpu1-cpu0:.2f} s = {1000*(cpu1-cpu0)/mb:.2f} ms per MB")

key = subprocess.run([ES, "apikey", "create", "--name", "bench", "--scope", "read"],
                     check=True, capture_output=True, text=True).stdout.strip().split()[-1]
ctx = ssl.create_default_context(cafile="data/tls/server.crt")
ctx.check_hostname = False
import http.client
host, port = api_addr.rsplit(":", 1)
conn = http.client.HTTPSConnection(host, int(port), context=ctx)
def get(path):
    t = time.perf_counter()
    conn.request("GET", path, headers={"authorization": f"Bearer {key}"})
    r = conn.getresponse(); body = r.read()
    return r.status, body, (time.perf_counter() - t) * 1000
status, body, _ = get("/api/v1/patients")
patients = json.loads(body)["items"]
images = []
for p in patients:
    for t in p["treatments"]:
        s, b, _ = get(f"/api/v1/patients/{p['patient_id']}/treatments/{t['name']}/embryos")
        for e in json.loads(b)["items"]:
            s, b, _ = get(f"/api/v1/embryos/{e['embryo_id']}/acquisitions?limit=1000")
            for a in json.loads(b)["items"]:
                images.append(f"/api/v1/embryos/{e['embryo_id']}/images/{a['acquired_at_ms']}?focal_plane={a['focal_planes'][0]}")
images.sort(key=lambda p: int(p.split("/images/")[1].split("?")[0]))
old, new = images[:300], images[-60:]
def measure(paths):
    lat = []
    for path in paths:
        s, b, ms = get(path)
        assert s == 200, (s, b[:200])
        lat.append(ms)
    lat.sort()
    return statistics.median(lat), lat[int(len(lat) * 0.99) - 1]
cold = measure(old)
warm = measure(old)
local = measure(new)
print(f"image reads over HTTPS (p50 / p99 ms): archived, first read {cold[0]:.2f} / {cold[1]:.2f}; "
      f"archived, from the cache {warm[0]:.2f} / {warm[1]:.2f}; local volume {local[0]:.2f} / {local[1]:.2f}")
print(f"images: {len(images)}; ratios p50 cold/local {cold[0]/local[0]:.1f}, cache/local {warm[0]/local[0]:.2f}")
server.terminate(); server.wait()
moto.terminate(); moto.wait()
shutil.rmtree(root, ignore_errors=True)
