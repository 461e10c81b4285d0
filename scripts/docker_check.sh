#!/usr/bin/env bash
# Builds both images (Dockerfile, Dockerfile.cuda) with Podman, trains inside each container and
# checks the run's files on the host side: what CI runs after `make test` (docs/docker.md).
#
# Needs root and apt (Debian or Ubuntu); no Docker engine and no container registry: the base image
# is made here with mmdebstrap from Debian's own packages and passed as BASE_IMAGE. Installs podman,
# runc and mmdebstrap when missing. Idempotent: a second run reuses the images and Podman's layer
# cache; DOCKER_CHECK_FRESH=1 removes this script's images first and builds without the cache.
#
# Environment (all optional):
#   DOCKER_CHECK_DIR    work folder: logs, the smoke runs' output (default /var/tmp/genie-dg-docker-check)
#   DOCKER_CHECK_FRESH  1: start from nothing (remove this script's images, no layer cache)
#   DOCKER_CHECK_MIRROR Debian mirror for the base (default http://deb.debian.org/debian)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${DOCKER_CHECK_DIR:-/var/tmp/genie-dg-docker-check}
FRESH=${DOCKER_CHECK_FRESH:-0}
MIRROR=${DOCKER_CHECK_MIRROR:-http://deb.debian.org/debian}
# bookworm: its python3 is 3.11, the Python of the torch wheels that lie on this kind of machine.
SUITE=bookworm
BASE=localhost/genie-dg-base:$SUITE
CPU_IMAGE=localhost/genie-dg:cpu
CUDA_IMAGE=localhost/genie-dg:cuda
CONTAINER_PREFIX=genie-dg-check
# The host's CA bundle: on a machine whose HTTPS goes through a re-signing proxy, pip inside the
# build trusts only this one. It is mounted over the image's own bundle during RUN steps only.
HOST_CA=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
# A few seconds of training: 5 steps, one validation at the end on one batch per domain.
SMOKE_RUN=(trainer.max_steps=5 trainer.val_check_interval=5 dataset.eval_batch_size=64 +trainer.limit_val_batches=1)
NEED_FREE_GB=25

declare -a TIMINGS=()
START=$SECONDS

say() { printf '[docker-check] %s\n' "$*"; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

cleanup() {
    local name
    for name in seed train-cpu train-cuda; do
        if command -v podman >/dev/null 2>&1 && podman container exists "$CONTAINER_PREFIX-$name" 2>/dev/null; then
            podman rm -f "$CONTAINER_PREFIX-$name" >/dev/null 2>&1 || true
        fi
    done
    rm -rf "$WORK/wheels"
}

# start_step NAME FUNCTION: runs FUNCTION in the background, in a subshell with errexit on (inside
# `if` or `||` bash would ignore it), its output in $WORK/logs/NAME.log. finish_step NAME waits
# for it and records its time; on a failure it waits for the other running steps (no container
# is left behind), prints the end of the log and stops. Steps overlap where the 2 cores of a CI
# machine allow: the base with the wheel download, and the CPU image's training (a minute or two
# of torch.compile) with the CUDA image's build and training.
declare -A STEP_PID=() STEP_START=()
start_step() {
    local name=$1 function=$2
    say "$name ..."
    STEP_START[$name]=$SECONDS
    rm -f "$WORK/logs/$name.end"
    (
        set -euo pipefail
        "$function"
        echo "$SECONDS" >"$WORK/logs/$name.end"
    ) >"$WORK/logs/$name.log" 2>&1 &
    STEP_PID[$name]=$!
}
finish_step() {
    local name=$1 rc=0 other
    wait "${STEP_PID[$name]}" || rc=$?
    unset "STEP_PID[$name]"
    if [ "$rc" -ne 0 ]; then
        for other in "${!STEP_PID[@]}"; do wait "${STEP_PID[$other]}" || true; done
        tail -n 25 "$WORK/logs/$name.log" >&2
        die "step '$name' failed (exit $rc); full log: $WORK/logs/$name.log"
    fi
    local took=$(($(cat "$WORK/logs/$name.end") - STEP_START[$name]))
    TIMINGS+=("$name $took")
    say "$name done in $took s"
}
step() {
    start_step "$1" "$2"
    finish_step "$1"
}

image_exists() { podman image exists "$1"; }

torch_pins() {
    # The two pins of pyproject.toml, e.g. "torch==2.14.1 torchvision==0.29.1".
    python3 - "$ROOT/pyproject.toml" <<'EOF'
import re, sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
pins = [d.replace(" ", "") for d in deps if re.match(r"(torch|torchvision)\s*==", d)]
assert len(pins) == 2, f"pyproject.toml pins {pins}, expected torch== and torchvision=="
print(*pins)
EOF
}

preflight() {
    [ "$(id -u)" -eq 0 ] || die "run as root (rootful Podman; CI runs as root): sudo $0"
    command -v apt-get >/dev/null 2>&1 || die "needs apt-get (Debian or Ubuntu) to install podman, runc and mmdebstrap"
    command -v python3 >/dev/null 2>&1 || die "needs python3 (3.11+) on the host to read pyproject.toml"
    [ -f "$HOST_CA" ] || die "no CA bundle at $HOST_CA; set SSL_CERT_FILE to the host's bundle"
    mkdir -p "$WORK/logs"
    local storage=/var/lib/containers free_gb
    while [ ! -d "$storage" ]; do storage=$(dirname "$storage"); done
    free_gb=$(($(df --output=avail -k "$storage" | tail -n 1) / 1024 / 1024))
    [ "$free_gb" -ge "$NEED_FREE_GB" ] || die "only $free_gb GB free under $storage; the images need about $NEED_FREE_GB GB"
}

install_tools() {
    local missing=()
    command -v podman >/dev/null 2>&1 || missing+=(podman)
    command -v runc >/dev/null 2>&1 || missing+=(runc)
    command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
    if [ "${#missing[@]}" -eq 0 ]; then
        echo "podman, runc and mmdebstrap are installed"
        return
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

configure_podman() {
    # runc, not crun: crun fails on this VM's cgroup v1 layout. Root here lacks CAP_SYS_RESOURCE,
    # so Podman's default ulimits (nofile 1048576, nproc 4194304) cannot be set; the host's own
    # hard limits can (nproc capped at 32768: 49152 was refused here, 32768 accepted).
    local nofile nproc
    nofile=$(ulimit -Hn)
    nproc=$(ulimit -Hu)
    [ "$nofile" = unlimited ] && nofile=1048576
    if [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; then nproc=32768; fi
    cat >"$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
EOF
}

make_base() {
    if image_exists "$BASE"; then
        echo "$BASE exists"
        return
    fi
    # minbase plus what both Dockerfiles expect of a base: python (3.10+) with venv and headers
    # (inductor compiles against Python.h for optimizer.compiled=true). force-unsafe-io, as in
    # Docker's Debian images: a throwaway build root needs no fsync after every file.
    nice -n 10 mmdebstrap --variant=minbase \
        --include=ca-certificates,netbase,python3,python3-venv,python3-dev,python-is-python3 \
        --aptopt='Acquire::Languages "none"' \
        --dpkgopt=force-unsafe-io \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
        "$SUITE" - "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" \
        </dev/null | podman import --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' - "$BASE"
}

# torch and torchvision (about 6 GB with the CUDA libraries PyPI's wheels bring) go into the base
# once, in /opt/venv where both Dockerfiles make their venv: their own `pip install torch==...`
# then finds the pins satisfied, and the 6 GB layer is written once instead of once per image.
# The host's pip downloads the wheels (a machine of this kind takes them from its local disk);
# the container installs them with no network.
download_wheels() {
    if image_exists "$SEED"; then
        echo "$SEED exists"
        return
    fi
    rm -rf "$WORK/wheels"
    # shellcheck disable=SC2086  # PINS is two words
    nice -n 10 python3 -m pip download --quiet --dest "$WORK/wheels" --only-binary=:all: \
        --python-version 3.11 $PINS
}

seed_torch() {
    if image_exists "$SEED"; then
        echo "$SEED exists"
        return
    fi
    podman rm -f "$CONTAINER_PREFIX-seed" >/dev/null 2>&1 || true
    nice -n 10 podman run --name "$CONTAINER_PREFIX-seed" --network none -v "$WORK/wheels:/mnt:ro" "$BASE" \
        sh -c "python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /mnt $PINS"
    nice -n 10 podman commit --quiet "$CONTAINER_PREFIX-seed" "$SEED"
    podman rm "$CONTAINER_PREFIX-seed"
    rm -rf "$WORK/wheels"
}

build_image() { # DOCKERFILE TAG
    local cache=()
    [ "$FRESH" = 1 ] && cache=(--no-cache)
    # TORCH_INDEX_URL: PyPI, the index this machine reaches (PyTorch's own is not reachable).
    nice -n 10 podman build "${cache[@]}" --pull=never --network host \
        --build-arg "BASE_IMAGE=$SEED" --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
        --volume "$HOST_CA:/etc/ssl/certs/ca-certificates.crt:ro" \
        -f "$ROOT/$1" -t "$2" "$ROOT"
}
build_cpu() { build_image Dockerfile "$CPU_IMAGE"; }
build_cuda() { build_image Dockerfile.cuda "$CUDA_IMAGE"; }

train_in() { # IMAGE NAME EXTRA_OVERRIDE...
    local image=$1 name=$2
    shift 2
    rm -rf "$WORK/runs/$name"
    mkdir -p "$WORK/runs/$name" "$WORK/data"
    # The images run as uid 1000: the mounted logs folder must be theirs to write.
    chown 1000:1000 "$WORK/runs/$name"
    podman rm -f "$CONTAINER_PREFIX-train-$name" >/dev/null 2>&1 || true
    # As docs/docker.md shows a user: .env by --env-file, data and logs mounted; no network.
    nice -n 10 podman run --rm --name "$CONTAINER_PREFIX-train-$name" --network none \
        --env-file "$ROOT/.env.example" \
        -v "$WORK/data:/app/data:ro" -v "$WORK/runs/$name:/app/logs" \
        "$image" python train.py "${SMOKE_RUN[@]}" "$@"
}
# The CPU image trains with the compiled GENIE step (inductor: g++ and Python.h in the image).
train_cpu() { train_in "$CPU_IMAGE" cpu optimizer.compiled=true; }
train_cuda() { train_in "$CUDA_IMAGE" cuda; }

check_runs() {
    python3 - "$WORK/runs" <<'EOF'
"""The smoke runs' files, read on the host: summary, metrics, checkpoint, owner."""
import csv, json, sys, zipfile
from pathlib import Path

runs_root = Path(sys.argv[1])
for name, compiled in (("cpu", True), ("cuda", False)):
    run_dirs = sorted((runs_root / name / "train" / "runs").glob("*/"))
    assert len(run_dirs) == 1, f"{name}: expected one run directory, found {run_dirs}"
    run = run_dirs[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 5, f"{name}: summary says {summary['steps']} steps, expected 5"
    accuracies = [row["accuracy"] for row in summary["domains"]]
    assert len(accuracies) == 6 and all(0.0 <= a <= 1.0 for a in accuracies), f"{name}: accuracies {accuracies}"
    assert (run / "done").is_file(), f"{name}: no done marker"
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    assert rows and "step" in rows[0], f"{name}: csv/metrics.csv has no rows"
    checkpoint = run / "checkpoints" / "last.ckpt"
    # torch.save writes a zip archive holding data.pkl
    assert zipfile.is_zipfile(checkpoint), f"{name}: {checkpoint} is not a torch checkpoint"
    assert any(n.endswith("data.pkl") for n in zipfile.ZipFile(checkpoint).namelist()), f"{name}: {checkpoint} has no data.pkl"
    # lstat: W&B leaves symbolic links to files inside the container (its debug-core.log)
    owners = {p.lstat().st_uid for p in run.rglob("*")}
    assert owners == {1000}, f"{name}: files owned by uids {owners}, expected the image's user 1000"
    config = (run / "config_resolved.yaml").read_text()
    assert ("compiled: true" in config) == compiled, f"{name}: optimizer.compiled is not {compiled}"
    print(f"{name}: {run.relative_to(runs_root)}: 5 steps, target acc {summary['target_acc']:.3f}, "
          f"{len(rows)} metric rows, {checkpoint.stat().st_size // 1024} KiB last.ckpt, compiled={compiled}")
EOF
}

size_of() { podman image inspect --format '{{.Size}}' "$1" | awk '{printf "%.2f GB", $1 / 1e9}'; }

preflight
# One run at a time: a second would share the work folder, the image names and the containers.
exec 9>"$WORK/lock"
flock --nonblock 9 || die "another scripts/docker_check.sh is running (lock: $WORK/lock)"
trap cleanup EXIT
step tools install_tools
export CONTAINERS_CONF=$WORK/containers.conf
configure_podman
PINS=$(torch_pins)
SEED="$BASE-$(echo "$PINS" | tr -d '=' | tr ' ' '-')"
remove_images() {
    local image
    for image in "$CUDA_IMAGE" "$CPU_IMAGE" "$SEED" "$BASE"; do
        if image_exists "$image"; then podman rmi -f "$image"; fi
    done
}
if [ "$FRESH" = 1 ]; then step remove-images remove_images; fi
start_step base make_base
start_step wheels download_wheels
finish_step base
finish_step wheels
step seed seed_torch
step build-cpu build_cpu
start_step train-cpu train_cpu
step build-cuda build_cuda
step train-cuda train_cuda
finish_step train-cpu
step check-runs check_runs
cat "$WORK/logs/check-runs.log"

say "step times (s; base overlaps wheels, train-cpu overlaps build-cuda and train-cuda):"
for timing in "${TIMINGS[@]}"; do printf '  %-11s %5s\n' "${timing% *}" "${timing##* }"; done
printf '  %-11s %5s\n' total $((SECONDS - START))
say "image sizes: base $(size_of "$BASE"), base+torch $(size_of "$SEED"), cpu $(size_of "$CPU_IMAGE"), cuda $(size_of "$CUDA_IMAGE") (cpu and cuda share the base+torch layers)"
say "ok: both images built and trained; logs in $WORK/logs, runs in $WORK/runs"
