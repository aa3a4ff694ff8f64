#!/usr/bin/env bash
# Builds sidekey's runtime image and runs it under a real container engine (podman with runc),
# the way the Kubernetes manifests run it, against a fake IAM and a fake upstream on the host.
#
#   bash deploy/image/smoke.sh          # from anywhere; root (rootful podman); 2-4 min, mostly
#                                       # the release build
#
# The image is the Dockerfile's runtime stage rebuilt FROM scratch, because no registry (and so
# no rust or distroless base image) is reachable from our machines: the release binary built as
# the Dockerfile builds it, plus exactly the shared libraries `ldd` lists for it (the dynamic
# loader included); no shell, no package manager. Every other instruction of the runtime stage
# (ARG, LABEL, USER, EXPOSE, ENTRYPOINT, CMD) is copied verbatim, and any instruction this script
# cannot mirror fails it. The built image's user, entrypoint, command, ports and labels are then
# compared with the Dockerfile and with the manifests (deploy/image/smoke.py, `check-image`).
#
# The run (smoke.py `run`) uses the manifests' security context: --user 65532:65532, a read-only
# root filesystem with no tmpfs anywhere, all capabilities dropped, no-new-privileges, the memory
# limit; deploy/base/sidekey.toml with its addresses pointed at the fakes, mounted read-only at
# the directory of the image's --config path; the credential files as the kubelet projects a
# Secret with fsGroup 65532 (0440 root:65532, behind a ..data symlink), mounted read-only. It
# checks readiness, a chat completion and a streamed one carrying the fake IAM's token, /metrics,
# a credential rotation by the kubelet's atomic ..data swap, and `podman stop` (SIGTERM) while a
# stream is in flight: the stream completes and the container exits 0 within the grace period.
#
# It prints the image size and the time from `podman run` to the first 200 from /readyz.
# Installs what it needs if missing: podman, buildah, runc (Debian), PyYAML (PyPI). Leaves
# nothing behind: images and containers live in a private store under a temporary directory.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
START=$SECONDS
HERE=deploy/image

say() { printf 'smoke: %s\n' "$*"; }
die() {
  printf 'smoke: FAIL %s\n' "$*" >&2
  exit 1
}

if [ "$(id -u)" -ne 0 ]; then
  die "run as root (sudo bash $HERE/smoke.sh): rootful podman, and the credential files are chowned to gid 65532 as the kubelet does"
fi

# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  die "python3 >= 3.11 is required (tomllib)"
fi
missing=()
for tool in podman buildah runc; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "setup: installing ${missing[*]} (Debian)"
  apt-get update -qq || die "apt-get update failed; install ${missing[*]} by hand"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
    die "apt-get install ${missing[*]} failed; install them by hand"
fi
if ! python3 -c 'import yaml' 2>/dev/null; then
  say "setup: installing PyYAML (PyPI), to read deploy/base/deployment.yaml"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore PyYAML
fi
say "tools: $(podman --version), $(buildah --version | cut -d' ' -f1-3), $(runc --version | head -1)"

WORK=$(mktemp -d /tmp/sidekey-smoke.XXXXXX)
NAME=sidekey-smoke-$$
IMAGE=localhost/sidekey:smoke

# ---------------------------------------------------------------------------------------------
# The engine flags, all in one place. None of them is needed by a user's Docker or Podman;
# a plain `docker build` / `docker run` of the Dockerfile takes none of them.
#   --root/--runroot/--tmpdir  a private store under $WORK: the check never touches the machine's
#                              images or containers, and removing $WORK removes everything.
#   --storage-driver vfs       plain directory copies, no overlay mounts (overlayfs is not
#                              available in every sandbox); the image is one ~10 MB layer.
#   --isolation chroot         buildah runs no OCI runtime for the build (nothing is RUN anyway).
#   default_ulimits = []       podman sets RLIMIT_NOFILE for the container by default, which our
#                              sandbox forbids ("error setting rlimit type 7"); the container
#                              inherits the engine's limits instead.
#   --runtime runc             the runtime Debian's podman gets here (no crun).
#   --cgroup-manager cgroupfs  no systemd on the machine to ask for cgroups.
# ---------------------------------------------------------------------------------------------
printf '[containers]\ndefault_ulimits = []\n' >"$WORK/containers.conf"
STORE=(--root "$WORK/store" --runroot "$WORK/run" --storage-driver vfs)
BUILDAH=(buildah "${STORE[@]}")
BUILD_FLAGS=(--isolation chroot)
PODMAN=(env "CONTAINERS_CONF=$WORK/containers.conf" podman "${STORE[@]}" --tmpdir "$WORK/libpod"
  --runtime runc --cgroup-manager cgroupfs)

