//! The pitfalls `tidegate check` looks for. Each rule reads one pod that runs tidegate (and
//! the other objects of the input) and reports findings with the field at fault, why it
//! matters and the fix.

use std::time::Duration;

use serde_json::Value;

use super::manifest::{Mode, Object, TidegatePod};
use super::{Finding, Severity};

/// Kubernetes' default `terminationGracePeriodSeconds`.
const DEFAULT_GRACE: u64 = 30;
/// Time kept free between the end of the drain and SIGKILL.
const MARGIN: Duration = Duration::from_secs(2);

/// Runs every rule on `pod`.
pub(super) fn check_pod(pod: &TidegatePod<'_>, objects: &[Object], findings: &mut Vec<Finding>) {
    let config = match &pod.config {
        Ok(config) => config,
        Err(error) => {
            findings.push(finding(
                pod,
                Severity::Error,
                "flags",
                format!("{}/args", pod.container_path),
                format!("tidegate cannot parse its flags: {error}"),
                "The container would exit with code 2 at start and never serve.",
                "Fix the flag named in the message (see `tidegate --help`).",
            ));
            return;
        }
    };
    if pod.container_path.contains("/initContainers/") && pod.container["restartPolicy"] != "Always"
    {
        findings.push(finding(
            pod,
            Severity::Error,
            "init-container",
            format!("{}/restartPolicy", pod.container_path),
            "tidegate is a plain init container: it never exits, so the app never starts".into(),
            "Init containers must complete before the app starts; only native sidecars keep running.",
            "Set restartPolicy: Always on this init container (Kubernetes 1.29+), or move it to containers.",
        ));
    }
    grace_period(pod, config, findings);
    rollout(pod, findings);
    probes(pod, config, findings);
    prestop(pod, config, findings);
    services(pod, config, objects, findings);
    disruption_budget(pod, objects, findings);
}

fn finding(
    pod: &TidegatePod<'_>,
    severity: Severity,
    rule: &'static str,
    field: String,
    message: String,
    why: &str,
    fix: &str,
) -> Finding {
    Finding {
        severity,
        rule,
        source: pod.object.source.clone(),
        object: format!("{}/{}", pod.object.kind, pod.object.name),
        field: pointer_to_path(&field),
        message,
        why: why.to_owned(),
        fix: fix.to_owned(),
    }
}

