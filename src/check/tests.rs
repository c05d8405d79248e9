use super::manifest::parse_documents;
use super::*;

const GOOD: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  strategy:
    rollingUpdate: {maxSurge: 25%, maxUnavailable: 0}
  template:
    metadata:
      labels: {app: web}
    spec:
      terminationGracePeriodSeconds: 30
      containers:
        - name: app
          image: example/app:1
          livenessProbe:
            httpGet: {path: /app/livez, port: 9901}
          lifecycle:
            preStop:
              httpGet: {path: /prestop, port: 9901}
        - name: tidegate
          image: ghcr.io/example/tidegate:0.1
          args: ["--upstream=http://127.0.0.1:8000", "--shutdown-delay=10s", "--drain-timeout=15s"]
          ports:
            - {name: http, containerPort: 8080}
            - {name: admin, containerPort: 9901}
          readinessProbe:
            httpGet: {path: /readyz, port: admin}
          livenessProbe:
            httpGet: {path: /livez, port: admin}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports:
    - {port: 80, targetPort: http}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata: {name: web}
spec:
  maxUnavailable: 1
  selector:
    matchLabels: {app: web}
"#;

fn run(yaml: &str) -> Report {
    let mut objects = Vec::new();
    parse_documents("test.yaml", yaml, &mut objects).unwrap();
    check_objects(&objects)
}

fn rules(report: &Report) -> Vec<(&'static str, Severity)> {
    report
        .findings
        .iter()
        .map(|f| (f.rule, f.severity))
        .collect()
}

#[test]
fn good_manifest_has_no_findings() {
    let report = run(GOOD);
    assert_eq!(report.pods_checked, 1);
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
}

#[test]
fn short_grace_period() {
    let report = run(&GOOD.replace(
        "terminationGracePeriodSeconds: 30",
        "terminationGracePeriodSeconds: 20",
    ));
    let f = &report.findings[0];
    assert_eq!((f.rule, f.severity), ("grace-period", Severity::Error));
    assert_eq!(f.field, "spec.template.spec.terminationGracePeriodSeconds");
    assert!(f.fix.contains("at least 27"), "{}", f.fix);
    // The default grace period (30s) is too short for longer timings.
    let report = run(&GOOD
        .replace("      terminationGracePeriodSeconds: 30\n", "")
        .replace("--drain-timeout=15s", "--drain-timeout=25s"));
    assert_eq!(rules(&report), vec![("grace-period", Severity::Error)]);
}

#[test]
fn unavailable_without_surge_and_the_default() {
    let report = run(&GOOD.replace(
        "{maxSurge: 25%, maxUnavailable: 0}",
        "{maxSurge: 0, maxUnavailable: 1}",
    ));
    assert_eq!(rules(&report), vec![("rollout", Severity::Error)]);
    let report = run(&GOOD.replace(
        "    rollingUpdate: {maxSurge: 25%, maxUnavailable: 0}\n",
        "    type: RollingUpdate\n",
    ));
    assert_eq!(rules(&report), vec![("rollout", Severity::Warning)]);
    assert!(report.findings[0].message.contains("25% (the default)"));
}

#[test]
fn app_probe_on_its_own_port() {
    let report = run(&GOOD.replace(
        "httpGet: {path: /app/livez, port: 9901}",
        "httpGet: {path: /health, port: 8000}",
    ));
    assert_eq!(rules(&report), vec![("app-probe-port", Severity::Warning)]);
    assert_eq!(
        report.findings[0].field,
        "spec.template.spec.containers[0].livenessProbe"
    );
    assert!(report.findings[0].fix.contains("/app/livez"));
}

#[test]
fn liveness_and_readiness_on_the_same_endpoint() {
    let report = run(&GOOD.replace(
        "httpGet: {path: /livez, port: admin}",
        "httpGet: {path: /readyz, port: admin}",
    ));
    assert_eq!(rules(&report), vec![("same-endpoint", Severity::Warning)]);
}

#[test]
fn missing_prestop_in_classic_sidecar_mode() {
    let report = run(&GOOD.replace(
        "          lifecycle:\n            preStop:\n              httpGet: {path: /prestop, port: 9901}\n",
        "",
    ));
    assert_eq!(rules(&report), vec![("no-prestop", Severity::Error)]);
    let report = run(&GOOD.replace(
        "httpGet: {path: /prestop, port: 9901}",
        "exec: {command: [sleep, \"15\"]}",
    ));
    assert_eq!(rules(&report), vec![("no-prestop", Severity::Warning)]);
}