cleanup() {
  local rc=$?
  "${PODMAN[@]}" rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
  "${PODMAN[@]}" rm -f -a >/dev/null 2>&1 || true
  "${PODMAN[@]}" rmi -a -f >/dev/null 2>&1 || true
  rm -rf "$WORK" 2>/dev/null || say "warning: could not remove $WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
# The release binary, built as the Dockerfile's build stage builds it.
# ---------------------------------------------------------------------------------------------
# SMOKE_PROFILE picks another cargo profile: CI uses `ci-image` (the release profile without
# thin LTO and with parallel codegen, see Cargo.toml), which builds in a third of the time and
# packages and behaves the same; the default is the Dockerfile's `release`.
profile=${SMOKE_PROFILE:-release}
say "cargo build --profile $profile --locked (the Dockerfile's build stage uses release)"
t0=$SECONDS
cargo build --profile "$profile" --locked --quiet
BIN=target/$profile/sidekey
version=$("$BIN" --version)
case $version in
  "sidekey "*) ;;
  *) die "$BIN --version printed '$version', not 'sidekey <version>'" ;;
esac
say "built $version in $((SECONDS - t0))s"

# ---------------------------------------------------------------------------------------------
# The runtime image: FROM scratch, the binary, the libraries ldd lists.
# ---------------------------------------------------------------------------------------------
CTX=$WORK/context
mkdir -p "$CTX/rootfs"
python3 "$HERE/smoke.py" containerfile Dockerfile "$CTX" "$WORK/facts.json"
DEST=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["binary"])' <"$WORK/facts.json")
install -D -m 0755 "$BIN" "$CTX/rootfs$DEST"

libs=()
while IFS= read -r line; do
  line=${line#"${line%%[![:space:]]*}"}
  case $line in
    *"not found"*) die "ldd $BIN: $line" ;;
    *" => /"*) found=${line#*=> } ;;
    /*) found=$line ;;
    *) continue ;; # linux-vdso.so.1: provided by the kernel, no file
  esac
  found=${found%% (*}
  # The loader goes where the binary's PT_INTERP names it; libraries where ldd found them.
  name=${line%% *}
  case $name in /*) path=$name ;; *) path=$found ;; esac
  mkdir -p "$CTX/rootfs$(dirname "$path")"
  cp -L "$found" "$CTX/rootfs$path"
  libs+=("$path")
done < <(ldd "$BIN")
if [ "${#libs[@]}" -eq 0 ]; then
  die "ldd listed no shared libraries for $BIN (a static binary needs no smoke image of this kind)"
fi
mb() { awk -v b="$1" 'BEGIN { printf "%.1f MB", b / 1e6 }'; }
say "image contents: $DEST ($(mb "$(stat -c %s "$BIN")")) + ${libs[*]} ($(mb "$(cat "${libs[@]}" | wc -c)"))"

t0=$SECONDS
if ! "${BUILDAH[@]}" bud "${BUILD_FLAGS[@]}" --identity-label=false --pull=never --quiet \
  -t "$IMAGE" -f "$CTX/Containerfile" "$CTX" >"$WORK/build.log" 2>&1; then
  cat "$WORK/build.log" >&2
  die "buildah bud failed (log above)"
fi
SIZE=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE")
say "built $IMAGE with buildah in $((SECONDS - t0))s: $(mb "$SIZE") ($SIZE bytes)"

"${PODMAN[@]}" image inspect "$IMAGE" >"$WORK/inspect.json"
python3 "$HERE/smoke.py" check-image "$WORK/facts.json" "$WORK/inspect.json" \
  deploy/base/deployment.yaml deploy/base/sidekey.toml

# ---------------------------------------------------------------------------------------------
# Run it as the manifests do, against the fakes (smoke.py starts and stops them).
# ---------------------------------------------------------------------------------------------
python3 "$HERE/smoke.py" run --image "$IMAGE" --name "$NAME" --work "$WORK" \
  --config deploy/base/sidekey.toml --deployment deploy/base/deployment.yaml \
  --image-size "$SIZE" -- "${PODMAN[@]}"

say "PASS in $((SECONDS - START))s"