/// `/spec/template/spec/containers/0/args` → `spec.template.spec.containers[0].args`.
fn pointer_to_path(pointer: &str) -> String {
    let mut out = String::new();
    for part in pointer.trim_start_matches('/').split('/') {
        if part.chars().all(|c| c.is_ascii_digit()) && !part.is_empty() {
            out.push_str(&format!("[{part}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(part);
        }
    }
    out
}

fn grace_period(pod: &TidegatePod<'_>, config: &crate::Config, findings: &mut Vec<Finding>) {
    let args = &config.args;
    let mut needed = args.shutdown_delay + args.drain_timeout + MARGIN;
    if pod.mode == Mode::Supervisor {
        needed += args.child_stop_timeout;
    }
    let grace = pod.spec["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap_or(DEFAULT_GRACE);
    if Duration::from_secs(grace) < needed {
        findings.push(finding(
            pod,
            Severity::Error,
            "grace-period",
            format!("{}/terminationGracePeriodSeconds", pod.spec_path),
            format!(
                "grace period {grace}s is shorter than shutdown delay {}s + drain timeout {}s{} + {}s margin",
                args.shutdown_delay.as_secs(),
                args.drain_timeout.as_secs(),
                if pod.mode == Mode::Supervisor {
                    format!(" + child stop {}s", args.child_stop_timeout.as_secs())
                } else {
                    String::new()
                },
                MARGIN.as_secs()
            ),
            "Kubernetes SIGKILLs the pod when the grace period ends, cutting off requests still draining.",
            &format!(
                "Set terminationGracePeriodSeconds to at least {}, or shorten --shutdown-delay / --drain-timeout.",
                needed.as_secs_f64().ceil() as u64
            ),
        ));
    }
}

fn rollout(pod: &TidegatePod<'_>, findings: &mut Vec<Finding>) {
    if pod.object.kind != "Deployment" {
        return;
    }
    let strategy = &pod.object.value["spec"]["strategy"];
    if strategy["type"] == "Recreate" {
        findings.push(finding(
            pod,
            Severity::Warning,
            "rollout",
            "/spec/strategy/type".into(),
            "strategy Recreate stops every pod before starting new ones".into(),
            "Every deploy is an outage, however gracefully each pod drains.",
            "Use RollingUpdate with maxSurge: 25% and maxUnavailable: 0.",
        ));
        return;
    }
    let rolling = &strategy["rollingUpdate"];
    let unavailable = &rolling["maxUnavailable"];
    let surge = &rolling["maxSurge"];
    // Both default to 25% when absent.
    let unavailable_zero = is_zero(unavailable);
    let surge_zero = is_zero(surge);
    if !unavailable_zero && surge_zero {
        findings.push(finding(
            pod,
            Severity::Error,
            "rollout",
            "/spec/strategy/rollingUpdate/maxUnavailable".into(),
            format!(
                "maxUnavailable {} with maxSurge 0: rollouts remove capacity with nothing in its place",
                show(unavailable, "25%")
            ),
            "During a rollout the remaining pods take the whole load and shed it as 503s.",
            "Set maxSurge: 25% and maxUnavailable: 0.",
        ));
    } else if !unavailable_zero {
        findings.push(finding(
            pod,
            Severity::Warning,
            "rollout",
            "/spec/strategy/rollingUpdate/maxUnavailable".into(),
            format!(
                "maxUnavailable {} takes pods out before their replacements are ready",
                show(unavailable, "25% (the default)")
            ),
            "Capacity dips during every rollout; with load shedding that dip is visible as 503s.",
            "Set maxUnavailable: 0 and keep a surge (maxSurge: 25%).",
        ));
    }
}

fn is_zero(value: &Value) -> bool {
    match value {
        Value::Number(n) => n.as_u64() == Some(0),
        Value::String(s) => s.trim_end_matches('%').trim() == "0",
        _ => false, // absent: the 25% default
    }
}

fn show(value: &Value, default: &str) -> String {
    match value {
        Value::Null => default.to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Whether `port` (a number, or a name among the tidegate container's ports) is `number`.
/// Named ports resolve within the container that declares them.
fn tidegate_port_is(pod: &TidegatePod<'_>, port: &Value, number: u16) -> bool {
    let number = u64::from(number);
    match port {
        Value::Number(n) => n.as_u64() == Some(number),
        Value::String(name) => pod.container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| {
                p["name"].as_str() == Some(name) && p["containerPort"].as_u64() == Some(number)
            }),
        _ => false,
    }
}

fn probes(pod: &TidegatePod<'_>, config: &crate::Config, findings: &mut Vec<Finding>) {
    for (list, containers) in [
        ("containers", &pod.spec["containers"]),
        ("initContainers", &pod.spec["initContainers"]),
    ] {
        for (i, container) in containers.as_array().into_iter().flatten().enumerate() {
            let path = format!("{}/{list}/{i}", pod.spec_path);
            let is_tidegate = path == pod.container_path;
            let name = container["name"].as_str().unwrap_or("?");
            let mut endpoints = Vec::new();
            for probe in ["livenessProbe", "readinessProbe"] {
                let p = &container[probe];
                if p.is_null() {
                    continue;
                }
                let (port, http_path) = if !p["httpGet"].is_null() {
                    (
                        &p["httpGet"]["port"],
                        p["httpGet"]["path"].as_str().unwrap_or("/"),
                    )
                } else if !p["tcpSocket"].is_null() {
                    (&p["tcpSocket"]["port"], "(tcp)")
                } else {
                    continue;
                };
                endpoints.push((probe, port.to_string(), http_path.to_owned()));
                let probing_admin = if is_tidegate {
                    tidegate_port_is(pod, port, config.args.admin_listen.port())
                } else {
                    port.as_u64() == Some(u64::from(config.args.admin_listen.port()))
                };
                let app_container = !is_tidegate || pod.mode == Mode::Supervisor;
                if app_container && !probing_admin {
                    let suggested = if probe == "livenessProbe" {
                        "/app/livez"
                    } else {
                        "/readyz"
                    };
                    findings.push(finding(
                        pod,
                        Severity::Warning,
                        "app-probe-port",
                        format!("{path}/{probe}"),
                        format!("{probe} of container {name:?} goes to the app's own port {port}"),
                        "When the app is saturated its probes queue behind user traffic and fail, and Kubernetes restarts or unroutes a pod that was only busy.",
                        &format!(
                            "Probe tidegate's admin port {} instead: {probe} -> {suggested}.",
                            config.args.admin_listen.port()
                        ),
                    ));
                }
            }
            if let [(_, port_a, path_a), (_, port_b, path_b)] = endpoints.as_slice()
                && port_a == port_b
                && path_a == path_b
            {
                findings.push(finding(
                    pod,
                    Severity::Warning,
                    "same-endpoint",
                    format!("{path}/livenessProbe"),
                    format!("liveness and readiness of container {name:?} use the same endpoint {path_a} on port {port_a}"),
                    "Whatever makes the pod unready (a draining tidegate, a busy app) then also restarts the container.",
                    "Liveness -> /livez (tidegate) or /app/livez (app); readiness -> /readyz.",
                ));
            }
        }
    }
}

fn prestop(pod: &TidegatePod<'_>, config: &crate::Config, findings: &mut Vec<Finding>) {
    if pod.mode == Mode::Supervisor {
        return;
    }
    let admin = u64::from(config.args.admin_listen.port());
    for (i, container) in pod.spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let path = format!("{}/containers/{i}", pod.spec_path);
        if path == pod.container_path {
            continue;
        }
        let name = container["name"].as_str().unwrap_or("?");
        let hook = &container["lifecycle"]["preStop"];
        let calls_prestop = hook["httpGet"]["path"].as_str() == Some("/prestop")
            && hook["httpGet"]["port"].as_u64() == Some(admin);
        let sends_token = hook["httpGet"]["httpHeaders"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|h| {
                h["name"]
                    .as_str()
                    .is_some_and(|n| n.eq_ignore_ascii_case("authorization"))
            });
        if calls_prestop && config.args.admin_token.is_some() && !sends_token {
            findings.push(finding(
                pod,
                Severity::Error,
                "no-prestop",
                format!("{path}/lifecycle/preStop/httpGet/httpHeaders"),
                format!("app container {name:?} calls /prestop without the Authorization header --admin-token requires"),
                "tidegate answers 401 at once, so kubelet signals the app while tidegate still routes to it.",
                "Add httpHeaders: [{name: Authorization, value: \"Bearer <token>\"}] to the preStop httpGet.",
            ));
            continue;
        }
        if calls_prestop {
            continue;
        }
        let (severity, message) = match (pod.mode, hook.is_null()) {
            (Mode::ClassicSidecar, true) => (
                Severity::Error,
                format!(
                    "app container {name:?} has no preStop hook; with a classic sidecar it gets SIGTERM at the same moment as tidegate"
                ),
            ),
            (_, true) => (
                Severity::Warning,
                format!("app container {name:?} has no preStop hook calling tidegate's /prestop"),
            ),
            (_, false) => (
                Severity::Warning,
                format!(
                    "app container {name:?} has a preStop hook that does not wait for tidegate's drain (/prestop on port {admin})"
                ),
            ),
        };
        findings.push(finding(
            pod,
            severity,
            "no-prestop",
            format!("{path}/lifecycle/preStop"),
            message,
            "An app that exits while tidegate still drains or still routes to it drops in-flight requests; a fixed sleep is a guess.",
            &format!("Add lifecycle.preStop.httpGet {{path: /prestop, port: {admin}}} to the app container: it returns when the drain is over."),
        ));
    }
}

fn services(
    pod: &TidegatePod<'_>,
    config: &crate::Config,
    objects: &[Object],
    findings: &mut Vec<Finding>,
) {
    let listen = config.args.listen.port();
    let admin = config.args.admin_listen.port();
    for service in objects.iter().filter(|o| o.kind == "Service") {
        let Some(selector) = service.value["spec"]["selector"].as_object() else {
            continue;
        };
        let selects = !selector.is_empty()
            && selector
                .iter()
                .all(|(k, v)| pod.labels.and_then(|l| l.get(k)) == Some(v));
        if !selects {
            continue;
        }
        for (i, port) in service.value["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let target = if port["targetPort"].is_null() {
                &port["port"]
            } else {
                &port["targetPort"]
            };
            // The admin port (for scraping) is fine too.
            let to_tidegate =
                tidegate_port_is(pod, target, listen) || tidegate_port_is(pod, target, admin);
            if !to_tidegate {
                findings.push(Finding {
                    severity: Severity::Error,
                    rule: "service-target-port",
                    source: service.source.clone(),
                    object: format!("Service/{}", service.name),
                    field: format!("spec.ports[{i}].targetPort"),
                    message: format!(
                        "targetPort {target} bypasses tidegate (listening on {listen}) in {}/{}",
                        pod.object.kind, pod.object.name
                    ),
                    why: "Traffic that skips tidegate is neither limited nor drained: the app is exposed to overload and deploys drop requests.".into(),
                    fix: format!("Point targetPort at tidegate's --listen port ({listen}, or its port name)."),
                });
            }
        }
    }
}

fn disruption_budget(pod: &TidegatePod<'_>, objects: &[Object], findings: &mut Vec<Finding>) {
    if !matches!(pod.object.kind.as_str(), "Deployment" | "StatefulSet") {
        return;
    }
    let covered = objects
        .iter()
        .filter(|o| o.kind == "PodDisruptionBudget")
        .any(|pdb| {
            pdb.value["spec"]["selector"]["matchLabels"]
                .as_object()
                .is_some_and(|m| {
                    !m.is_empty()
                        && m.iter()
                            .all(|(k, v)| pod.labels.and_then(|l| l.get(k)) == Some(v))
                })
        });
    if !covered && objects.iter().any(|o| o.kind == "Service") {
        findings.push(finding(
            pod,
            Severity::Info,
            "no-pdb",
            "/metadata/name".into(),
            "no PodDisruptionBudget in the input selects these pods".into(),
            "Node drains may evict every replica at once, however gracefully each one shuts down.",
            "Add a PodDisruptionBudget with maxUnavailable: 1 for these labels.",
        ));
    }
}
