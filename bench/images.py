"""Templates from images, measured against a real registry on loopback (Debian's
`docker-registry`, which scripts/test-deps.sh installs) with images this script builds and
pushes itself.

Measures, against a running `moat serve` (MOAT_BENCH_URL, MOAT_BENCH_KEY: an admin key):
  - a cold create + exec `true` + delete from an image template, in turn with the same on the
    host template (no warm pools): what an image costs a sandbox;
  - the pull of an image with one layer of RANDOM_MB of incompressible files, as
    `POST /v1/templates` (download, digest checks, unpack, merge), against `curl` fetching
    the same blob from the same registry: what unpacking costs over the transfer;
  - a Dockerfile build (FROM the busybox image, COPY, RUN, ENV) with every step cached, from
    `POST /v1/builds` to the build's `succeeded` (polled every 5 ms), beside the same build
    with `no_cache`.
Prints Markdown table rows: name, runs, p50, p99 (milliseconds) and the ratio asked for.

    python bench/images.py [RUNS]
"""

import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
import oci  # noqa: E402
from oci import digest, http  # noqa: E402

RANDOM_MB = 64


def percentile(samples, p):
    ordered = sorted(samples)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def row(name, samples, note=""):
    print(
        f"| {name} | {len(samples)} | {statistics.median(samples):.1f} ms "
        f"| {percentile(samples, 99):.1f} ms | {note} |"
    )


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def layer(files):
    """A tar of `files` ({path: (mode, bytes)}), and the same gzipped."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, (mode, data) in files.items():
            info = tarfile.TarInfo(path)
            if data is None:
                info.type = tarfile.DIRTYPE
            else:
                info.size = len(data)
            info.mode = mode
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    tar_bytes = raw.getvalue()
    return tar_bytes, gzip.compress(tar_bytes, compresslevel=1)


def push(registry, repo, tag, layers, env):
    """Pushes an image of `layers` ([(tar, gz)]) and returns the gzipped layers' digests."""
    oci.push(registry, repo, tag, layers, {"Env": env})
    return [digest(gz) for _, gz in layers]


