#!/usr/bin/env python3
"""The incidents, reproduced with real servers: saturation and a rolling deploy.

    bash scenarios/run.sh              # full runs, tables and plots for the README
    python3 scenarios/run.py --short --check --tidegate target/debug/tidegate   # CI

1. saturation: a gunicorn app with sync workers (a slow route standing in for the 3-minute
   one, a fast route, a health route) under an overload burst of retrying clients, probed like
   kubelet (period, 1 s timeout, failure threshold 3; a tripped liveness probe restarts the
   app after a realistic start-up time). Variants: the app alone; behind a HAProxy sidecar
   (maxconn, timeout queue) with the probes sent through it to the app (haproxy-passthrough,
   full run only); behind a HAProxy sidecar configured as its documentation has it, answering
   the probes itself with monitor-uri on frontends of their own (haproxy); behind tidegate.
2. rolling: a front HAProxy health-checking each replica's readiness, and dropping a
   terminating replica `lb_lag` seconds after its termination starts, like endpoint
   propagation; replicas whose app dies at once on SIGTERM; a kubelet-like rollout (surge one, wait
   until routed, then preStop, SIGTERM, SIGKILL after the grace period) under constant load.
   Variants: no protection, a preStop sleep, tidegate's /prestop.

Every variant prints a row and the run writes an SVG plot per scenario over time. With
--check the run fails if tidegate's rows show any probe failure, restart or failed request.
Traffic goes to 127.0.0.1 only; every loop is bounded in time; only processes started here
are stopped, by PID.
"""
import argparse
import http.client
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
APP_DIR = ROOT / "examples" / "gunicorn"
CHILD_APP = ROOT / "tests" / "fixtures" / "child_app.py"


_reserved = []


