#!/usr/bin/env python3
"""Offline checks of the shipped manifests and Dockerfile (run by .ci/run).

1. Builds every kustomization under k8s/ (resources and inline JSON 6902 patches, the features
   these manifests use; anything else fails loudly) and validates each built object against the
   Kubernetes schemas with kubernetes-validate (strict: unknown fields are errors). The
   PodMonitor CRD is checked for its required fields.
2. Runs `tidegate check` on every built kustomization: zero findings expected.
3. Lints the Dockerfile against the project's rules: pinned base images, `--locked` release
   build, a non-root numeric USER in the final stage, an exec-form ENTRYPOINT, no HEALTHCHECK.
"""
import json
import pathlib
import subprocess
import sys
import tempfile

import jsonpatch
import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
K8S_VERSION = "1.31.0"
problems = []


def build(directory: pathlib.Path) -> list:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources", "patches"}
    if unsupported:
        raise SystemExit(f"{directory}: unsupported kustomize fields {sorted(unsupported)}")
    objects = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        if path.is_dir():
            objects.extend(build(path))
        else:
            objects.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        ops = yaml.safe_load(patch["patch"])
        matched = [o for o in objects if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]]
        if not matched:
            raise SystemExit(f"{directory}: patch target {target} matches nothing")
        for o in matched:
            patched = jsonpatch.apply_patch(o, ops)
            objects[objects.index(o)] = patched
    return objects


def validate(directory: pathlib.Path, objects: list) -> None:
    for o in objects:
        name = f"{directory.relative_to(ROOT)}: {o.get('kind')}/{o.get('metadata', {}).get('name')}"
        if o.get("kind") == "PodMonitor":
            spec = o.get("spec", {})
            if o.get("apiVersion") != "monitoring.coreos.com/v1" or "selector" not in spec or not spec.get("podMetricsEndpoints"):
                problems.append(f"{name}: PodMonitor needs apiVersion monitoring.coreos.com/v1, spec.selector, spec.podMetricsEndpoints")
            continue
        try:
            kubernetes_validate.validate(o, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{name}: {e.message} at {'.'.join(str(p) for p in e.path)}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(f"{name}: no schema: {e}")


def check_with_tidegate(directory: pathlib.Path, objects: list, binary: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "built.yaml"
        out.write_text(yaml.safe_dump_all(objects))
        result = subprocess.run([binary, "check", str(out)], capture_output=True, text=True)
        if result.returncode != 0 or "0 error(s), 0 warning(s), 0 info" not in result.stdout:
            problems.append(f"{directory.relative_to(ROOT)}: tidegate check found problems:\n{result.stdout}{result.stderr}")


def lint_dockerfile() -> None:
    lines = [l.strip() for l in (ROOT / "Dockerfile").read_text().splitlines()]
    instructions = [l for l in lines if l and not l.startswith("#")]
    froms = [l for l in instructions if l.upper().startswith("FROM ")]
    for f in froms:
        image = f.split()[1]
        if ":" not in image or image.endswith(":latest"):
            problems.append(f"Dockerfile: base image not pinned: {f}")
    final = instructions[instructions.index(froms[-1]):]
    users = [l.split()[1] for l in final if l.upper().startswith("USER ")]
    if not users or users[-1].split(":")[0] in ("0", "root") or not users[-1].split(":")[0].isdigit():
        problems.append("Dockerfile: the final stage must set a numeric non-root USER")
    entry = [l for l in final if l.upper().startswith("ENTRYPOINT ")]
    if not entry or not entry[-1].split(None, 1)[1].startswith("["):
        problems.append("Dockerfile: ENTRYPOINT must be in exec (JSON) form")
    if any(l.upper().startswith("HEALTHCHECK") for l in instructions):
        problems.append("Dockerfile: no HEALTHCHECK: Kubernetes probes check health")
    if not any("cargo build --release --locked" in l for l in instructions):
        problems.append("Dockerfile: build with cargo build --release --locked")


def main() -> int:
    binary = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "target" / "debug" / "tidegate")
    kustomizations = sorted(p.parent for p in (ROOT / "k8s").rglob("kustomization.yaml"))
    for directory in kustomizations:
        objects = build(directory)
        validate(directory, objects)
        if any(o.get("kind") == "Deployment" for o in objects):
            check_with_tidegate(directory, objects, binary)
        print(f"built and validated {directory.relative_to(ROOT)}: {len(objects)} objects")
    overlay = build(ROOT / "k8s" / "overlays" / "native-sidecar")
    pod = next(o for o in overlay if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    init = [c for c in pod.get("initContainers", []) if c["name"] == "tidegate"]
    if not init or init[0].get("restartPolicy") != "Always" or any(c["name"] == "tidegate" for c in pod["containers"]):
        problems.append("native-sidecar overlay: tidegate must be an init container with restartPolicy: Always")
    json.loads((ROOT / "k8s" / "grafana" / "tidegate-dashboard.json").read_text())
    lint_dockerfile()
    for p in problems:
        print(f"PROBLEM: {p}")
    print(f"manifests: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
