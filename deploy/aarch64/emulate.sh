#!/usr/bin/env bash
# The mesh on an emulated Raspberry Pi CPU: an arm64 Debian root run through qemu-user.
#
#   deploy/aarch64/emulate.sh build        arm64 bookworm root (debootstrap), then deploy/install.sh
#                                          --node pi0 --model smollm2-135m inside it, as on a Pi
#   deploy/aarch64/emulate.sh check        one ask answered by a node in the root, compared token
#                                          for token with the same greedy run on this machine
#   deploy/aarch64/emulate.sh run CMD...   a command in the root (as root), e.g. run mesh --help
#   deploy/aarch64/emulate.sh shell        an interactive shell in the root
#   deploy/aarch64/emulate.sh cpuinfo      what the root's processes see of their CPU
#
# Every process in the root runs under qemu-aarch64 with QEMU_CPU=$MESH_AARCH64_CPU (default
# cortex-a53, the Pi Zero 2W's core: ARMv8.0, so an instruction of a later ARM version dies with
# SIGILL as on the board; cortex-a72 is the Pi 4's, cortex-a76 the Pi 5's). The root sees an ARM
# view of the CPU instead of the x86 host's: a /proc/cpuinfo and a /sys/devices/system/cpu tree
# of that core (deploy/aarch64/fakecpu.py), bind-mounted in a private mount namespace that ends
# with the command. See deploy/AARCH64.md for what was found with it.
#
# Environment: MESH_AARCH64_CPU (cortex-a53), MESH_AARCH64_CACHE (~/.cache/mesh/aarch64: the
# debootstrap and pip caches and the root, keyed by suite and this script's ROOT_VERSION),
# MESH_AARCH64_VIEW (board: the Pi's /proc/cpuinfo and /sys/devices/system/cpu; host: the x86
# host's /sys; none: no /sys), MESH_AARCH64_THREADS (threads for the check's node; default: what mesh.cpu says for the CPU),
# TORCH_SPEC / TORCH_INDEX_URL (passed to install.sh), MESH_AARCH64_PROMPT, MESH_AARCH64_TOKENS.
# Needs root and Debian's qemu-user-static, binfmt-support and debootstrap (installed if missing).
set -euo pipefail

ROOT_VERSION=1  # bump when the root's contents change (packages below, the layout)
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
PACKAGES=python3,python3-venv,python3-pip,ca-certificates,systemd,mosquitto-clients

src="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cache="${MESH_AARCH64_CACHE:-$HOME/.cache/mesh/aarch64}"
cpu="${MESH_AARCH64_CPU:-cortex-a53}"
root="$cache/root-$SUITE-v$ROOT_VERSION"
prompt="${MESH_AARCH64_PROMPT:-1, 2, 3, 4, 5, 6, 7,}"
tokens="${MESH_AARCH64_TOKENS:-16}"
model=smollm2-135m
# Where install.sh's `mesh setup` leaves the models: the mesh user's ~/.cache/mesh (install.sh sets
# MESH_CACHE_DIR, which is the prompt cache's directory, not MESH_HOME; see deploy/AARCH64.md).
pi_home=/var/lib/mesh/.cache/mesh
nice=(nice -n 19)  # qemu is CPU heavy and the machine is shared

step() { echo "==> $*" >&2; }
die() { echo "emulate.sh: $*" >&2; exit 1; }

usage() {
    sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

host_tools() {
    [ "$(id -u)" -eq 0 ] || die "run as root (debootstrap, chroot and mounts need it)"
    if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null \
        || ! command -v update-binfmts >/dev/null; then
        step "host packages: qemu-user-static binfmt-support debootstrap"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static binfmt-support debootstrap >&2
    fi
    if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    fi
    if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        update-binfmts --enable qemu-aarch64 >&2 || update-binfmts --import qemu-aarch64 >&2
    fi
    grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 || die "binfmt qemu-aarch64 is not enabled"
    # F: the kernel holds the interpreter open, so the root needs no copy of qemu.
    grep -q '^flags: .*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 || die "binfmt qemu-aarch64 lacks the F flag"
}

# Run "$@" chrooted in the root, in a private mount namespace (mounts vanish with it), with a
# clean environment that carries QEMU_CPU to every process started inside.
in_root() {
    local fake="$cache/fakecpu-$cpu"
    python3 "$src/deploy/aarch64/fakecpu.py" --cpu "$cpu" --cores "$(nproc)" --out "$fake" >/dev/null
    mkdir -p "$cache/pip" "$root/root/.cache/pip" "$root/src/mesh"
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    local env=(env -i QEMU_CPU="$cpu" HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}"
               PATH=/opt/mesh/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
               HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PIP_DISABLE_PIP_VERSION_CHECK=1
               PIP_DEFAULT_TIMEOUT=180 PIP_CERT=/etc/ssl/certs/ca-certificates.crt
               ${MESH_AARCH64_ENV:-})
    "${nice[@]}" unshare --mount --propagation private -- bash -c '
        set -e
        r="$1"; fake="$2"; cache="$3"; src="$4"; view="$5"; shift 5
        mount -t proc proc "$r/proc"
        case "$view" in
            board)  # the Pi'"'"'s /proc/cpuinfo and CPU tree, nothing else of /sys
                mount --bind "$fake/cpuinfo" "$r/proc/cpuinfo"
                mount -t tmpfs -o mode=0755 sysfs "$r/sys"
                mkdir -p "$r/sys/devices/system/cpu" "$r/sys/fs/cgroup"
                mount --rbind "$fake/cpu" "$r/sys/devices/system/cpu" ;;
            host) mount --rbind /sys "$r/sys" ;;  # the x86 host'"'"'s, as a plain chroot would have
            none) ;;  # no /sys, the host'"'"'s /proc/cpuinfo
            *) echo "emulate.sh: MESH_AARCH64_VIEW is board, host or none" >&2; exit 2 ;;
        esac
        mount --rbind /dev "$r/dev"
        mount -t tmpfs tmpfs "$r/run"
        mount --bind "$cache/pip" "$r/root/.cache/pip"
        mount --bind -o ro "$src" "$r/src/mesh"
        # This machine reaches PyPI through a proxy with a CA of its own: lend the root the host'"'"'s
        # CA bundle (a Pi needs nothing of the kind).
        mount --bind -o ro /etc/ssl/certs/ca-certificates.crt "$r/etc/ssl/certs/ca-certificates.crt"
        exec chroot "$r" "$@"
    ' _ "$root" "$fake" "$cache" "$src" "${MESH_AARCH64_VIEW:-board}" "${env[@]}" "$@"
}

