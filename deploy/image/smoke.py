"""The checks of deploy/image/smoke.sh (read that first). Python stdlib plus PyYAML.

  smoke.py containerfile DOCKERFILE CONTEXT FACTS   writes CONTEXT/Containerfile and FACTS (JSON)
  smoke.py check-image FACTS INSPECT DEPLOYMENT TOML the built image agrees with Dockerfile, manifests
  smoke.py run --image ... -- PODMAN...             runs the container against fakes, checks it

Every wait is bounded; every failure is one line starting with "FAIL", and the script exits 1.
The fake credentials are random per run and never printed.
"""

import argparse
import copy
import http.client
import http.server
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib

import yaml

# The runtime stage's instructions that a FROM scratch build reproduces verbatim. Anything else
# (RUN, ADD, another COPY, VOLUME, HEALTHCHECK, ...) would make the smoke image differ from the
# real one, so it fails the check until this script learns to mirror it.
VERBATIM = {"ARG", "LABEL", "USER", "EXPOSE", "ENTRYPOINT", "CMD", "ENV", "WORKDIR", "STOPSIGNAL"}
BINARY_SOURCE = "/src/target/release/sidekey"
IMAGE_UID = 65532
# The slow stream of the shutdown check: long enough that SIGTERM, /readyz 503 and the drain all
# happen while it is in flight, even on a busy machine.
SLOW_CHUNKS, SLOW_DELAY = 16, 0.5


class Failed(Exception):
    pass


def ok(title, detail=""):
    print(f"ok   {title}" + (f": {detail}" if detail else ""), flush=True)


def need(cond, title, why):
    if not cond:
        raise Failed(f"{title}: {why}")


# ---------------------------------------------------------------------------------------------
# Dockerfile runtime stage -> Containerfile + facts
# ---------------------------------------------------------------------------------------------
def instructions(text):
    """(keyword, arguments, original text) for each instruction; continuation lines joined,
    comment lines dropped (also inside a continuation, as Docker does)."""
    out, buf = [], []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if stripped.endswith("\\"):
            buf.append(line.rstrip()[:-1])
            continue
        buf.append(line)
        joined = " ".join(part.strip() for part in buf).strip()
        buf = []
        if joined:
            keyword, _, args = joined.partition(" ")
            out.append((keyword.upper(), args.strip(), joined))
    return out


def expand(value, args):
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""), value)


def runtime_facts(dockerfile):
    with open(dockerfile) as f:
        ins = instructions(f.read())
    froms = [i for i, (k, _, _) in enumerate(ins) if k == "FROM"]
    need(froms, dockerfile, "no FROM")
    stage = ins[froms[-1] + 1:]
    facts = {"user": None, "expose": [], "labels": {}, "entrypoint": None, "cmd": None,
             "binary": None, "env": {}}
    args, lines = {}, []
    for keyword, rest, text in stage:
        if keyword == "COPY":
            words = shlex.split(rest)
            need(len(words) == 3 and words[0] == "--from=build" and words[1] == BINARY_SOURCE,
                 dockerfile, f"runtime stage has `{text}`; only `COPY --from=build "
                 f"{BINARY_SOURCE} <dest>` is mirrored by the smoke image")
            facts["binary"] = words[2]
            lines.append("COPY rootfs/ /")
            continue
        need(keyword in VERBATIM, dockerfile,
             f"runtime stage has {keyword} (`{text}`), which the FROM scratch smoke image does not "
             "mirror; teach deploy/image/smoke.py about it")
        lines.append(text)
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default.strip('"')
        elif keyword == "LABEL":
            for word in shlex.split(rest):
                k, _, v = word.partition("=")
                facts["labels"][k] = expand(v, args)
        elif keyword == "ENV":
            for word in shlex.split(rest):
                k, _, v = word.partition("=")
                facts["env"][k] = expand(v, args)
        elif keyword == "USER":
            facts["user"] = expand(rest, args)
        elif keyword == "EXPOSE":
            facts["expose"] += [p if "/" in p else f"{p}/tcp" for p in rest.split()]
        elif keyword in ("ENTRYPOINT", "CMD"):
            try:
                facts[keyword.lower()] = json.loads(rest)
            except json.JSONDecodeError:
                raise Failed(f"{dockerfile}: {keyword} is not in exec (JSON) form: sidekey must be "
                             "PID 1 to receive SIGTERM")
    for key in ("binary", "user", "entrypoint", "cmd"):
        need(facts[key], dockerfile, f"runtime stage sets no {key}")
    return facts, lines


