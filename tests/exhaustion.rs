//! Resource exhaustion against the real binary: running out of file descriptors (the accept
//! loop backs off, logs once and recovers), and an upstream that flaps (no connection, task or
//! descriptor is leaked).

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// User + system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn clock_ticks_per_second() -> u64 {
    let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(100)
}

/// The descriptors `pid` holds once the count has stayed the same for 250 ms (connections
/// just used close a moment after their clients do), within 10 s.
async fn settled_fds(pid: i32) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut last, mut same) = (open_fds(pid), 0);
    while same < 5 {
        assert!(Instant::now() < deadline, "descriptor count never settled");
        tokio::time::sleep(Duration::from_millis(50)).await; // the polling interval
        let now = open_fds(pid);
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    last
}

/// Sets the soft descriptor limit of `pid` (a process this test started).
fn set_nofile(pid: i32, soft: usize) {
    let status = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={soft}:")])
        .status()
        .expect("prlimit (util-linux) is needed for this test");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_backs_off_on_emfile_logs_once_and_recovers() {
    let app = ok_upstream().await;
    // App checks once (at start) only, not every 100 ms as `Binary::start` sets: each check
    // opens a socket for a moment, and one open while the baseline below is counted would free
    // a descriptor mid-outage, letting one accept through and starting a second outage with
    // its own log line.
    let upstream = format!("http://{}", app.addr);
    let tg = Binary::start_raw(
        &[
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--upstream",
            &upstream,
            "--app-health-interval",
            "1h",
        ],
        |_| {},
    );
    wait_admin_ready(tg.admin).await;
    let (status, _, _) = get(&format!("http://{}/", tg.addr)).await.unwrap();
    assert_eq!(status, 200);

    // Leave room for a handful of connections only, counted once the connections of the
    // readiness checks and of that request have closed.
    let baseline = settled_fds(tg.pid()).await;
    set_nofile(tg.pid(), baseline + 4);
    let mut held = Vec::new();
    for _ in 0..24 {
        // The kernel completes these handshakes; tidegate accepts until it runs out.
        held.push(TcpStream::connect(tg.addr).await.unwrap());
    }
    eventually(
        "the accept error is logged",
        Duration::from_secs(10),
        || tg.log().contains("Accept failed"),
    )
    .await;

    // While out of descriptors the accept loop sleeps between attempts instead of spinning.
    let hz = clock_ticks_per_second();
    let before = cpu_ticks(tg.pid());
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await; // the measurement window itself
    let used = cpu_ticks(tg.pid()) - before;
    let share = used as f64 / hz as f64 / window.elapsed().as_secs_f64();
    assert!(
        share < 0.3,
        "accept loop used {:.0}% of a core while out of fds",
        share * 100.0
    );
    let log = tg.log();
    assert_eq!(
        log.matches("Accept failed").count(),
        1,
        "logged once:\n{log}"
    );

    // Descriptors come back: the backlog is accepted and new requests are served.
    drop(held);
    let url = format!("http://{}/", tg.addr);
    eventually_async("requests are served again", Duration::from_secs(10), || {
        let url = url.clone();
        async move { matches!(get(&url).await, Ok((s, _, _)) if s == 200) }
    })
    .await;
    assert!(
        tg.log().contains("Accepting connections again"),
        "{}",
        tg.log()
    );
}

/// An upstream that changes how it fails from one connection to the next: it resets at once,
/// answers half a response and closes, hangs up after the head, or answers properly.
/// [`Flapping::close_all`] closes every connection it has open.
struct Flapping {
    addr: SocketAddr,
    connections: Arc<Mutex<JoinSet<()>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Flapping {
    async fn start() -> Flapping {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections: Arc<Mutex<JoinSet<()>>> = Arc::default();
        let set = connections.clone();
        let accept = tokio::spawn(async move {
            for n in 0usize.. {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                set.lock().unwrap().spawn(flap(stream, n % 4));
            }
        });
        Flapping {
            addr,
            connections,
            accept,
        }
    }

    fn close_all(&self) {
        self.connections.lock().unwrap().abort_all();
    }
}

impl Drop for Flapping {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn flap(mut stream: TcpStream, mode: usize) {
    let mut buf = [0u8; 4096];
    match mode {
        0 => {} // close at once
        1 => {
            let _ = stream.read(&mut buf).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort")
                .await;
        }
        2 => {
            let _ = stream.read(&mut buf).await;
        }
        _ => loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if stream.write_all(ok).await.is_err() {
                        break;
                    }
                }
            }
        },
    }
}

/// Sends `rounds` requests from each of 8 clients; returns the count per status (0: the
/// client saw a transport error).
async fn load(url: &str, rounds: usize) -> BTreeMap<u16, usize> {
    let mut clients = JoinSet::new();
    for _ in 0..8 {
        let url = url.to_owned();
        clients.spawn(async move {
            let mut codes = Vec::new();
            for _ in 0..rounds {
                codes.push(get(&url).await.map(|(s, _, _)| s.as_u16()).unwrap_or(0));
            }
            codes
        });
    }
    let mut seen = BTreeMap::new();
    while let Some(codes) = clients.join_next().await {
        for code in codes.unwrap() {
            *seen.entry(code).or_insert(0) += 1;
        }
    }
    seen
}

/// (open connections, requests in flight, runtime tasks, open fds) once they hold still for
/// three heartbeat samples in a row.
async fn settled(tg: &Binary) -> (f64, f64, f64, usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = None;
    let mut same = 0;
    loop {
        let now = (
            metric(tg.admin, "tidegate_connections_open").await.unwrap(),
            metric(tg.admin, "tidegate_in_flight").await.unwrap(),
            metric(tg.admin, "tidegate_runtime_tasks").await.unwrap(),
            open_fds(tg.pid()),
        );
        same = if last == Some(now) { same + 1 } else { 0 };
        if same == 3 {
            return now;
        }
        assert!(Instant::now() < deadline, "never settled: {now:?}");
        last = Some(now);
        tokio::time::sleep(Duration::from_millis(150)).await; // > one heartbeat sample
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_upstream_leaks_no_connections_tasks_or_descriptors() {
    let app = Flapping::start().await;
    let tg = Binary::start(&format!("http://{}", app.addr), &["--access-log", "false"]);
    wait_admin_ready(tg.admin).await;
    let url = format!("http://{}/", tg.addr);

    // A first round starts whatever lives as long as tidegate (the client pool's housekeeping
    // task); its state after the app closes everything is the baseline.
    load(&url, 5).await;
    app.close_all();
    let baseline = settled(&tg).await;
    assert_eq!((baseline.0, baseline.1), (0.0, 0.0), "{baseline:?}");

    let seen = load(&url, 50).await;
    // 0: the app cut its body short after the head was forwarded, so the client's read of
    // the body fails (the status cannot be taken back).
    assert!(
        seen.contains_key(&200) && seen.contains_key(&502),
        "{seen:?}"
    );
    assert!(seen.keys().all(|c| [0, 200, 502].contains(c)), "{seen:?}");
    app.close_all();
    let after = settled(&tg).await;
    assert_eq!((after.0, after.1), (0.0, 0.0), "{after:?}");
    assert!(
        after.2 <= baseline.2 && after.3 <= baseline.3,
        "leak after 400 flapping exchanges: {after:?} vs baseline {baseline:?}"
    );
}