build_root() {
    if [ -f "$root/.debootstrap-done" ]; then
        return
    fi
    step "debootstrap $SUITE arm64 -> $root (debs cached in $cache/debs)"
    mkdir -p "$cache/debs"
    rm -rf "$root.tmp"
    local t0=$SECONDS
    QEMU_CPU="$cpu" "${nice[@]}" debootstrap --arch=arm64 --variant=minbase --include="$PACKAGES" \
        --cache-dir="$cache/debs" "$SUITE" "$root.tmp" "$MIRROR" >&2
    touch "$root.tmp/.debootstrap-done"
    mv "$root.tmp" "$root"
    step "root made in $((SECONDS - t0)) s"
}

cmd_build() {
    host_tools
    build_root
    step "deploy/install.sh --node pi0 --model $model in the root (pip cache: $cache/pip)"
    local t0=$SECONDS
    in_root env ${TORCH_SPEC:+TORCH_SPEC=$TORCH_SPEC} ${TORCH_INDEX_URL:+TORCH_INDEX_URL=$TORCH_INDEX_URL} \
        bash /src/mesh/deploy/install.sh --node pi0 --model "$model"
    step "install.sh took $((SECONDS - t0)) s under qemu ($cpu)"
}

cmd_check() {
    host_tools
    [ -x "$root/opt/mesh/.venv/bin/mesh" ] || die "no mesh in $root; run: $0 build"
    local threads="${MESH_AARCH64_THREADS:-}"
    if [ -z "$threads" ]; then
        threads="$(in_root runuser -u mesh -- /opt/mesh/.venv/bin/python -m mesh.cpu --threads)"
    fi
    step "CPU the root sees ($cpu): $(in_root runuser -u mesh -- /opt/mesh/.venv/bin/python -m mesh.cpu)"
    step "greedy tokens on this machine (x86, MESH_HOME=${MESH_HOME:-$HOME/.cache/mesh})"
    local x86 arm ask
    x86="$("${nice[@]}" env HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error \
        "$src/.venv/bin/python" "$src/deploy/aarch64/greedy.py" --home "${MESH_HOME:-$HOME/.cache/mesh}" \
        --model "$model" --tokens "$tokens" "$prompt" | tail -n1)"
    echo "x86:   $x86" >&2
    step "greedy tokens in the root ($cpu, $threads threads)"
    local t0=$SECONDS
    arm="$(in_root runuser -u mesh -- /opt/mesh/.venv/bin/python \
        /opt/mesh/deploy/aarch64/greedy.py --home "$pi_home" --model "$model" --tokens "$tokens" \
        --threads "$threads" "$prompt" | tail -n1)"
    echo "arm64: $arm ($((SECONDS - t0)) s)" >&2
    step "one ask through a broker and a node in the root"
    t0=$SECONDS
    ask="$(in_root runuser -u mesh -- /opt/mesh/.venv/bin/python /opt/mesh/deploy/aarch64/ask_once.py \
        --home "$pi_home" --model "$model" --tokens "$tokens" --threads "$threads" "$prompt" | tail -n1)"
    echo "ask:   $ask ($((SECONDS - t0)) s)" >&2
    python3 - "$x86" "$arm" "$ask" <<'EOF'
import json, sys
x86, arm, ask = (json.loads(s) for s in sys.argv[1:])
same_weights = x86["digest"] == arm["digest"]
same_tokens = x86["token_ids"] == arm["token_ids"]
same_answer = ask["answer"] == x86["text"]
print(json.dumps({"same_weights": same_weights, "same_tokens": same_tokens, "same_answer": same_answer,
                  "x86_text": x86["text"], "arm_text": arm["text"], "ask_answer": ask["answer"],
                  "min_margin_x86": x86["min_margin"], "arm_threads": arm["threads"],
                  "arm_torch": arm["torch"], "arm_run_s": arm["run_s"]}, indent=1))
sys.exit(0 if same_weights and same_tokens and same_answer else 1)
EOF
}

[ "$#" -ge 1 ] || usage 2
command="$1"; shift
case "$command" in
    build) cmd_build ;;
    check) cmd_check ;;
    run) host_tools; in_root "$@" ;;
    shell) host_tools; in_root bash ;;
    cpuinfo) host_tools; in_root /opt/mesh/.venv/bin/python -m mesh.cpu --verbose ;;
    -h|--help) usage 0 ;;
    *) echo "emulate.sh: unknown command $command" >&2; usage 2 ;;
esac
