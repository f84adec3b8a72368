"""Asynchronous jobs, measured against a running `moat serve` (MOAT_BENCH_URL,
MOAT_BENCH_KEY: an admin key; start it with a high `--rate-limit`).

Measures, with `print(1)` jobs of a template with a warm pool:
  - at idle, one job at a time: submit-to-result latency as the server records it
    (`finished_at - created_at`) and as a client polling every 2 ms sees it;
  - under load, JOBS jobs submitted at once by CLIENTS clients: throughput (jobs finished
    per second, from the first submit to the last result) and the server-side latency p50
    and p99 of each job;
  - beside them, the synchronous `POST /v1/run` of the same code by CLIENTS clients: what
    the queue costs over the one-shot mode.
Prints Markdown table rows.

    python bench/jobs.py [JOBS] [CLIENTS]
"""

import http.client
import json
import os
import statistics
import sys
import threading
import time
import urllib.parse

URL = urllib.parse.urlparse(os.environ["MOAT_BENCH_URL"])
KEY = os.environ["MOAT_BENCH_KEY"]
TEMPLATE = "bench-jobs"
POOL = 8


def percentile(samples, p):
    ordered = sorted(samples)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


class Conn:
    """One keep-alive connection to the server."""

    def __init__(self):
        self.c = http.client.HTTPConnection(URL.hostname, URL.port, timeout=120)

    def call(self, method, path, body=None, want=(200,)):
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        self.c.request(method, path, body=data, headers=headers)
        r = self.c.getresponse()
        text = r.read()
        if r.status not in want:
            raise RuntimeError(f"{method} {path}: {r.status} {text[:300]!r}")
        return json.loads(text) if text else None


def job_body():
    return {"template": TEMPLATE, "code": "print(1)"}


def wait_all(conn, ids, deadline_s=600):
    """Waits until no job is queued or running (one cheap listing every 100 ms, so that the
    waiting takes no CPU from the server), then reads every job of `ids`."""
    end = time.monotonic() + deadline_s
    while conn.call("GET", "/v1/jobs?state=queued&state=running&limit=1")["jobs"]:
        if time.monotonic() > end:
            raise RuntimeError("jobs never ended")
        time.sleep(0.1)
    jobs, after = {}, None
    while True:
        page = conn.call("GET", "/v1/jobs?limit=1000" + (f"&after={after}" if after else ""))
        jobs.update((j["id"], j) for j in page["jobs"])
        after = page.get("next")
        if not after:
            break
    return [jobs[i] for i in ids]


def main():
    jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    clients = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    conn = Conn()
    conn.call(
        "POST",
        "/v1/templates",
        {"name": TEMPLATE, "spec": {"rootfs": "host", "user": "user", "pool_size": POOL}},
        want=(201,),
    )
    while conn.call("GET", f"/v1/templates/{TEMPLATE}")["pool"]["ready"] < POOL:
        time.sleep(0.1)

    # At idle: one at a time.
    server_ms, client_ms = [], []
    for _ in range(60):
        start = time.monotonic()
        j = conn.call("POST", "/v1/jobs", job_body(), want=(202,))
        while j["state"] in ("queued", "running"):
            time.sleep(0.002)
            j = conn.call("GET", f"/v1/jobs/{j['id']}")
        client_ms.append((time.monotonic() - start) * 1000)
        assert j["state"] == "succeeded" and j["stdout_tail"] == "1\n", j
        server_ms.append(j["finished_at"] - j["created_at"])
        # The pool refills between jobs, as it would at idle.
        while conn.call("GET", f"/v1/templates/{TEMPLATE}")["pool"]["ready"] < POOL:
            time.sleep(0.01)
    server_ms, client_ms = server_ms[10:], client_ms[10:]

    # Under load: `jobs` submitted at once by `clients`, of print(1), then of `true` (what
    # the job machinery and the sandbox cost without an interpreter's start).
    def load(body, stdout):
        ids, lock = [], threading.Lock()

        def submit(n):
            c = Conn()
            mine = [c.call("POST", "/v1/jobs", body, want=(202,))["id"] for _ in range(n)]
            with lock:
                ids.extend(mine)

        threads = [
            threading.Thread(target=submit, args=(jobs // clients + (i < jobs % clients),))
            for i in range(clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        finished = wait_all(conn, ids)
        bad = [j for j in finished if j["state"] != "succeeded" or j.get("stdout_tail", "") != stdout]
        assert not bad, bad[:3]
        first = min(j["created_at"] for j in finished)
        last = max(j["finished_at"] for j in finished)
        rate = len(finished) / ((last - first) / 1000)
        return finished, rate, [j["finished_at"] - j["created_at"] for j in finished]

    finished, rate, load_ms = load(job_body(), "1\n")
    true_jobs, true_rate, _ = load({"template": TEMPLATE, "shell": "true"}, "")
    lock = threading.Lock()

    # The synchronous one-shot mode, by as many clients, for comparison.
    runs = min(jobs, 400)
    run_done = []

    def run(n):
        c = Conn()
        for _ in range(n):
            r = c.call("POST", "/v1/run", {"template": TEMPLATE, "code": "print(1)"})
            assert r["stdout"] == "1\n", r
            with lock:
                run_done.append(time.monotonic())

    # /v1/run admits 4 at once per tenant: at most that many clients.
    run_clients = min(clients, 4)
    start = time.monotonic()
    threads = [
        threading.Thread(target=run, args=(runs // run_clients + (i < runs % run_clients),))
        for i in range(run_clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    run_rate = runs / (max(run_done) - start)

    print("| what | n | p50 | p99 | |")
    print("| --- | --- | --- | --- | --- |")
    print(
        f"| job at idle, submit to result (server) | {len(server_ms)} | "
        f"{statistics.median(server_ms):.1f} ms | {percentile(server_ms, 99):.1f} ms | |"
    )
    print(
        f"| job at idle, submit to result (client polling every 2 ms) | {len(client_ms)} | "
        f"{statistics.median(client_ms):.1f} ms | {percentile(client_ms, 99):.1f} ms | |"
    )
    print(
        f"| job under load, submit to result (server) | {len(load_ms)} | "
        f"{statistics.median(load_ms):.0f} ms | {percentile(load_ms, 99):.0f} ms | "
        f"{jobs} jobs from {clients} clients at once |"
    )
    print(f"| throughput, `print(1)` jobs | {len(finished)} | | | **{rate:.0f} jobs/s** (goal ≥ 100) |")
    print(f"| throughput, `true` jobs (no interpreter) | {len(true_jobs)} | | | {true_rate:.0f} jobs/s |")
    print(
        f"| throughput, `POST /v1/run` of the same, {run_clients} clients | {runs} | | | "
        f"{run_rate:.0f} runs/s |"
    )


if __name__ == "__main__":
    main()