def containerfile(dockerfile, context, facts_out):
    facts, lines = runtime_facts(dockerfile)
    with open(os.path.join(context, "Containerfile"), "w") as f:
        f.write("# Generated by deploy/image/smoke.sh from the runtime stage of the Dockerfile:\n"
                "# FROM scratch and the rootfs (binary + ldd's libraries) replace the base image\n"
                "# and the COPY --from=build; every other line is verbatim.\n"
                "FROM scratch\n" + "\n".join(lines) + "\n")
    with open(facts_out, "w") as f:
        json.dump(facts, f, indent=1)
    print(f"ok   Containerfile from the runtime stage of {dockerfile}: FROM scratch, "
          f"{len(lines)} instructions ({', '.join(l.split()[0] for l in lines)})")


# ---------------------------------------------------------------------------------------------
# The built image against the Dockerfile and the manifests
# ---------------------------------------------------------------------------------------------
def sidekey_container(deployment):
    with open(deployment) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for d in docs:
        if d.get("kind") == "Deployment":
            spec = d["spec"]["template"]["spec"]
            for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
                if c["name"] == "sidekey":
                    return spec, c
    raise Failed(f"{deployment}: no Deployment with a sidekey container")


def check_image(facts_path, inspect_path, deployment, toml_path):
    with open(facts_path) as f:
        facts = json.load(f)
    with open(inspect_path) as f:
        cfg = json.load(f)[0]["Config"]
    title = "image config = Dockerfile runtime stage"
    want_ports = sorted(facts["expose"])
    got = {
        "user": cfg.get("User"),
        "entrypoint": cfg.get("Entrypoint"),
        "cmd": cfg.get("Cmd"),
        "expose": sorted(cfg.get("ExposedPorts") or {}),
        "labels": cfg.get("Labels") or {},
    }
    for key in ("user", "entrypoint", "cmd", "labels"):
        need(got[key] == facts[key], title, f"{key} is {got[key]!r}, the Dockerfile says {facts[key]!r}")
    need(got["expose"] == want_ports, title, f"ports {got['expose']} != Dockerfile {want_ports}")
    need(facts["entrypoint"][0] == facts["binary"], title,
         f"ENTRYPOINT {facts['entrypoint'][0]} is not where the binary is copied ({facts['binary']})")
    ok(title, f"user {got['user']}, entrypoint {got['entrypoint']}, cmd {got['cmd']}, "
              f"ports {', '.join(got['expose'])}, {len(got['labels'])} labels")

    title = "image agrees with the manifests and the shipped config"
    spec, c = sidekey_container(deployment)
    uid, _, gid = got["user"].partition(":")
    sc = c.get("securityContext") or {}
    need(str(sc.get("runAsUser")) == uid, title, f"runAsUser {sc.get('runAsUser')} != image user {uid}")
    need(str(sc.get("runAsGroup", sc.get("runAsUser"))) == (gid or uid), title,
         f"runAsGroup {sc.get('runAsGroup')} != image group {gid}")
    need(str(spec.get("securityContext", {}).get("fsGroup")) == (gid or uid), title,
         f"pod fsGroup {spec.get('securityContext', {}).get('fsGroup')} != image group {gid}")
    need("command" not in c and "args" not in c, title,
         "the sidekey container overrides the image's entrypoint/command")
    ports = sorted(f"{p['containerPort']}/{p.get('protocol', 'TCP').lower()}" for p in c.get("ports") or [])
    need(ports == got["expose"], title, f"container ports {ports} != image EXPOSE {got['expose']}")
    with open(toml_path, "rb") as f:
        server = tomllib.load(f).get("server", {})
    listen = [server.get("listen", "127.0.0.1:8181"), server.get("admin_listen", "127.0.0.1:9191")]
    cfg_ports = sorted(f"{a.rsplit(':', 1)[1]}/tcp" for a in listen)
    need(cfg_ports == got["expose"], title, f"{toml_path} listens on {cfg_ports}, image EXPOSEs {got['expose']}")
    config_path = config_arg(got["cmd"])
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts") or []}
    config_dir, config_file = os.path.split(config_path)
    need(config_dir in mounts and "subPath" not in mounts[config_dir], title,
         f"no volumeMount (without subPath) at {config_dir}: the image reads {config_path}")
    volume = next((v for v in spec.get("volumes") or [] if v["name"] == mounts[config_dir]["name"]), {})
    cm_name = (volume.get("configMap") or {}).get("name")
    with open(os.path.join(os.path.dirname(deployment), "kustomization.yaml")) as f:
        kustomization = yaml.safe_load(f)
    generated = {}
    for g in kustomization.get("configMapGenerator") or []:
        for entry in g.get("files") or []:
            key, _, path = entry.partition("=")
            generated[(g["name"], key if path else os.path.basename(entry))] = path or entry
    source = generated.get((cm_name, config_file))
    need(source is not None, title,
         f"ConfigMap {cm_name} mounted at {config_dir} has no key {config_file} (the image reads {config_path})")
    need(os.path.normpath(os.path.join(os.path.dirname(deployment), source)) == os.path.normpath(toml_path),
         title, f"ConfigMap {cm_name} key {config_file} comes from {source}, not {toml_path}")
    ok(title, f"uid/gid/fsGroup {got['user']}, ports {', '.join(ports)} = {toml_path} listeners, "
              f"{config_path} = ConfigMap {cm_name} key {config_file} from {toml_path}")