def free_port():
    """A free port, distinct from every other this run picked: the sockets stay bound (so the
    kernel cannot hand the same port out twice) until release_ports(), just before use."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    _reserved.append(s)
    return s.getsockname()[1]


def release_ports():
    while _reserved:
        _reserved.pop().close()


class Procs:
    """Processes started by this run; each is stopped by its PID."""

    def __init__(self):
        self.procs = []

    def start(self, args=None, env=None, **kw):
        p = subprocess.Popen(args, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                             stderr=kw.pop("stderr", subprocess.DEVNULL), **kw)
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                # A process started in a session of its own (gunicorn: its master and the
                # workers it forked) goes as a group, so no worker outlives the run.
                if os.getpgid(p.pid) == p.pid:
                    os.killpg(p.pid, signal.SIGKILL)
                else:
                    p.kill()
                p.wait()
        self.procs.clear()


def request(port, path, timeout=5.0, conn=None):
    """One GET; returns (status or error kind, seconds, connection to reuse or None)."""
    start = time.monotonic()
    try:
        c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        if r.status != 200 and os.environ.get("SCENARIO_DEBUG"):
            print(f"DEBUG {time.monotonic():.2f} {r.status} {dict(r.getheaders())} {body[:80]!r}", file=sys.stderr)
        keep = r.getheader("connection", "").lower() != "close"
        return r.status, time.monotonic() - start, (c if keep else None)
    except ConnectionRefusedError:
        return "refused", time.monotonic() - start, None
    except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected, http.client.BadStatusLine):
        return "reset", time.monotonic() - start, None
    except (socket.timeout, TimeoutError):
        return "timeout", time.monotonic() - start, None
    except OSError as e:
        return type(e).__name__, time.monotonic() - start, None


def debug(message):
    if os.environ.get("SCENARIO_DEBUG"):
        print(f"DEBUG {time.monotonic():.2f} {message}", file=sys.stderr)


def wait_http(port, path, within=20.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        status, _, _ = request(port, path, timeout=1)
        if status == 200:
            return True
        time.sleep(0.05)
    raise SystemExit(f"127.0.0.1:{port}{path} did not answer 200 within {within}s")


class Timeline:
    """Per-second counters."""

    def __init__(self, start):
        self.start = start
        self.lock = threading.Lock()
        self.rows = {}

    def add(self, key, n=1, at=None):
        second = int((at or time.monotonic()) - self.start)
        with self.lock:
            row = self.rows.setdefault(second, {})
            row[key] = row.get(key, 0) + n

    def series(self, key, length):
        return [self.rows.get(s, {}).get(key, 0) for s in range(length)]


# ---------------------------------------------------------------- saturation


class App:
    """gunicorn with sync workers, restartable like a container."""

    def __init__(self, procs, port, workers, slow, startup):
        self.procs, self.port, self.workers, self.slow, self.startup = procs, port, workers, slow, startup
        self.proc = None

    def start(self):
        # A realistic start-up: the container takes `startup` seconds before it listens.
        cmd = ["sh", "-c", f"sleep {self.startup}; exec {sys.executable} -m gunicorn -w {self.workers} "
               f"-b 127.0.0.1:{self.port} --chdir {APP_DIR} --timeout 300 app:app"]
        self.proc = self.procs.start(cmd, env={"SLOW_SECONDS": str(self.slow)}, start_new_session=True)

    def restart(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.start()


def prober(port, path, period, stop, timeline, name, on_trip=None, threshold=3, initial_delay=0.0):
    """kubelet-like: every `period`, 1 s timeout; `on_trip` (a restart) after `threshold`
    failures in a row, then no probing for `initial_delay` (initialDelaySeconds) while the
    restarted container starts."""
    failures = 0
    stats = {"ok": 0, "fail": 0, "trips": 0}
    while not stop.is_set():
        t = time.monotonic()
        status, _, _ = request(port, path, timeout=1.0)
        if status == 200:
            failures = 0
            stats["ok"] += 1
        else:
            failures += 1
            stats["fail"] += 1
            timeline.add(f"{name}_fail")
            if on_trip and failures >= threshold:
                stats["trips"] += 1
                timeline.add("restart")
                failures = 0
                on_trip()
                stop.wait(initial_delay)
        stop.wait(max(0.0, period - (time.monotonic() - t)))
    return stats


def client(port, path, until, timeline, kind, results):
    conn = None
    while time.monotonic() < until:
        timeline.add(f"{kind}_offered")
        status, took, conn = request(port, path, timeout=30, conn=conn)
        if status == 200:
            timeline.add(f"{kind}_served")
        elif status == 503:
            timeline.add(f"{kind}_shed")
        else:
            timeline.add(f"{kind}_error")
        results.append((kind, status, took, time.monotonic()))
        if status != 200:
            conn = None
            time.sleep(0.1)  # clients that retry, after a short pause


def haproxy_sidecar(procs, tmp, front, app_port, workers, probes=None):
    """A HAProxy sidecar: one server slot per worker (maxconn), excess requests queued for at
    most `timeout queue`. With `probes` = (live_port, ready_port) HAProxy answers the probes
    itself, as its manual has it (monitor-uri, monitor fail), each on a frontend of its own so
    that a probe never waits in the app's queue: liveness says HAProxy is up; readiness fails
    while the app's server is DOWN, which a layer-4 check (connect, every second, fall 3) sees
    when the app does not listen. Without `probes` they are sent through it like the traffic."""
    check = ""
    monitor = ""
    if probes:
        live, ready = probes
        check = " check inter 1s fall 3 rise 2"
        monitor = (f"frontend live\n    bind 127.0.0.1:{live}\n    monitor-uri /livez\n"
                   f"frontend ready\n    bind 127.0.0.1:{ready}\n    monitor-uri /readyz\n"
                   f"    monitor fail if {{ nbsrv(app) lt 1 }}\n")
    cfg = pathlib.Path(tmp) / "haproxy.cfg"
    cfg.write_text(
        "global\n    maxconn 4000\n    stats socket " + str(pathlib.Path(tmp) / "admin.sock") + " level admin\n"
        "defaults\n    mode http\n    timeout connect 1s\n    timeout client 60s\n    timeout server 60s\n"
        f"    timeout queue 1s\n    retries 0\n"
        f"frontend fe\n    bind 127.0.0.1:{front}\n    default_backend app\n"
        f"backend app\n    server app 127.0.0.1:{app_port} maxconn {workers}{check}\n{monitor}")
    procs.start(["haproxy", "-db", "-f", str(cfg)])


def saturation_variant(name, args, tidegate_bin, procs):
    app_port, front_port, admin_port, probe_port = free_port(), free_port(), free_port(), free_port()
    release_ports()
    app = App(procs, app_port, args.workers, args.slow, args.startup)
    app.start()
    wait_http(app_port, "/health", within=30)
    front = app_port
    live_port, live_path = app_port, "/health"
    ready_port, ready_path = app_port, "/health"
    tmp = tempfile.mkdtemp(prefix="tidegate-scenario-")
    if name == "haproxy-passthrough":
        front = front_port
        haproxy_sidecar(procs, tmp, front, app_port, args.workers)
        wait_http(front, "/health")
        # The probes go through HAProxy to the app's /health, like the traffic.
        live_port = ready_port = front
    elif name == "haproxy":
        front = front_port
        haproxy_sidecar(procs, tmp, front, app_port, args.workers, probes=(admin_port, probe_port))
        wait_http(front, "/health")
        wait_http(probe_port, "/readyz")
        live_port, live_path = admin_port, "/livez"
        ready_port, ready_path = probe_port, "/readyz"
    elif name == "tidegate":
        front, admin = front_port, admin_port
        procs.start([tidegate_bin, "--listen", f"127.0.0.1:{front}", "--admin-listen", f"127.0.0.1:{admin}",
                     "--upstream", f"http://127.0.0.1:{app_port}", "--max-concurrency", str(args.workers),
                     "--route", f"/slow={args.workers - 1}", "--max-queue", str(2 * args.workers),
                     "--queue-timeout", "500ms", "--app-health-path", "/health", "--access-log", "false",
                     "--app-health-interval", "500ms"])
        wait_http(admin, "/readyz")
        live_port, live_path = admin, "/app/livez"
        ready_port, ready_path = admin, "/readyz"

    start = time.monotonic()
    timeline = Timeline(start)
    stop = threading.Event()
    probe_stats = {}

    def run_probe(key, port, path, on_trip):
        probe_stats[key] = prober(port, path, args.period, stop, timeline, key, on_trip,
                                  initial_delay=args.startup + 1.0)

    threads = [threading.Thread(target=run_probe, args=("live", live_port, live_path, app.restart)),
               threading.Thread(target=run_probe, args=("ready", ready_port, ready_path, None))]
    results = []
    burst_end = start + args.calm + args.burst
    end = burst_end + args.cooldown
    for _ in range(args.fast_clients):
        threads.append(threading.Thread(target=client, args=(front, "/fast", end, timeline, "fast", results)))

    def burst():
        time.sleep(args.calm)
        ts = [threading.Thread(target=client, args=(front, "/slow", burst_end, timeline, "slow", results))
              for _ in range(args.slow_clients)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    threads.append(threading.Thread(target=burst))
    for t in threads:
        t.start()
    time.sleep(max(0.0, end - time.monotonic()))
    stop.set()
    for t in threads:
        t.join(timeout=60)
    length = int(end - start) + 1

    burst_start = start + args.calm
    # The fast route is judged on requests sent during the burst: that is when it matters.
    fast = [r for r in results if r[0] == "fast" and burst_start <= r[3] - r[2] < burst_end]
    slow = [r for r in results if r[0] == "slow"]
    fast_ok = [r for r in fast if r[1] == 200]
    shed = sorted(r[2] for r in slow + fast if r[1] == 503)
    fast_lat = sorted(r[2] for r in fast_ok)
    # Recovery: seconds after the burst until fast requests and probes are all good again.
    recover = None
    for s in range(int(burst_end - start), length):
        row = timeline.rows.get(s, {})
        if row.get("fast_served", 0) > 0 and not row.get("fast_error") and not row.get("live_fail") and not row.get("ready_fail"):
            recover = s - (burst_end - start)
            break
    probes = sum(v["ok"] + v["fail"] for v in probe_stats.values())
    probe_fail = sum(v["fail"] for v in probe_stats.values())
    row = {
        "variant": name,
        "probe_ok_pct": 100.0 * (probes - probe_fail) / max(probes, 1),
        "probe_failures": probe_fail,
        "restarts": probe_stats.get("live", {}).get("trips", 0),
        "fast_ok_pct": 100.0 * len(fast_ok) / max(len(fast), 1),
        "fast_p99_ms": 1000 * pct(fast_lat, 99),
        "slow_goodput": sum(1 for r in slow if r[1] == 200) / args.burst,
        "shed_p99_ms": 1000 * pct(shed, 99),
        "failed": sum(1 for r in results if r[0] == "fast" and r[1] != 200),
        "recover_s": recover,
        "timeline": timeline,
        "length": length,
        "burst": (args.calm, args.calm + args.burst),
    }
    procs.stop_all()
    return row


def pct(values, p):
    if not values:
        return 0.0
    return values[min(len(values) - 1, int(len(values) * p / 100))]


# ---------------------------------------------------------------- rolling deploy


class Replica:
    """One pod: the app, and with tidegate its sidecar, on ports fixed up front."""

    def __init__(self, procs, variant, tidegate_bin, tmp, args):
        self.procs, self.variant, self.bin, self.tmp, self.args = procs, variant, tidegate_bin, tmp, args
        self.app_port = free_port()
        if variant == "tidegate":
            self.port, self.admin = free_port(), free_port()
        else:
            self.port, self.admin = self.app_port, None
        self.app = self.sidecar = None

    def start(self):
        marker = pathlib.Path(self.tmp) / f"term-{self.app_port}"
        self.app = self.procs.start([sys.executable, str(CHILD_APP), str(self.app_port), str(marker), "0"])
        if self.variant == "tidegate":
            log = open(pathlib.Path(self.tmp) / f"tidegate-{self.port}.log", "w") if os.environ.get("SCENARIO_DEBUG") else subprocess.DEVNULL
            self.sidecar = self.procs.start(stderr=log, args=[
                self.bin, "--listen", f"127.0.0.1:{self.port}", "--admin-listen", f"127.0.0.1:{self.admin}",
                "--upstream", f"http://127.0.0.1:{self.app_port}", "--app-health-path", "/health",
                "--app-health-interval", "200ms", "--shutdown-delay", f"{self.args.lb_lag + 1}s",
                "--drain-timeout", "10s", "--access-log", "false"])
        return self

    def check(self):
        """(port, path) the front's health check uses: readiness, as endpoints would."""
        return (self.admin, "/readyz") if self.variant == "tidegate" else (self.port, "/health")

    def terminate(self, grace):
        """kubelet: preStop, then SIGTERM to every container, SIGKILL after the grace period."""
        deadline = time.monotonic() + grace
        if self.variant == "tidegate":
            # Classic sidecar: tidegate gets SIGTERM at once; the app's preStop waits for the drain.
            self.sidecar.send_signal(signal.SIGTERM)
            status, took, _ = request(self.admin, "/prestop", timeout=grace)
            debug(f"prestop on {self.admin}: {status} after {took:.2f}s; tmp {self.tmp}")
        elif self.variant == "prestop-sleep":
            time.sleep(self.args.sleep)
        self.app.send_signal(signal.SIGTERM)
        for p in (self.app, self.sidecar):
            if p is None:
                continue
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def haproxy_front(procs, tmp, slots, front, stats):
    servers = "".join(
        f"    server r{i} 127.0.0.1:{port} check port {check_port} inter 1s fall 2 rise 1\n"
        for i, (port, check_port, _) in enumerate(slots))
    check_path = slots[0][2]
    cfg = pathlib.Path(tmp) / "front.cfg"
    cfg.write_text(
        "global\n    maxconn 4000\n    stats socket " + str(pathlib.Path(tmp) / "admin.sock") + " level admin\n"
        "defaults\n    mode http\n    timeout connect 1s\n    timeout client 30s\n    timeout server 30s\n"
        "    retries 0\n    option http-server-close\n"
        f"frontend fe\n    bind 127.0.0.1:{front}\n    default_backend pods\n"
        f"backend pods\n    balance roundrobin\n    option httpchk GET {check_path}\n{servers}"
        f"frontend stats\n    bind 127.0.0.1:{stats}\n    stats enable\n    stats uri /stats\n")
    procs.start(["haproxy", "-db", "-f", str(cfg)])


