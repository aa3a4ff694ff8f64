#!/usr/bin/env bash
# Checks what can be checked of the promise that sidekey builds with its `rust-version`
# (Cargo.toml), the compiler the Dockerfile's build stage pins, on a machine that has one newer
# toolchain and can fetch no other:
#   1. the Dockerfile's `FROM rust:<version>` is Cargo.toml's rust-version;
#   2. Cargo.lock's format is one that version's cargo reads;
#   3. every package the image build compiles (normal and build dependencies, resolved for
#      x86_64-unknown-linux-gnu) declares a rust-version no newer than ours, or none at all;
#      dev-dependencies only (tests, benches) are listed but do not fail the check: the image
#      and `cargo build` never compile them;
#   4. clippy's `incompatible_msrv` lint, which flags standard-library APIs stabilised after
#      the rust-version and which the clippy step of .ci/run turns into an error with
#      -D warnings, is on with this toolchain: a canary crate that uses a newer API must fail.
# Not covered: language features and syntax newer than rust-version (trait upcasting, say),
# compiler behaviour and lint differences, and dependencies that declare no rust-version.
# Only a build with that toolchain (`docker build` of the Dockerfile) settles those.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

cargo metadata --format-version 1 --locked --filter-platform x86_64-unknown-linux-gnu >"$WORK/metadata.json"
python3 - "$WORK/metadata.json" <<'PY'
import json
import re
import sys
import tomllib


def version(s):
    parts = [int(p) for p in s.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


with open("Cargo.toml", "rb") as f:
    msrv = tomllib.load(f)["package"]["rust-version"]
errors = []

with open("Dockerfile") as f:
    pins = re.findall(r"^FROM\s+(?:docker\.io/(?:library/)?)?rust:(\d+\.\d+(?:\.\d+)?)\b", f.read(), re.M)
if pins != [msrv]:
    errors.append(f"Dockerfile pins rust:{', '.join(pins) or '(none)'}, Cargo.toml says rust-version {msrv}")
else:
    print(f"ok   Dockerfile FROM rust:{pins[0]} = Cargo.toml rust-version {msrv}")

with open("Cargo.lock", "rb") as f:
    lock_version = tomllib.load(f).get("version", 1)
# Cargo.lock v4 is read by cargo >= 1.78; v3 by >= 1.53.
readable = {3: "1.53", 4: "1.78"}
if lock_version not in readable or version(readable[lock_version]) > version(msrv):
    errors.append(f"Cargo.lock format v{lock_version} is not readable by cargo {msrv}")
else:
    print(f"ok   Cargo.lock format v{lock_version} (cargo >= {readable[lock_version]})")

with open(sys.argv[1]) as f:
    meta = json.load(f)
nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
packages = {p["id"]: p for p in meta["packages"]}
root = meta["resolve"]["root"]


def reachable(root_kinds):
    """Packages reached from the root through edges of root_kinds first, normal/build after."""
    seen, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        for dep in nodes[pid]["deps"]:
            kinds = {k["kind"] for k in dep["dep_kinds"]}
            if kinds & (root_kinds if pid == root else {None, "build"}):
                todo.append(dep["pkg"])
    return seen - {root}


built = reachable({None, "build"})
dev_only = reachable({None, "build", "dev"}) - built


def too_new(ids):
    return sorted(
        f"{packages[i]['name']} {packages[i]['version']} (rust-version {packages[i]['rust_version']})"
        for i in ids
        if packages[i].get("rust_version") and version(packages[i]["rust_version"]) > version(msrv)
    )


bad = too_new(built)
undeclared = sum(1 for i in built if not packages[i].get("rust_version"))
if bad:
    errors.append(f"dependencies the image build compiles need a newer rust than {msrv}: {', '.join(bad)}")
else:
    print(f"ok   {len(built)} packages the build compiles: none declares a rust-version above {msrv} "
          f"({undeclared} declare none, so are not checked)")
dev_bad = too_new(dev_only)
if dev_bad:
    print(f"note {len(dev_bad)} of {len(dev_only)} dev-only packages need a newer rust than {msrv}, so "
          f"`cargo test` needs that newer rust (the image build is not affected): {', '.join(dev_bad)}")
else:
    print(f"ok   {len(dev_only)} dev-only packages: none declares a rust-version above {msrv}")

for e in errors:
    print(f"FAIL {e}")
sys.exit(1 if errors else 0)
PY

# The canary: rust-version 1.85 and Vec::pop_if, stable since 1.86. Run with the same flags as
# the clippy step of .ci/run; it must be rejected by incompatible_msrv.
mkdir -p "$WORK/canary/src"
cat >"$WORK/canary/Cargo.toml" <<'TOML'
[package]
name = "msrv-canary"
version = "0.0.0"
edition = "2021"
rust-version = "1.85"
publish = false
TOML
printf 'fn main() {\n    let mut v = vec![1, 2];\n    let _ = v.pop_if(|x| *x > 1);\n}\n' >"$WORK/canary/src/main.rs"
if out=$(cd "$WORK/canary" && CARGO_TARGET_DIR="$WORK/canary/target" cargo clippy --quiet --offline -- -D warnings 2>&1); then
  echo "FAIL clippy accepted Vec::pop_if (1.86) under rust-version 1.85: incompatible_msrv is not on, so the clippy step does not check rust-version"
  exit 1
fi
if ! grep -q 'incompatible_msrv' <<<"$out"; then
  printf 'FAIL the canary failed for another reason than incompatible_msrv:\n%s\n' "$out"
  exit 1
fi
echo "ok   clippy's incompatible_msrv is on by default: the canary (Vec::pop_if under rust-version 1.85) is rejected, so the clippy step checks std APIs against rust-version"