def config_arg(cmd):
    if "--config" in cmd and cmd.index("--config") + 1 < len(cmd):
        return cmd[cmd.index("--config") + 1]
    raise Failed(f"image CMD {cmd} has no --config <path>")


# ---------------------------------------------------------------------------------------------
# Fakes: Cloud.ru IAM (../shared/cloudru-iam.md) and an OpenAI-format upstream
# ---------------------------------------------------------------------------------------------
class Fakes:
    def __init__(self):
        self.lock = threading.Lock()
        self.credentials = {}  # keyId -> secret the IAM accepts
        self.iam_key_ids = []  # keyId of every token request, in order
        self.tokens = {}  # access_token -> keyId it was issued for
        self.seen = []  # (path, Authorization) of every upstream request
        self.servers = []

    def start(self):
        fakes = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def body(self):
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if size == 0:
                            return data
                        data += chunk
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def reply(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Iam(Handler):
            def do_POST(self):
                try:
                    req = json.loads(self.body())
                except ValueError:
                    return self.reply(400, {"error": "invalid_request"})
                key_id, secret = req.get("keyId"), req.get("secret")
                with fakes.lock:
                    fakes.iam_key_ids.append(key_id)
                    accepted = (self.path == "/api/v1/auth/token" and key_id is not None
                                and fakes.credentials.get(key_id) == secret)
                    if accepted:
                        token = f"smoke-token-{len(fakes.tokens) + 1}-{secrets.token_hex(8)}"
                        fakes.tokens[token] = key_id
                if not accepted:
                    return self.reply(401, {"error": "invalid_credentials"})
                self.reply(200, {"access_token": token, "id_token": "", "refresh_token": "",
                                 "expires_in": 3600, "refresh_expires_in": 0,
                                 "token_type": "Bearer", "not_before": 0})

        class Upstream(Handler):
            def do_POST(self):
                raw = self.body()
                with fakes.lock:
                    fakes.seen.append((self.path, self.headers.get("Authorization")))
                if self.path != "/v1/chat/completions":
                    return self.reply(404, {"error": {"message": f"no {self.path}"}})
                req = json.loads(raw)
                if not req.get("stream"):
                    return self.reply(200, {
                        "id": "chatcmpl-smoke", "object": "chat.completion", "created": 0,
                        "model": req["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": "pong"}}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
                # A slow stream ("smoke/slow") outlives a SIGTERM sent after its first chunk.
                count, delay = (SLOW_CHUNKS, SLOW_DELAY) if req["model"] == "smoke/slow" else (3, 0.0)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i in range(count + 1):
                    if i < count:
                        chunk = {"id": "chatcmpl-smoke", "object": "chat.completion.chunk",
                                 "created": 0, "model": req["model"],
                                 "choices": [{"index": 0, "delta": {"content": f"t{i} "},
                                              "finish_reason": None}]}
                        event = f"data: {json.dumps(chunk)}\n\n"
                    else:
                        event = "data: [DONE]\n\n"
                    data = event.encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                    if i < count:
                        time.sleep(delay)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

        ports = []
        for handler in (Iam, Upstream):
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self.servers.append(server)
            ports.append(server.server_address[1])
        return ports

    def stop(self):
        for s in self.servers:
            s.shutdown()
            s.server_close()

    def key_id_of(self, auth):
        """The keyId whose token is in this Authorization header, or None."""
        with self.lock:
            if auth and auth.startswith("Bearer "):
                return self.tokens.get(auth[len("Bearer "):])
        return None


# ---------------------------------------------------------------------------------------------
# The credential volume, written the way the kubelet's atomic writer does
# ---------------------------------------------------------------------------------------------
class SecretVolume:
    """<root>/..<timestamp>/<files>, <root>/..data -> ..<timestamp>, and <root>/<top> ->
    ..data/<top>. An update writes a new timestamped directory and renames a new ..data symlink
    over the old one, so a reader sees either all old or all new files. Files are 0440 and
    directories 0750, owned root:65532, as a projected volume with defaultMode 0400 and fsGroup
    65532 is: sidekey reads them through its group only."""

    def __init__(self, root, gid):
        self.root, self.gid, self.n = root, gid, 0
        os.makedirs(root)
        os.chown(root, 0, gid)
        os.chmod(root, 0o750)

    def write(self, files):
        self.n += 1
        ts = f"..smoke_{time.strftime('%Y_%m_%d_%H_%M_%S')}.{self.n}"
        for rel, content in files.items():
            path = os.path.join(self.root, ts, rel)
            for d in (os.path.join(self.root, ts), os.path.dirname(path)):
                os.makedirs(d, mode=0o750, exist_ok=True)
                os.chown(d, 0, self.gid)
                os.chmod(d, 0o750)
            with open(path, "w") as f:
                f.write(content + "\n")
            os.chown(path, 0, self.gid)
            os.chmod(path, 0o440)
        old = os.readlink(os.path.join(self.root, "..data")) if self.n > 1 else None
        tmp = os.path.join(self.root, "..data_tmp")
        os.symlink(ts, tmp)
        os.rename(tmp, os.path.join(self.root, "..data"))
        for top in {rel.split("/", 1)[0] for rel in files}:
            link = os.path.join(self.root, top)
            if not os.path.islink(link):
                os.symlink(os.path.join("..data", top), link)
        if old:
            shutil.rmtree(os.path.join(self.root, old))


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_toml(text, changes):
    """Sets `key = value` (value: a TOML literal) in `[section]` of a TOML text, keeping every
    comment; then proves with tomllib that exactly these keys changed."""
    lines = text.splitlines(keepends=True)
    for (section, key), literal in changes.items():
        header = next((i for i, l in enumerate(lines) if l.strip() == f"[{section}]"), None)
        if header is None:
            lines += [f"\n[{section}]\n"]
            header = len(lines) - 1
        end = next((i for i in range(header + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
        line = f"{key} = {literal}\n"
        for i in range(header + 1, end):
            if re.match(rf"\s*{re.escape(key)}\s*=", lines[i]):
                lines[i] = line
                break
        else:
            lines.insert(header + 1, line)
    new = "".join(lines)
    want = copy.deepcopy(tomllib.loads(text))
    for (section, key), literal in changes.items():
        want.setdefault(section, {})[key] = tomllib.loads(f"v = {literal}")["v"]
    need(tomllib.loads(new) == want, "test config", "editing the shipped config changed more than intended")
    return new


def http_get(port, path, timeout=5.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def chat(port, model, stream, timeout=10.0, on_chunk=None):
    """A chat completion through the proxy as an OpenAI SDK sends it (any API key). Returns
    (status, parsed JSON or the list of SSE data payloads)."""
    body = json.dumps({"model": model, "stream": stream,
                       "messages": [{"role": "user", "content": "ping"}]})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Content-Type": "application/json", "Authorization": "Bearer unused"})
        resp = conn.getresponse()
        if not stream or resp.status != 200:
            raw = resp.read()
            try:
                return resp.status, json.loads(raw)
            except ValueError:
                return resp.status, raw.decode(errors="replace")
        events = []
        while True:
            line = resp.readline()
            if not line:
                return resp.status, events
            line = line.decode().rstrip("\r\n")
            if line.startswith("data: "):
                events.append(line[len("data: "):])
                if on_chunk:
                    on_chunk(len(events))
                if events[-1] == "[DONE]":
                    resp.read()
                    return resp.status, events
    finally:
        conn.close()


def wait_for(what, timeout, probe, interval=0.05):
    """Calls probe() until it returns a true value; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value:
                return value
        except (OSError, http.client.HTTPException) as e:
            last = e
        time.sleep(interval)
    raise Failed(f"{what}: not within {timeout:g}s" + (f" (last error: {last})" if last else ""))


class Run:
    def __init__(self, a):
        self.a = a
        self.podman = a.podman
        self.fakes = Fakes()
        self.started = False
        self.redact = []

    def engine(self, *args, timeout=60, check=True):
        try:
            p = subprocess.run([*self.podman, *args], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Failed(f"podman {args[0]}: no answer within {timeout}s")
        if check and p.returncode != 0:
            err = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise Failed(f"podman {args[0]} exited {p.returncode}: {err}")
        return p

    def state(self):
        p = self.engine("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", self.a.name, check=False)
        return p.stdout.strip() if p.returncode == 0 else "gone"

    def logs(self):
        p = self.engine("logs", self.a.name, check=False)
        out = p.stdout + p.stderr
        for s in self.redact:
            out = out.replace(s, "<redacted>")
        return out

    def main(self):
        a = self.a
        spec, self.container = sidekey_container(a.deployment)
        grace = spec.get("terminationGracePeriodSeconds", 30)
        memory = ((self.container.get("resources") or {}).get("limits") or {}).get("memory")
        inspect = json.loads(self.engine("image", "inspect", a.image).stdout)[0]["Config"]
        self.check_version(inspect)
        self.prepare(config_arg(inspect["Cmd"]))
        to_ready = self.start(memory)
        self.check_process(memory)
        self.check_requests()
        self.check_rotation()
        self.check_shutdown(grace)
        self.check_logs()
        print(f"image size: {a.image_size / 1e6:.1f} MB ({a.image_size} bytes); "
              f"time from podman run to ready: {to_ready * 1000:.0f} ms", flush=True)

    def check_version(self, inspect):
        """The binary starts in the image at all, and the engine can run a container here."""
        p = self.engine("run", "--rm", "--pull", "never", "--network", "none", self.a.image, "--version",
                        check=False)
        if p.returncode != 0:
            err = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise Failed(f"the container engine cannot run the image on this machine (podman run "
                         f"exited {p.returncode}): {err}")
        label = (inspect.get("Labels") or {}).get("org.opencontainers.image.version")
        need(p.stdout.strip() == f"sidekey {label}", "image runs",
             f"`sidekey --version` in the image printed {p.stdout.strip()!r}, the version label is {label!r}")
        ok("image runs", f"`{self.a.image} --version` -> {p.stdout.strip()} (= its version label)")

    def prepare(self, config_path):
        """Fakes, ports, the test config and the credential volume."""
        a = self.a
        iam_port, upstream_port = self.fakes.start()
        self.proxy_port, self.admin_port = free_port(), free_port()
        with open(a.config) as f:
            shipped = f.read()
        cfg = set_toml(shipped, {
            ("server", "listen"): f'"127.0.0.1:{self.proxy_port}"',
            ("server", "admin_listen"): f'"127.0.0.1:{self.admin_port}"',
            ("upstream", "base_url"): f'"http://127.0.0.1:{upstream_port}/v1"',
            ("auth", "token_url"): f'"http://127.0.0.1:{iam_port}/api/v1/auth/token"',
            ("auth", "credential_poll_secs"): "1",
        })
        # A ConfigMap volume: 0644 files (the default mode), mounted read-only.
        self.config_mount = (os.path.join(a.work, "config"), os.path.dirname(config_path))
        conf_file = os.path.join(self.config_mount[0], os.path.basename(config_path))
        os.makedirs(self.config_mount[0])
        with open(conf_file, "w") as f:
            f.write(cfg)
        os.chmod(self.config_mount[0], 0o755)
        os.chmod(conf_file, 0o644)

        creds = tomllib.loads(cfg)["auth"]["credentials"]
        files = [cr.get(k) for cr in creds for k in ("key_id_file", "secret_file")]
        need(all(files), "test config", f"every credential in {a.config} must come from key_id_file and secret_file")
        # Mounted where the manifest mounts the credential volume, as a directory (never subPath).
        roots = [m["mountPath"] for m in self.container.get("volumeMounts") or []
                 if all(p.startswith(m["mountPath"].rstrip("/") + "/") for p in files)]
        need(roots, "test config", f"no volumeMount of the sidekey container holds all of {files}")
        self.secret_root = roots[0]
        self.values = {}
        self.primary_files = [os.path.relpath(creds[0][k], self.secret_root) for k in ("key_id_file", "secret_file")]
        for cr in creds:
            rel = [os.path.relpath(cr[k], self.secret_root) for k in ("key_id_file", "secret_file")]
            self.values.update(zip(rel, self.new_credential(cr["name"])))
        self.primary = self.values[self.primary_files[0]]
        self.volume = SecretVolume(os.path.join(a.work, "secrets"), IMAGE_UID)
        self.volume.write(self.values)
        ok("test config", f"{a.config} with server.listen 127.0.0.1:{self.proxy_port}, admin_listen "
                          f"127.0.0.1:{self.admin_port}, upstream.base_url and auth.token_url on the fakes "
                          f"(:{upstream_port}, :{iam_port}), auth.credential_poll_secs 1; "
                          f"{len(files)} credential files 0440 root:{IMAGE_UID} under {self.secret_root}")

    def new_credential(self, name):
        """A random key id and secret that the fake IAM accepts; never printed."""
        key_id, secret = f"smoke-{name}-{secrets.token_hex(6)}", secrets.token_urlsafe(24)
        with self.fakes.lock:
            self.fakes.credentials[key_id] = secret
        self.redact += [key_id, secret]
        return key_id, secret

    def start(self, memory):
        """Runs the container as the manifests do; returns the seconds from `podman run` to ready."""
        a = self.a
        run = ["run", "-d", "--name", a.name, "--pull", "never",
               # The fakes are on the host's loopback; in a pod, sidekey and the app share the
               # pod's loopback the same way.
               "--network", "host",
               "--user", f"{IMAGE_UID}:{IMAGE_UID}",
               # readOnlyRootFilesystem: true. Kubernetes mounts no tmpfs anywhere; podman's
               # --read-only would add /tmp, /var/tmp and /run unless told not to.
               "--read-only", "--read-only-tmpfs=false",
               # The kubelet adds no /etc/passwd entry for runAsUser; podman would bind-mount one.
               "--passwd=false",
               "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
        if memory:
            run += ["--memory", memory.replace("Mi", "m").replace("Gi", "g")]
        run += ["-v", "{}:{}:ro".format(*self.config_mount),
                "-v", f"{self.volume.root}:{self.secret_root}:ro", a.image]
        t_run = time.monotonic()
        self.started = True
        self.engine(*run)
        t_started = time.monotonic()
        last_check = [t_started]

        def ready():
            if time.monotonic() - last_check[0] > 1:
                last_check[0] = time.monotonic()
                st = self.state()
                need(st.startswith("running"), "/readyz 200", f"container is {st}, not running")
            return http_get(self.admin_port, "/readyz", timeout=2)[0] == 200

        wait_for("/readyz 200", 60, ready)
        to_ready = time.monotonic() - t_run
        ok("/readyz 200", f"{to_ready * 1000:.0f} ms after `podman run` (which itself returned after "
                          f"{(t_started - t_run) * 1000:.0f} ms)")
        status, body = http_get(self.admin_port, "/healthz")
        need(status == 200, "/healthz", f"status {status}: {body.strip()}")
        return to_ready

    def last_upstream_key_id(self, title):
        """The keyId whose token the upstream saw on the last request; fails on anything else."""
        with self.fakes.lock:
            path, auth = self.fakes.seen[-1] if self.fakes.seen else (None, None)
        need(path == "/v1/chat/completions", title, f"upstream saw {path}")
        key_id = self.fakes.key_id_of(auth)
        need(key_id is not None, title, "upstream saw an Authorization header that is no token of the fake IAM")
        return key_id

    def check_requests(self):
        """A chat completion and a streamed one with the IAM's token injected, then /metrics."""
        title = "chat completion"
        status, body = chat(self.proxy_port, "GigaChat/GigaChat-2-Max", stream=False)
        need(status == 200 and isinstance(body, dict) and body["choices"][0]["message"]["content"] == "pong",
             title, f"status {status}, body {str(body)[:200]}")
        need(self.last_upstream_key_id(title) == self.primary, title, "upstream saw a token issued for another credential")
        ok(title, "200 through the proxy port; upstream got the fake IAM's token for the primary, not the client's key")

        title = "streamed chat completion"
        status, events = chat(self.proxy_port, "GigaChat/GigaChat-2-Max", stream=True)
        need(status == 200 and isinstance(events, list) and len(events) == 4 and events[-1] == "[DONE]",
             title, f"status {status}, events {str(events)[:200]}")
        need(self.last_upstream_key_id(title) == self.primary, title, "upstream saw a token issued for another credential")
        ok(title, f"{len(events) - 1} chunks + [DONE], with the IAM's token")

        status, text = http_get(self.admin_port, "/metrics")
        need(status == 200, "/metrics", f"status {status}")

        def counter(name, label):
            return sum(int(v) for v in re.findall(rf'^{name}\{{[^}}]*{label}[^}}]*\}} (\d+)$', text, re.M))

        refreshes = counter("sidekey_token_refresh_total", 'credential="primary",result="success"')
        requests = counter("sidekey_requests_total", 'code="200"')
        need(refreshes >= 1, "/metrics", "no successful token refresh of the primary counted")
        need(requests == 2, "/metrics", f"{requests} proxied requests with code 200 counted, 2 made")
        ok("/metrics", f"{len(text.splitlines())} lines; {refreshes} successful refresh(es), "
                       f"{requests} proxied 200s counted")

    def check_rotation(self):
        """A new key id and secret for the primary, swapped in as the kubelet updates a Secret."""
        rotated = self.new_credential("rotated")
        self.values.update(zip(self.primary_files, rotated))
        t0 = time.monotonic()
        self.volume.write(self.values)

        def issued():
            with self.fakes.lock:
                return rotated[0] in self.fakes.tokens.values()

        wait_for("the fake IAM issues a token for the rotated credential", 30, issued, interval=0.1)
        t_iam = time.monotonic() - t0

        def used():
            status, _ = chat(self.proxy_port, "GigaChat/GigaChat-2-Max", stream=False)
            return status == 200 and self.last_upstream_key_id("credential rotation") == rotated[0]

        wait_for("upstream gets the token of the rotated credential", 10, used, interval=0.2)
        ok("credential rotation", f"..data swapped; the fake IAM got the new keyId after {t_iam:.1f}s "
                                  "and the upstream its token; no restart")

    def check_process(self, memory):
        title = "container process as the manifests run it"
        pid = self.engine("inspect", "--format", "{{.State.Pid}}", self.a.name).stdout.strip()
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
        ids = f"{IMAGE_UID}\t{IMAGE_UID}\t{IMAGE_UID}\t{IMAGE_UID}"
        need(status["Uid"] == ids and status["Gid"] == ids, title,
             f"uid {status['Uid'].split()} gid {status['Gid'].split()}, want {IMAGE_UID}")
        # Kubernetes adds fsGroup (65532 in the manifests) as a supplementary group; nothing else.
        need(set(status.get("Groups", "").split()) <= {str(IMAGE_UID)}, title,
             f"supplementary groups {status['Groups']}")
        need(status["NSpid"].split()[-1] == "1", title, "sidekey is not PID 1 in its namespace")
        for cap in ("CapEff", "CapPrm", "CapBnd"):
            need(int(status[cap], 16) == 0, title, f"{cap} {status[cap]}")
        need(status["NoNewPrivs"].strip() == "1", title, "no_new_privs is not set")
        need(status["Seccomp"].strip() == "2", title, "no seccomp filter (RuntimeDefault)")
        with open(f"/proc/{pid}/mountinfo") as f:
            mounts = [line.split() for line in f]
        root = [m for m in mounts if m[4] == "/"]
        need(root and "ro" in root[-1][5].split(","), title, "the root filesystem is not read-only")
        writable = [m[4] for m in mounts if "rw" in m[5].split(",") and m[4] not in ("/dev", "/dev/shm", "/dev/mqueue")
                    and not m[4].startswith(("/proc", "/sys", "/dev/pts"))]
        need(not writable, title, f"writable mounts: {writable}")
        ok(title, f"uid/gid {IMAGE_UID}, PID 1, no capabilities, no_new_privs, seccomp filter, "
                  f"read-only root with no writable mount{', memory limit ' + memory if memory else ''}; "
                  f"RSS {status['VmRSS'].split()[0]} kB")

    def check_shutdown(self, grace):
        proxy_port, admin_port = self.proxy_port, self.admin_port
        title = "podman stop (SIGTERM) while a stream is in flight"
        chunks = threading.Event()
        result = {}

        def stream():
            try:
                result["r"] = chat(proxy_port, "smoke/slow", stream=True, timeout=15,
                                   on_chunk=lambda n: chunks.set())
            except Exception as e:  # reported below
                result["e"] = e
            result["t"] = time.monotonic()

        t = threading.Thread(target=stream, daemon=True)
        t.start()
        need(chunks.wait(10), title, "the slow stream sent no first chunk within 10s")
        t_stop = time.monotonic()
        stop = subprocess.Popen([*self.podman, "stop", "-t", str(grace), self.a.name],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for("/readyz 503 while draining", 5, lambda: http_get(admin_port, "/readyz", timeout=1)[0] == 503)
        need("r" not in result and "e" not in result, title,
             "the stream was over before /readyz said 503; the check proved nothing")
        ok("/readyz 503 while draining", "the stream still in flight")
        t.join(grace + 10)
        need(not t.is_alive(), title, "the stream did not finish")
        need("e" not in result, title, f"the stream failed: {result.get('e')!r}")
        status, events = result["r"]
        need(status == 200 and len(events) == SLOW_CHUNKS + 1 and events[-1] == "[DONE]", title,
             f"the stream was cut: status {status}, {len(events)} of {SLOW_CHUNKS + 1} events")
        try:
            _, err = stop.communicate(timeout=grace + 15)
        except subprocess.TimeoutExpired:
            stop.kill()
            raise Failed(f"{title}: podman stop did not return within {grace + 15}s")
        elapsed = time.monotonic() - t_stop
        need(stop.returncode == 0, title, f"podman stop exited {stop.returncode}: {err.strip()}")
        st = self.state()
        need(st == "exited 0", title, f"container {st} (137 would be SIGKILL after the grace period, 143 an unhandled SIGTERM)")
        need(elapsed < grace, title, f"took {elapsed:.1f}s, the grace period is {grace}s")
        ok(title, f"the stream completed ({len(events) - 1} chunks + [DONE], "
                  f"{result['t'] - t_stop:.1f}s after SIGTERM); exit 0 after {elapsed:.1f}s "
                  f"(terminationGracePeriodSeconds {grace})")

    def check_logs(self):
        title = "container logs"
        p = self.engine("logs", self.a.name)
        out = p.stdout + p.stderr
        lines = [l for l in out.splitlines() if l.strip()]
        need(lines, title, "sidekey logged nothing")
        leaked = [s for s in self.redact + list(self.fakes.tokens) if s in out]
        need(not leaked, title, f"{len(leaked)} credential or token value(s) appear in the log")
        for l in lines:
            try:
                json.loads(l)
            except ValueError:
                raise Failed(f"{title}: a line is not JSON (log.format = \"json\"): {l[:120]}")
        need("readable by every user" not in out, title, "sidekey warned that the 0440 files are world-readable")
        ok(title, f"{len(lines)} JSON lines, no key id, secret or token in them, no file-mode warning")

    def cleanup(self):
        if self.started:
            self.engine("rm", "-f", "-t", "0", self.a.name, check=False)
        self.fakes.stop()


def run(a):
    r = Run(a)
    # SIGTERM (e.g. a CI timeout) must still remove the container and stop the fakes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        r.main()
    except Failed as e:
        print(f"FAIL {e}", flush=True)
        if r.started:
            logs = r.logs().strip().splitlines()
            if logs:
                print("container log (last 20 lines, credentials redacted):")
                for line in logs[-20:]:
                    print(f"    {line}")
        sys.exit(1)
    finally:
        r.cleanup()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("containerfile")
    c.add_argument("dockerfile")
    c.add_argument("context")
    c.add_argument("facts_out")
    c = sub.add_parser("check-image")
    c.add_argument("facts")
    c.add_argument("inspect")
    c.add_argument("deployment")
    c.add_argument("toml")
    c = sub.add_parser("run")
    for flag in ("--image", "--name", "--work", "--config", "--deployment"):
        c.add_argument(flag, required=True)
    c.add_argument("--image-size", type=int, required=True)
    c.add_argument("podman", nargs=argparse.REMAINDER, help="-- then the podman command line")
    a = p.parse_args()
    try:
        if a.cmd == "containerfile":
            containerfile(a.dockerfile, a.context, a.facts_out)
        elif a.cmd == "check-image":
            check_image(a.facts, a.inspect, a.deployment, a.toml)
        else:
            if a.podman[:1] == ["--"]:
                a.podman = a.podman[1:]
            need(a.podman, "run", "no podman command after --")
            run(a)
    except Failed as e:
        print(f"FAIL {e}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
