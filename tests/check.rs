//! `tidegate check` on the repository's own manifests and on a file of known pitfalls.

use std::process::Command;

fn check(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .arg("check")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn the_repositorys_manifests_are_clean() {
    let (code, out) = check(&["k8s"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("1 pod(s) running tidegate checked: 0 error(s), 0 warning(s), 0 info"),
        "{out}"
    );
}

#[test]
fn every_pitfall_is_reported() {
    let (code, out) = check(&["--format", "json", "tests/manifests/bad"]);
    assert_eq!(code, 1, "errors exit 1: {out}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["pods_checked"], 2);
    let findings = report["findings"].as_array().unwrap();
    for rule in [
        "grace-period",
        "rollout",
        "app-probe-port",
        "same-endpoint",
        "no-prestop",
        "service-target-port",
        "flags",
    ] {
        let f = findings
            .iter()
            .find(|f| f["rule"] == rule)
            .unwrap_or_else(|| panic!("{rule} not reported: {out}"));
        for key in [
            "severity", "object", "field", "message", "why", "fix", "source",
        ] {
            assert!(
                f[key].as_str().is_some_and(|v| !v.is_empty()),
                "{rule}.{key}: {f}"
            );
        }
    }
    let flags = findings.iter().find(|f| f["rule"] == "flags").unwrap();
    assert_eq!(flags["object"], "StatefulSet/ledger");
    assert!(
        flags["message"]
            .as_str()
            .unwrap()
            .contains("--max-concurency")
    );
}

#[test]
fn text_output_and_stdin() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .args(["check", "-"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/manifests/bad/pitfalls.yaml"
    ))
    .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), yaml.as_bytes()).unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(text.contains("error[grace-period] Deployment/shop spec.template.spec.terminationGracePeriodSeconds (-)"), "{text}");
    assert!(text.contains("  why: "), "{text}");
    assert!(text.contains("  fix: "), "{text}");
}

#[test]
fn unreadable_input_exits_2() {
    let (code, out) = check(&["does/not/exist.yaml"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("does/not/exist.yaml: cannot read"), "{out}");
    let (code, _) = check(&[]);
    assert_eq!(code, 2);
}