def remove_endpoint_later(tmp, server, lag):
    """Endpoint propagation: `lag` seconds after the pod starts terminating, the front stops
    routing to it, whatever its readiness says (Kubernetes removes terminating endpoints)."""

    def remove():
        time.sleep(lag)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(pathlib.Path(tmp) / "admin.sock"))
            s.sendall(f"set server pods/{server} state maint\n".encode())
            s.recv(4096)

    t = threading.Thread(target=remove)
    t.start()
    return t


def server_status(stats_port, name):
    try:
        csv = urllib.request.urlopen(f"http://127.0.0.1:{stats_port}/stats;csv", timeout=2).read().decode()
    except OSError:
        return "?"
    for line in csv.splitlines():
        f = line.split(",")
        if len(f) > 17 and f[0] == "pods" and f[1] == name:
            return f[17]
    return "?"


def rolling_variant(variant, args, tidegate_bin, procs):
    tmp = tempfile.mkdtemp(prefix="tidegate-rolling-")
    old = [Replica(procs, variant, tidegate_bin, tmp, args) for _ in range(args.replicas)]
    new = [Replica(procs, variant, tidegate_bin, tmp, args) for _ in range(args.replicas)]
    front, stats = free_port(), free_port()
    release_ports()
    for r in old:
        r.start()
    for r in old:
        wait_http(*r.check(), within=20)
    # One front slot per old and per new replica. A slot whose pod does not run yet fails its
    # checks and is DOWN, as an endpoint that is not ready; it turns UP a check after its pod
    # is ready, like endpoint propagation.
    slots = [(r.port, r.check()[0], r.check()[1]) for r in old + new]
    haproxy_front(procs, tmp, slots, front, stats)
    for i in range(2 * args.replicas):
        want = "UP" if i < args.replicas else "DOWN"
        deadline = time.monotonic() + 20
        while server_status(stats, f"r{i}") != want:
            if time.monotonic() > deadline:
                raise SystemExit(f"{variant}: slot {i} never {want} at the front")
            time.sleep(0.05)

    start = time.monotonic()
    timeline = Timeline(start)
    stop = threading.Event()
    results = []

    def load(client):
        conn = None
        n = client
        while not stop.is_set():
            timeline.add("offered")
            n += 1
            # One request in 20 takes a second, so some are always in flight.
            path = "/slow" if n % 20 == 0 else "/fast"
            status, _, conn = request(front, path, timeout=10, conn=conn)
            results.append(status)
            timeline.add("served" if status == 200 else "error")
            if status != 200:
                conn = None
            time.sleep(0.01)

    loaders = [threading.Thread(target=load, args=(c,)) for c in range(args.load_clients)]
    for t in loaders:
        t.start()
    time.sleep(1)
    rollout_start = time.monotonic()
    for i in range(args.replicas):
        # Surge one: start the new replica, wait until the front routes to it.
        debug(f"start new r{args.replicas + i}")
        new[i].start()
        deadline = time.monotonic() + 20
        while server_status(stats, f"r{args.replicas + i}") != "UP":
            if time.monotonic() > deadline:
                raise SystemExit(f"{variant}: new replica {i} never UP")
            time.sleep(0.05)
        timeline.add("replaced")
        debug(f"new r{args.replicas + i} UP; terminating r{i}")
        propagation = remove_endpoint_later(tmp, f"r{i}", args.lb_lag)
        old[i].terminate(args.grace)
        propagation.join()
        debug(f"r{i} terminated; front sees it {server_status(stats, f'r{i}')}")
    rollout = time.monotonic() - rollout_start
    time.sleep(1)
    stop.set()
    for t in loaders:
        t.join(timeout=30)
    length = int(time.monotonic() - start) + 1
    errors = {}
    for s in results:
        if s != 200:
            errors[str(s)] = errors.get(str(s), 0) + 1
    row = {
        "variant": variant,
        "requests": len(results),
        "failed": sum(errors.values()),
        "error_pct": 100.0 * sum(errors.values()) / max(len(results), 1),
        "errors": errors,
        "rollout_s": rollout,
        "timeline": timeline,
        "length": length,
    }
    procs.stop_all()
    return row