#[test]
fn admin_token_needs_the_header_in_prestop() {
    let with_token = GOOD.replace(
        "          ports:\n            - {name: http",
        "          env:\n            - name: TIDEGATE_ADMIN_TOKEN\n              valueFrom: {secretKeyRef: {name: tidegate, key: token}}\n          ports:\n            - {name: http",
    );
    let report = run(&with_token);
    assert_eq!(rules(&report), vec![("no-prestop", Severity::Error)]);
    assert!(
        report.findings[0]
            .field
            .ends_with("preStop.httpGet.httpHeaders")
    );
    let fixed = with_token.replace(
        "httpGet: {path: /prestop, port: 9901}",
        "httpGet: {path: /prestop, port: 9901, httpHeaders: [{name: Authorization, value: Bearer x}]}",
    );
    assert!(
        run(&fixed).findings.is_empty(),
        "{:#?}",
        run(&fixed).findings
    );
}

#[test]
fn service_bypassing_tidegate() {
    let report = run(&GOOD.replace(
        "{port: 80, targetPort: http}",
        "{port: 80, targetPort: 8000}",
    ));
    assert_eq!(
        rules(&report),
        vec![("service-target-port", Severity::Error)]
    );
    assert_eq!(report.findings[0].object, "Service/web");
}

#[test]
fn unparsable_flags() {
    let report = run(&GOOD.replace("--drain-timeout=15s", "--drain-timeout=soon"));
    assert_eq!(rules(&report), vec![("flags", Severity::Error)]);
    assert!(report.findings[0].message.contains("--drain-timeout"));
    let report = run(&GOOD.replace("\"--drain-timeout=15s\"", "\"--drain-timout=15s\""));
    assert_eq!(rules(&report), vec![("flags", Severity::Error)]);
}

#[test]
fn environment_variables_count_as_flags() {
    let yaml = GOOD.replace(
        "          ports:\n            - {name: http",
        "          env:\n            - {name: TIDEGATE_SHUTDOWN_DELAY, value: 40s}\n          ports:\n            - {name: http",
    );
    // The flag --shutdown-delay=10s on the command line wins over the environment.
    assert!(run(&yaml).findings.is_empty());
    let yaml = yaml.replace("\"--shutdown-delay=10s\", ", "");
    assert_eq!(rules(&run(&yaml)), vec![("grace-period", Severity::Error)]);
}

#[test]
fn native_sidecar_and_supervisor_modes() {
    let native = r#"
kind: Deployment
metadata: {name: n}
spec:
  strategy: {rollingUpdate: {maxSurge: 1, maxUnavailable: 0}}
  template:
    spec:
      initContainers:
        - name: tidegate
          image: tidegate:1
          restartPolicy: Always
      containers:
        - name: app
          image: app:1
"#;
    let report = run(native);
    assert_eq!(report.pods_checked, 1);
    // Native sidecars are stopped after the app, so a missing preStop is a warning only.
    assert_eq!(rules(&report), vec![("no-prestop", Severity::Warning)]);

    let blocking = native.replace("          restartPolicy: Always\n", "");
    assert_eq!(
        rules(&run(&blocking)),
        vec![
            ("init-container", Severity::Error),
            ("no-prestop", Severity::Warning)
        ]
    );

    let supervisor = r#"
kind: Pod
metadata: {name: s}
spec:
  terminationGracePeriodSeconds: 30
  containers:
    - name: app
      image: app-with-tidegate:1
      command: [/usr/local/bin/tidegate, --drain-timeout=15s, --, gunicorn, app:app]
      readinessProbe:
        httpGet: {path: /readyz, port: 9901}
"#;
    // 10 + 15 + 4 (child stop) + 2 > 30.
    assert_eq!(
        rules(&run(supervisor)),
        vec![("grace-period", Severity::Error)]
    );
}

#[test]
fn objects_without_tidegate_are_ignored() {
    let report = run(
        "kind: Deployment\nmetadata: {name: x}\nspec:\n  template:\n    spec:\n      containers:\n        - {name: a, image: nginx}\n",
    );
    assert_eq!(report.pods_checked, 0);
    assert!(report.findings.is_empty());
}
