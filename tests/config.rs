//! The config file: precedence, errors, per-route settings, and hot reload under load.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use nix::sys::signal::Signal;
use support::*;

fn scratch(name: &str) -> PathBuf {
    scratch_dir(&format!("config-{name}"))
}

/// Replaces the file atomically, as editors and config management do.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn gauge(admin: std::net::SocketAddr, series: &str) -> f64 {
    metric(admin, series).await.unwrap_or(f64::NAN)
}

async fn wait_gauge(admin: std::net::SocketAddr, series: &str, want: f64) {
    eventually_async(
        &format!("{series} == {want}"),
        Duration::from_secs(10),
        || async move { metric(admin, series).await == Some(want) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precedence_is_flags_then_environment_then_file_then_defaults() {
    let app = ok_upstream().await;
    let dir = scratch("precedence");
    let file = dir.join("tidegate.toml");
    std::fs::write(
        &file,
        "max_concurrency = 3\nmax_queue = 7\n\n[[route]]\nname = \"reports\"\nprefix = \"/reports\"\nmax_concurrency = 2\n",
    )
    .unwrap();
    let file_s = file.display().to_string();
    let bin = Binary::start_with(
        &format!("http://{}", app.addr),
        &["--config", &file_s, "--max-concurrency", "6"],
        &[],
        |cmd| {
            cmd.env("TIDEGATE_MAX_CONCURRENCY", "4")
                .env("TIDEGATE_MAX_QUEUE", "5");
        },
    );
    assert_eq!(
        gauge(bin.admin, "tidegate_concurrency_limit").await,
        6.0,
        "flag beats env and file"
    );
    assert_eq!(
        gauge(bin.admin, "tidegate_queue_limit").await,
        5.0,
        "env beats file"
    );
    assert_eq!(
        gauge(
            bin.admin,
            "tidegate_route_concurrency_limit{route=\"reports\"}"
        )
        .await,
        2.0,
        "file beats defaults"
    );
    assert_ne!(gauge(bin.admin, "tidegate_config_hash").await, 0.0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn invalid_file_at_start_names_file_line_and_field() {
    let dir = scratch("invalid-start");
    let file = dir.join("bad.toml");
    std::fs::write(
        &file,
        "max_concurrency = 4\n\ndrain_timeout = \"forever\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .args(["--config", &file.display().to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("bad.toml:3: drain_timeout:"), "{stderr}");

    std::fs::write(&file, "max_concurency = 4\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .args(["--config", &file.display().to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("bad.toml:1: max_concurency: unknown field"),
        "{stderr}"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .args(["--config", &dir.join("missing.toml").display().to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("missing.toml: cannot read the config file"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_route_timeout_retry_after_and_methods() {
    let app = upstream(|req: Request<Incoming>| async move {
        if req.uri().path().contains("slow") {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        Response::new(full("ok"))
    })
    .await;
    let dir = scratch("routes");
    let file = dir.join("tidegate.toml");
    std::fs::write(
        &file,
        r#"
[[route]]
glob = "/slow/*/report"
timeout = "200ms"

[[route]]
name = "uploads"
prefix = "/upload"
methods = ["POST"]
max_concurrency = 1
retry_after = "30s"
"#,
    )
    .unwrap();
    let file_s = file.display().to_string();
    let tg = tidegate(app.addr, &["--config", &file_s, "--max-queue", "0"]).await;

    let start = Instant::now();
    let (status, headers, _) = get(&tg.url("/slow/x/report")).await.unwrap();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(headers["tidegate-error"], "upstream-timeout");
    assert!(start.elapsed() < Duration::from_secs(2));

    // POSTs to /upload share one slot; GETs are not in the route.
    let held = {
        let url = tg.url("/upload/slow");
        tokio::spawn(async move {
            let req = Request::post(url).body(empty()).unwrap();
            send(&client(), req).await
        })
    };
    eventually("upload in flight", Duration::from_secs(5), || {
        tg.metrics.admission.in_flight.get() == 1
    })
    .await;
    let req = Request::post(tg.url("/upload/2")).body(empty()).unwrap();
    let (status, headers, _) = send(&client(), req).await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["tidegate-shed"], "route-full");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((30..=31).contains(&retry), "route Retry-After: {retry}");
    assert_eq!(get(&tg.url("/upload/2")).await.unwrap().0, StatusCode::OK);
    held.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Reloads under constant load: the limit changes (metrics and behaviour), no request fails,
/// memory stays flat, and an invalid file keeps the old configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_changes_limits_without_failures() {
    let gate = Gate::start().await;
    let dir = scratch("reload");
    let file = dir.join("tidegate.toml");
    let config =
        |n: u32| format!("max_concurrency = {n}\nmax_queue = 20\nqueue_timeout = \"30s\"\n");
    std::fs::write(&file, config(8)).unwrap();
    let file_s = file.display().to_string();
    let bin = Binary::start(
        &format!("http://{}", gate.addr()),
        &["--config", &file_s, "--access-log", "false"],
    );
    wait_admin_ready(bin.admin).await;
    assert_eq!(gauge(bin.admin, "tidegate_config_generation").await, 1.0);

    // Constant load on a path the app answers at once.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let url = format!("http://{}/free", bin.addr);
        load.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::SeqCst) {
                let req = Request::get(url.as_str()).body(empty()).unwrap();
                match send(&c, req).await {
                    Ok((StatusCode::OK, _, _)) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    other => failed.lock().unwrap().push(format!("{other:?}")),
                }
            }
        }));
    }
    eventually("load running", Duration::from_secs(5), || {
        ok.load(Ordering::SeqCst) > 100
    })
    .await;
    let rss_before = bin.rss_kib();
    for round in 0..20u32 {
        write_atomically(&file, &config(6 + round % 3));
        bin.signal(Signal::SIGHUP);
        wait_gauge(bin.admin, "tidegate_config_generation", 2.0 + round as f64).await;
    }
    let served_during = ok.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.unwrap();
    }
    assert!(
        failed.lock().unwrap().is_empty(),
        "failed during reloads: {:?}",
        failed.lock().unwrap()
    );
    assert!(served_during > 200);
    let rss_after = bin.rss_kib();
    assert!(
        rss_after < rss_before + 8 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB over 20 reloads"
    );

    // Behaviour: with the limit at 2, exactly 2 reach the app; raising it admits the queued.
    write_atomically(&file, &config(2));
    bin.signal(Signal::SIGHUP);
    wait_gauge(bin.admin, "tidegate_concurrency_limit", 2.0).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let url = format!("http://{}/hold", bin.addr);
        held.push(tokio::spawn(async move { get(&url).await }));
    }
    gate.wait_arrived(2).await;
    wait_gauge(bin.admin, "tidegate_queued", 2.0).await;
    assert_eq!(gate.arrived(), 2);
    // This time the file watcher picks the change up, without a signal.
    write_atomically(&file, &config(4));
    gate.wait_arrived(4).await;
    assert_eq!(gauge(bin.admin, "tidegate_concurrency_limit").await, 4.0);
    assert_eq!(gauge(bin.admin, "tidegate_in_flight").await, 4.0);

    // An invalid file is rejected and the old configuration stays.
    let generation = gauge(bin.admin, "tidegate_config_generation").await;
    write_atomically(&file, "max_concurrency = \"lots\"\n");
    bin.signal(Signal::SIGHUP);
    wait_gauge(
        bin.admin,
        "tidegate_config_reloads_total{result=\"error\"}",
        1.0,
    )
    .await;
    assert_eq!(
        gauge(bin.admin, "tidegate_config_generation").await,
        generation
    );
    assert_eq!(gauge(bin.admin, "tidegate_concurrency_limit").await, 4.0);
    eventually("rejection logged", Duration::from_secs(5), || {
        bin.log().contains("Configuration rejected")
    })
    .await;
    assert!(
        bin.log().contains("tidegate.toml:1: max_concurrency"),
        "{}",
        bin.log()
    );

    // A setting that needs a restart is kept, with a warning.
    write_atomically(&file, &format!("{}upstream_http2 = true\n", config(4)));
    bin.signal(Signal::SIGHUP);
    eventually(
        "restart-only setting warned",
        Duration::from_secs(5),
        || bin.log().contains("cannot change live"),
    )
    .await;
    gate.release(4);
    for t in held {
        assert_eq!(t.await.unwrap().unwrap().0, StatusCode::OK);
    }
    // Still proxying over HTTP/1.1 to the app (which would take HTTP/2 as well): the
    // restart-only change was not applied.
    let r = get(&format!("http://{}/free", bin.addr)).await.unwrap();
    assert_eq!(r.0, StatusCode::OK, "{r:?}");
    assert_eq!(r.1["x-app-saw"], "HTTP/1.1", "{r:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Kubernetes mounts a ConfigMap as `file -> ..data/file` with `..data -> ..<timestamp>`, and
/// updates it by swapping the `..data` symlink atomically.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_symlink_swap_triggers_a_reload() {
    let app = ok_upstream().await;
    let dir = scratch("configmap");
    let v1 = dir.join("..2026_11_22_v1");
    std::fs::create_dir_all(&v1).unwrap();
    std::fs::write(v1.join("tidegate.toml"), "max_concurrency = 3\n").unwrap();
    std::os::unix::fs::symlink("..2026_11_22_v1", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/tidegate.toml", dir.join("tidegate.toml")).unwrap();
    let file_s = dir.join("tidegate.toml").display().to_string();
    let bin = Binary::start(&format!("http://{}", app.addr), &["--config", &file_s]);
    assert_eq!(gauge(bin.admin, "tidegate_concurrency_limit").await, 3.0);

    let v2 = dir.join("..2026_11_22_v2");
    std::fs::create_dir_all(&v2).unwrap();
    std::fs::write(v2.join("tidegate.toml"), "max_concurrency = 9\n").unwrap();
    std::os::unix::fs::symlink("..2026_11_22_v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(&v1).unwrap();

    wait_gauge(bin.admin, "tidegate_concurrency_limit", 9.0).await;
    assert_eq!(gauge(bin.admin, "tidegate_config_generation").await, 2.0);
    assert_eq!(
        gauge(bin.admin, "tidegate_config_reloads_total{result=\"ok\"}").await,
        1.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// One change, one reload, whichever trigger: a change applied by SIGHUP is not applied again
/// by the file watcher, nor a rejected one rejected again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_ed_change_is_reloaded_once() {
    let app = ok_upstream().await;
    let dir = scratch("once");
    let file = dir.join("tidegate.toml");
    std::fs::write(&file, "max_concurrency = 4\n").unwrap();
    let file_s = file.display().to_string();
    let bin = Binary::start(&format!("http://{}", app.addr), &["--config", &file_s]);
    wait_admin_ready(bin.admin).await;

    write_atomically(&file, "max_concurrency = 5\n");
    bin.signal(Signal::SIGHUP);
    wait_gauge(bin.admin, "tidegate_config_generation", 2.0).await;
    // The watcher looks at the file every second: let it look twice. Nothing may happen, so
    // there is nothing to wait for but time.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        gauge(bin.admin, "tidegate_config_generation").await,
        2.0,
        "{}",
        bin.log()
    );
    assert_eq!(
        gauge(bin.admin, "tidegate_config_reloads_total{result=\"ok\"}").await,
        1.0
    );

    write_atomically(&file, "max_concurrency = \"lots\"\n");
    bin.signal(Signal::SIGHUP);
    wait_gauge(
        bin.admin,
        "tidegate_config_reloads_total{result=\"error\"}",
        1.0,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        gauge(bin.admin, "tidegate_config_reloads_total{result=\"error\"}").await,
        1.0,
        "{}",
        bin.log()
    );

    // The watcher alone still picks up a change.
    write_atomically(&file, "max_concurrency = 6\n");
    wait_gauge(bin.admin, "tidegate_config_generation", 3.0).await;
    assert_eq!(gauge(bin.admin, "tidegate_concurrency_limit").await, 6.0);
    let _ = std::fs::remove_dir_all(&dir);
}