def start_registry(workdir):
    port = free_port()
    config = os.path.join(workdir, "registry.yml")
    with open(config, "w") as f:
        f.write(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                f"    rootdirectory: {workdir}/storage\nhttp:\n  addr: 127.0.0.1:{port}\n")
    proc = subprocess.Popen(["/usr/bin/docker-registry", "serve", config],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            http("GET", f"{url}/v2/")
            return proc, url, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("docker-registry did not start")


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    moat, key = os.environ["MOAT_BENCH_URL"], os.environ["MOAT_BENCH_KEY"]
    auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def api(method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        return http(method, moat + path, data, auth)

    workdir = tempfile.mkdtemp(prefix="moat-bench-images-")
    proc, registry, host = start_registry(workdir)
    try:
        busybox = open("/bin/busybox", "rb").read()
        files = {"bin": (0o755, None), "bin/busybox": (0o755, busybox)}
        bb = layer(files)
        # Applets as symlinks are not needed: `true` is run through busybox itself.
        push(registry, "bench/bb", "1", [bb], ["PATH=/bin"])
        api("POST", "/v1/templates",
            {"name": "bench-image", "spec": {"rootfs": {"image": f"{host}/bench/bb:1"}}})

        def cold(template, cmd):
            t0 = time.perf_counter()
            _, _, body = api("POST", "/v1/sandboxes", {"template": template})
            sid = json.loads(body)["id"]
            api("POST", f"/v1/sandboxes/{sid}/exec", {"cmd": cmd})
            api("DELETE", f"/v1/sandboxes/{sid}")
            return (time.perf_counter() - t0) * 1000

        for _ in range(3):
            cold("bench-image", ["/bin/busybox", "true"])
            cold("host", ["/bin/true"])
        image, host_t = [], []
        for _ in range(runs):
            image.append(cold("bench-image", ["/bin/busybox", "true"]))
            host_t.append(cold("host", ["/bin/true"]))
        ratio = statistics.median(image) / statistics.median(host_t)
        row("cold create + exec + delete, host template", host_t)
        row("the same from an image template (in turn)", image,
            f"{ratio:.2f}× host (goal ≤ 1.2×)")

        # Pull throughput: a layer of incompressible files, pulled fresh each time (a new
        # image: one byte of its config differs), against curl of the same blob.
        pulls, curls = [], []
        big = {"data": (0o755, None)}
        for i in range(RANDOM_MB):
            big[f"data/f{i}"] = (0o644, os.urandom(1 << 20))
        tar_bytes, gz = layer(big)
        rounds = max(3, min(10, runs // 10))
        for i in range(rounds):
            # Another layer each round (one more small file), so nothing is cached.
            extra = dict(big)
            extra[f"data/round{i}"] = (0o644, str(i).encode())
            t, g = layer(extra)
            (blob_digest,) = push(registry, "bench/big", f"r{i}", [(t, g)], [])
            t0 = time.perf_counter()
            subprocess.run(["curl", "-sf", "-o", "/dev/null",
                            f"{registry}/v2/bench/big/blobs/{blob_digest}"], check=True)
            curls.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            api("POST", "/v1/templates",
                {"name": f"bench-big-{i}", "spec": {"rootfs": {"image": f"{host}/bench/big:r{i}"}}})
            pulls.append((time.perf_counter() - t0) * 1000)
        mb = len(gz) / (1 << 20)
        ratio = statistics.median(pulls) / statistics.median(curls)
        row(f"curl of a {mb:.0f} MiB layer blob from the registry", curls,
            f"{mb / statistics.median(curls) * 1000:.0f} MiB/s")
        row(f"template from that image: pull, check, unpack, merge ({RANDOM_MB} files)", pulls,
            f"{mb / statistics.median(pulls) * 1000:.0f} MiB/s, {ratio:.1f}× curl")
        for i in range(rounds):
            api("DELETE", f"/v1/templates/bench-big-{i}")
        api("DELETE", "/v1/templates/bench-image")
        bench_builds(api, moat, key, host, rounds)
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def bench_builds(api, moat, key, host, rounds):
    ctx = io.BytesIO()
    with tarfile.open(fileobj=ctx, mode="w") as t:
        data = b"context file\n"
        info = tarfile.TarInfo("app/data.txt")
        info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
        t.addfile(info, io.BytesIO(data))
    archive = ctx.getvalue()
    context = digest(archive)
    http("PUT", f"{moat}/v1/build-contexts/{context}", archive,
         {"Authorization": f"Bearer {key}", "Content-Type": "application/x-tar"})
    dockerfile = (f"FROM {host}/bench/bb:1\nCOPY app /app\n"
                  'RUN ["/bin/busybox", "sh", "-c", "echo built > /etc/built"]\nENV A=1\n')

    def build(no_cache):
        t0 = time.perf_counter()
        _, _, body = api("POST", "/v1/builds", {"template": "bench-built", "dockerfile": dockerfile,
                                                "context": context, "no_cache": no_cache})
        bid = json.loads(body)["id"]
        while True:
            _, _, body = api("GET", f"/v1/builds/{bid}")
            status = json.loads(body)["status"]
            if status not in ("queued", "running"):
                break
            time.sleep(0.005)
        if status != "succeeded":
            sys.exit(f"build {bid} {status}: {body}")
        return (time.perf_counter() - t0) * 1000

    build(False)
    fresh = [build(True) for _ in range(rounds)]
    cached = [build(False) for _ in range(max(rounds, 10))]
    row("Dockerfile build (COPY, RUN, ENV), no_cache", fresh)
    row("the same build with every step cached", cached,
        f"goal < 1000 ms: {'met' if statistics.median(cached) < 1000 else 'not met'}")
    api("DELETE", "/v1/templates/bench-built")


if __name__ == "__main__":
    main()