# ---------------------------------------------------------------- output


def plot(rows, keys, title, path, shade=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(12, 2.6 * len(rows)), sharex=True, squeeze=False)
    for ax, row in zip(axes[:, 0], rows):
        t = list(range(row["length"]))
        for key, label in keys:
            ax.plot(t, row["timeline"].series(key, row["length"]), label=label)
        fails = [s for s in t if any(row["timeline"].rows.get(s, {}).get(k) for k in ("live_fail", "ready_fail"))]
        if fails:
            ax.scatter(fails, [0] * len(fails), marker="x", color="red", label="probe failed", zorder=5)
        rows_of = row["timeline"].rows.values()
        if any(r.get("restart") for r in rows_of):
            ax.plot([], [], color="red", linestyle="--", linewidth=1, label="restart")
        if any(r.get("replaced") for r in rows_of):
            ax.plot([], [], color="grey", linestyle=":", linewidth=1, label="new pod routed, old one terminating")
        for s in t:
            for _ in range(row["timeline"].rows.get(s, {}).get("restart", 0)):
                ax.axvline(s, color="red", linestyle="--", linewidth=1)
            for _ in range(row["timeline"].rows.get(s, {}).get("replaced", 0)):
                ax.axvline(s, color="grey", linestyle=":", linewidth=1)
        if shade:
            ax.axvspan(*row["burst"], color="orange", alpha=0.1)
        ax.set_title(row["variant"], fontsize=10, loc="left")
        ax.set_ylabel("requests/s")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1, 0].set_xlabel("seconds")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tidegate", default=str(ROOT / "target" / "release" / "tidegate"))
    ap.add_argument("--short", action="store_true", help="the short version, for CI")
    ap.add_argument("--check", action="store_true", help="fail if tidegate's rows show any failure")
    ap.add_argument("--only", choices=["saturation", "rolling"])
    ap.add_argument("--out", default=str(ROOT / "scenarios" / "results"))
    args = ap.parse_args()
    short = args.short
    sat = argparse.Namespace(workers=4, slow=1.5 if short else 4.0, startup=1.0 if short else 3.0,
                             period=0.5 if short else 1.0, calm=1 if short else 3, burst=5 if short else 20,
                             cooldown=4 if short else 12, slow_clients=16 if short else 32, fast_clients=2)
    rol = argparse.Namespace(replicas=2 if short else 3, lb_lag=2, sleep=3, grace=30, load_clients=8)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    procs = Procs()
    failures = []
    try:
        if args.only in (None, "saturation"):
            # haproxy-passthrough behaves as the app alone (its probes queue with the traffic);
            # the short version leaves it out to keep CI's time.
            variants = ("app-alone", "haproxy", "tidegate") if short else (
                "app-alone", "haproxy-passthrough", "haproxy", "tidegate")
            rows = [saturation_variant(v, sat, args.tidegate, procs) for v in variants]
            print(f"\nsaturation: {sat.workers} sync workers, /slow {sat.slow}s, {sat.slow_clients} retrying clients "
                  f"for {sat.burst}s, probes every {sat.period}s (1 s timeout, threshold 3)")
            print("(fast ok% and fast p99 over the fast-route requests sent during the burst)")
            print(f"{'variant':<19} {'probe ok%':>9} {'restarts':>8} {'fast ok%':>8} {'fast p99 ms':>11} "
                  f"{'slow ok/s':>9} {'shed p99 ms':>11} {'recover s':>9}")
            for r in rows:
                rec = "-" if r["recover_s"] is None else f"{r['recover_s']:.0f}"
                print(f"{r['variant']:<19} {r['probe_ok_pct']:>9.1f} {r['restarts']:>8} {r['fast_ok_pct']:>8.1f} "
                      f"{r['fast_p99_ms']:>11.0f} {r['slow_goodput']:>9.2f} {r['shed_p99_ms']:>11.0f} {rec:>9}")
            plot(rows, [("slow_offered", "slow offered"), ("slow_served", "slow served"), ("slow_shed", "shed (503)"),
                        ("fast_served", "fast served"), ("fast_error", "fast failed")],
                 "saturation: the app alone, behind a HAProxy sidecar, behind tidegate", out / "saturation.svg", shade=True)
            t = rows[-1]
            if t["probe_failures"] or t["restarts"] or t["failed"]:
                failures.append(f"saturation/tidegate: {t['probe_failures']} probe failures, {t['restarts']} restarts, "
                                f"{t['failed']} failed fast requests")
        if args.only in (None, "rolling"):
            rows = [rolling_variant(v, rol, args.tidegate, procs) for v in ("none", "prestop-sleep", "tidegate")]
            print(f"\nrolling deploy: {rol.replicas} replicas, front HAProxy checks readiness every 1s (fall 2) and "
                  f"drops terminating pods {rol.lb_lag}s late; apps die at once on SIGTERM; preStop sleep {rol.sleep}s; "
                  f"{rol.load_clients} clients of constant load")
            print(f"{'variant':<14} {'requests':>8} {'failed':>7} {'error %':>8} {'rollout s':>9}  errors by kind")
            for r in rows:
                kinds = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "-"
                print(f"{r['variant']:<14} {r['requests']:>8} {r['failed']:>7} {r['error_pct']:>8.2f} "
                      f"{r['rollout_s']:>9.1f}  {kinds}")
            plot(rows, [("offered", "offered"), ("served", "served"), ("error", "failed")],
                 "rolling deploy: no protection, preStop sleep, tidegate /prestop", out / "rolling.svg")
            t = rows[-1]
            if t["failed"]:
                failures.append(f"rolling/tidegate: {t['failed']} failed requests {t['errors']}")
    finally:
        procs.stop_all()
    print(f"\nplots in {out}")
    if args.check and failures:
        for f in failures:
            print(f"FAILED: {f}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
