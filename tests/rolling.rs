//! A rolling restart through a real load balancer (HAProxy, installed by `.ci/run`), the way
//! kubelet replaces pods: preStop, then SIGTERM. The apps die at once on SIGTERM. Without
//! tidegate requests fail; with tidegate as a sidecar none do.

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::Request;
use nix::sys::signal::Signal;
use support::*;

const REPLICAS: usize = 3;

fn fixture() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/child_app.py").to_owned()
}

/// A process this test started; killed by PID when dropped.
struct Proc(Child);

impl Proc {
    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.0.id() as i32)
    }

    fn signal(&self, signal: Signal) {
        let _ = nix::sys::signal::kill(self.pid(), signal);
    }

    fn wait(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        while self.0.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "process {} did not exit",
                self.0.id()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn start_app(port: u16, marker: &std::path::Path) -> Proc {
    Proc(
        Command::new("python3")
            .args([
                &fixture(),
                &port.to_string(),
                &marker.display().to_string(),
                "0",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("python3 is needed for this test"),
    )
}

/// One pod slot: the app's port, and with tidegate its listen and admin ports.
struct Slot {
    app_port: u16,
    proxy_port: u16,
    admin_port: u16,
    app: Option<Proc>,
    sidecar: Option<Binary>,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            app_port: free_port(),
            proxy_port: free_port(),
            admin_port: free_port(),
            app: None,
            sidecar: None,
        }
    }

    fn start(&mut self, with_tidegate: bool, dir: &std::path::Path) {
        self.app = Some(start_app(
            self.app_port,
            &dir.join(format!("marker-{}", self.app_port)),
        ));
        if with_tidegate {
            let listen = format!("127.0.0.1:{}", self.proxy_port);
            let admin = format!("127.0.0.1:{}", self.admin_port);
            let upstream = format!("http://127.0.0.1:{}", self.app_port);
            self.sidecar = Some(Binary::start_raw(
                &[
                    "--listen",
                    &listen,
                    "--admin-listen",
                    &admin,
                    "--upstream",
                    &upstream,
                    "--app-health-path",
                    "/health",
                    "--app-health-interval",
                    "200ms",
                    // HAProxy checks every second with fall 1: 3 s leaves a margin on a
                    // loaded machine.
                    "--shutdown-delay",
                    "3s",
                    "--drain-timeout",
                    "10s",
                    "--access-log",
                    "false",
                ],
                |_| {},
            ));
        }
    }

    /// Waits until the pod is ready by its own readiness (tidegate's `/readyz`, or the app's
    /// health route), as kubelet does before a pod joins the endpoints. HAProxy counts a
    /// server as up before its first check, so this must come first.
    async fn wait_ready(&self) {
        let url = match &self.sidecar {
            Some(_) => format!("http://127.0.0.1:{}/readyz", self.admin_port),
            None => format!("http://127.0.0.1:{}/health", self.app_port),
        };
        eventually_async("pod ready", Duration::from_secs(20), || {
            let url = url.clone();
            async move { matches!(get(&url).await, Ok((status, _, _)) if status.is_success()) }
        })
        .await;
    }

    /// Kubelet's termination: preStop hooks, then SIGTERM to every container.
    async fn terminate(&mut self, with_tidegate: bool) {
        if let Some(mut sidecar) = self.sidecar.take() {
            // Classic sidecar: tidegate has no preStop and gets SIGTERM at once; the app
            // container's preStop calls /prestop, and the app gets SIGTERM when it returns.
            sidecar.signal(Signal::SIGTERM);
            let (status, _, body) = get(&format!("http://127.0.0.1:{}/prestop", self.admin_port))
                .await
                .expect("prestop answers");
            assert_eq!(status.as_u16(), 200, "{body}");
            let mut app = self.app.take().unwrap();
            app.signal(Signal::SIGTERM);
            tokio::task::spawn_blocking(move || {
                app.wait(Duration::from_secs(10));
                assert_eq!(
                    sidecar.wait_exit(Duration::from_secs(10)),
                    0,
                    "{}",
                    sidecar.log()
                );
            })
            .await
            .unwrap();
        } else {
            assert!(!with_tidegate);
            let mut app = self.app.take().unwrap();
            app.signal(Signal::SIGTERM);
            tokio::task::spawn_blocking(move || app.wait(Duration::from_secs(10)))
                .await
                .unwrap();
        }
    }
}

struct Haproxy {
    _proc: Proc,
    front: u16,
    stats: u16,
}

fn start_haproxy(slots: &[Slot], with_tidegate: bool, dir: &std::path::Path) -> Haproxy {
    let front = free_port();
    let stats = free_port();
    let mut servers = String::new();
    for (i, s) in slots.iter().enumerate() {
        if with_tidegate {
            // Readiness is tidegate's /readyz on its admin port, like a readinessProbe.
            servers += &format!(
                "    server pod{i} 127.0.0.1:{} check port {} inter 1s fall 1 rise 1\n",
                s.proxy_port, s.admin_port
            );
        } else {
            servers += &format!(
                "    server pod{i} 127.0.0.1:{} check inter 1s fall 1 rise 1\n",
                s.app_port
            );
        }
    }
    let check = if with_tidegate {
        "GET /readyz"
    } else {
        "GET /health"
    };
    let config = format!(
        "global\n    maxconn 2000\n\
         defaults\n    mode http\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n\
         \x20   retries 0\n    option http-server-close\n\
         frontend fe\n    bind 127.0.0.1:{front}\n    default_backend pods\n\
         backend pods\n    balance roundrobin\n    option httpchk\n    http-check send meth {} uri {}\n{servers}\
         frontend stats\n    bind 127.0.0.1:{stats}\n    stats enable\n    stats uri /stats\n",
        check.split(' ').next().unwrap(),
        check.split(' ').nth(1).unwrap(),
    );
    let path = dir.join(format!("haproxy-{front}.cfg"));
    std::fs::write(&path, config).unwrap();
    let child = Command::new("haproxy")
        .args(["-db", "-f", &path.display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect(
            "haproxy is needed for this test: `bash .ci/run` installs it (apt-get install haproxy)",
        );
    Haproxy {
        _proc: Proc(child),
        front,
        stats,
    }
}

impl Haproxy {
    /// Status of `pod{i}` from the stats CSV (`UP`, `DOWN`, ...).
    async fn status(&self, i: usize) -> String {
        let Ok((_, _, csv)) = get(&format!("http://127.0.0.1:{}/stats;csv", self.stats)).await
        else {
            return "NOSTATS".into();
        };
        csv.lines()
            .find(|l| l.starts_with(&format!("pods,pod{i},")))
            .and_then(|l| l.split(',').nth(17))
            .unwrap_or("UNKNOWN")
            .to_owned()
    }

    async fn wait_up(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.status(i).await == "UP" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "pod{i} never became UP in HAProxy"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[derive(Debug, Default)]
struct Load {
    ok: usize,
    failed: usize,
    errors: Vec<String>,
}

/// Runs a full rolling restart under constant load and returns what the clients saw.
async fn rolling_restart(with_tidegate: bool) -> Load {
    let dir = scratch_dir("rolling");
    let mut slots: Vec<Slot> = (0..REPLICAS).map(|_| Slot::new()).collect();
    for s in &mut slots {
        s.start(with_tidegate, &dir);
    }
    for s in &slots {
        s.wait_ready().await;
    }
    let haproxy = start_haproxy(&slots, with_tidegate, &dir);
    for i in 0..REPLICAS {
        haproxy.wait_up(i).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for c in 0..8 {
        let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
        let base = format!("http://127.0.0.1:{}", haproxy.front);
        clients.push(tokio::spawn(async move {
            let client = client();
            let mut n = 0usize;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                // One request in ten takes a second: some are always in flight.
                let path = if (n + c).is_multiple_of(10) {
                    "/slow"
                } else {
                    "/fast"
                };
                let req = Request::get(format!("{base}{path}")).body(empty()).unwrap();
                match tokio::time::timeout(Duration::from_secs(10), send(&client, req)).await {
                    Ok(Ok((status, _, _))) if status.is_success() => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Ok((status, _, body))) => {
                        failures.lock().unwrap().push(format!("{status} {body}"))
                    }
                    Ok(Err(e)) => failures.lock().unwrap().push(e),
                    Err(_) => failures.lock().unwrap().push("client timeout".into()),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    for (i, slot) in slots.iter_mut().enumerate() {
        slot.terminate(with_tidegate).await;
        slot.start(with_tidegate, &dir);
        slot.wait_ready().await;
        haproxy.wait_up(i).await;
        // Endpoints converge before the next pod goes (maxUnavailable: 1, minReadySeconds).
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    drop(haproxy);
    drop(slots);
    let _ = std::fs::remove_dir_all(&dir);
    let errors = failures.lock().unwrap().clone();
    Load {
        ok: ok.load(Ordering::SeqCst),
        failed: errors.len(),
        errors,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_through_haproxy_loses_nothing_with_tidegate() {
    let bare = rolling_restart(false).await;
    assert!(
        bare.failed > 0,
        "without tidegate the rollout must show failures, or the test proves nothing: {bare:?}"
    );
    let guarded = rolling_restart(true).await;
    assert!(guarded.ok > 200, "constant load went through: {guarded:?}");
    assert_eq!(
        guarded.failed, 0,
        "failed requests with tidegate: {:?}",
        guarded.errors
    );
    eprintln!(
        "rolling restart: without tidegate {} ok / {} failed; with tidegate {} ok / {} failed",
        bare.ok, bare.failed, guarded.ok, guarded.failed
    );
}
