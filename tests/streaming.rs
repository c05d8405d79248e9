//! 1 GiB each way through the real binary with flat memory: the proxy's RSS is sampled while
//! the bodies stream and must stay far below the body size.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use support::*;

const GIB: u64 = 1 << 30;
const CHUNK: usize = 256 * 1024;
/// RSS growth allowed while 1 GiB passes: buffers and pools, not the body.
const MAX_GROWTH_KIB: u64 = 64 * 1024;

fn generator(
    total: u64,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, hyper::Error>> + Send {
    let chunk = Bytes::from(vec![0x5a; CHUNK]);
    let mut sent = 0u64;
    futures_util::stream::poll_fn(move |_| {
        if sent >= total {
            return std::task::Poll::Ready(None);
        }
        sent += CHUNK as u64;
        std::task::Poll::Ready(Some(Ok(Frame::data(chunk.clone()))))
    })
}

/// Samples the binary's RSS every 20 ms until `stop`; returns the peak.
fn sample_rss(pid: i32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        while !stop.load(Ordering::SeqCst) {
            if let Some(kib) = rss_kib_of(pid) {
                peak = peak.max(kib);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        peak
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_each_way_with_flat_memory() {
    let received = Arc::new(AtomicU64::new(0));
    let seen = received.clone();
    let app = upstream(move |req: Request<Incoming>| {
        let seen = seen.clone();
        async move {
            if req.uri().path() == "/download" {
                return Response::new(BodyExt::boxed(StreamBody::new(generator(GIB))));
            }
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    n += data.len() as u64;
                }
            }
            seen.store(n, Ordering::SeqCst);
            Response::new(full(n.to_string()))
        }
    })
    .await;
    let bin = Binary::start(&format!("http://{}", app.addr), &["--access-log", "false"]);
    // Warm up pools and allocator, then take the baseline.
    for _ in 0..3 {
        get(&format!("http://{}/warm", bin.addr)).await.unwrap();
    }
    let baseline = bin.rss_kib();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_rss(bin.pid(), stop.clone());

    let req = Request::post(format!("http://{}/upload", bin.addr))
        .body(BodyExt::boxed(StreamBody::new(generator(GIB))))
        .unwrap();
    let (status, _, body) = send(&client(), req).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, GIB.to_string());
    assert_eq!(received.load(Ordering::SeqCst), GIB);

    let rsp = client()
        .request(
            Request::get(format!("http://{}/download", bin.addr))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = rsp.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            n += data.len() as u64;
        }
    }
    assert_eq!(n, GIB);

    stop.store(true, Ordering::SeqCst);
    let peak = tokio::task::spawn_blocking(move || sampler.join().unwrap())
        .await
        .unwrap();
    let growth = peak.saturating_sub(baseline);
    eprintln!("proxy RSS: baseline {baseline} KiB, peak {peak} KiB while 2 GiB streamed");
    assert!(
        growth < MAX_GROWTH_KIB,
        "RSS grew by {growth} KiB while streaming 1 GiB each way"
    );
}
