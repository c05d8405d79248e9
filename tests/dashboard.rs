//! The Grafana dashboard is built on metric names tidegate really exports.

mod support;

use std::collections::BTreeSet;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_in_the_dashboard_exists() {
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/k8s/grafana/tidegate-dashboard.json"
    ))
    .unwrap();
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("valid JSON");
    assert!(json["panels"].as_array().is_some_and(|p| p.len() >= 6));

    let app = ok_upstream().await;
    let tg = tidegate(app.addr, &["--max-concurrency", "4", "--route", "/slow=1"]).await;
    tg.wait_ready().await;
    get(&tg.url("/")).await.unwrap();
    let (_, _, exposition) = get(&tg.admin_url("/metrics")).await.unwrap();
    let families: BTreeSet<&str> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();

    let mut referenced = BTreeSet::new();
    let bytes = dashboard.as_bytes();
    let mut i = 0;
    while let Some(pos) = dashboard[i..].find("tidegate_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &dashboard[start..end];
        let family = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        referenced.insert(family.to_owned());
        i = end;
    }
    assert!(referenced.len() >= 10, "{referenced:?}");
    for name in &referenced {
        assert!(
            families.contains(name.as_str()),
            "dashboard uses {name}, which tidegate does not export"
        );
    }
}
