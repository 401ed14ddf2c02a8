#!/usr/bin/env bash
# Make the gateway's Mosquitto users: a password file and a rendered ACL.
#
#   make-users.sh [-d DIR] [-p HA_PREFIX] [-y PYTHON] NODE...
#
# Users: one per node (username = node name), plus `coordinator`, `asker` (mesh ask / mesh status)
# and `homeassistant`. Writes, under DIR (default /etc/mesh/mosquitto):
#   passwd                      mosquitto_passwd hashes for every user
#   acl                         acl.template rendered for these nodes and HA_PREFIX
#   secrets/<user>.password     each user's clear-text password (mode 600): copy a node's file to
#                               that Pi as /etc/mesh/secrets/<node>.password, and type the
#                               homeassistant one into Home Assistant's MQTT integration
#   identity/                   the mesh's own CA (identity/ca/ca.key stays here) and one identity
#                               per user but homeassistant (it cannot sign): NAME.crt + NAME.key,
#                               with ca.crt and crl.pem; nodes also get NAME.catalog-key (the key of
#                               cache catalogs; the asker and coordinator do not); copy a node's five
#                               files to that Pi's identity directory (nodes/identity_cli.py,
#                               mesh/auth/README.md)
#   PYTHON: a Python with the mesh's packages (default /opt/mesh/.venv/bin/python, else this
#   checkout's .venv, else python3)
# Passwords and identities already made are kept, so adding a node means running it again with the full
# node list; then `systemctl reload mesh-broker` (SIGHUP) reloads users and ACLs.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dir=/etc/mesh/mosquitto
prefix=homeassistant
reserved=(homeassistant asker coordinator)
repo="$(cd "$here/../.." && pwd)"
python=""

usage() {
    sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

while getopts "d:p:y:h" opt; do
    case "$opt" in
        d) dir="$OPTARG" ;;
        y) python="$OPTARG" ;;
        p) prefix="$OPTARG" ;;
        h) usage 0 ;;
        *) usage 2 ;;
    esac
done
shift $((OPTIND - 1))
[ "$#" -ge 1 ] || { echo "make-users.sh: name at least one node" >&2; usage 2; }

command -v mosquitto_passwd >/dev/null 2>&1 || {
    echo "make-users.sh: mosquitto_passwd not found (apt-get install mosquitto)" >&2
    exit 1
}
[[ "$prefix" =~ ^[A-Za-z0-9_-]+$ ]] || { echo "make-users.sh: bad HA prefix '$prefix'" >&2; exit 2; }
for node in "$@"; do
    # The same rule as mesh.config.check_name: the name is one MQTT topic level.
    if ! [[ "$node" =~ ^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$ ]]; then
        echo "make-users.sh: invalid node name '$node'" >&2
        exit 2
    fi
    for r in "${reserved[@]}"; do
        [ "$node" != "$r" ] || { echo "make-users.sh: '$node' is a reserved user name" >&2; exit 2; }
    done
done

umask 077
mkdir -p "$dir/secrets"

password_of() {  # reuse the stored password, or make a new random one
    local file="$dir/secrets/$1.password"
    if [ ! -s "$file" ]; then
        od -An -tx1 -N18 /dev/urandom | tr -d ' \n' >"$file"
        echo >>"$file"
    fi
    head -n1 "$file"
}

tmp_passwd="$(mktemp "$dir/.passwd.XXXXXX")"
tmp_acl="$(mktemp "$dir/.acl.XXXXXX")"
trap 'rm -f "$tmp_passwd" "$tmp_acl"' EXIT

for user in "${reserved[@]}" "$@"; do
    mosquitto_passwd -b "$tmp_passwd" "$user" "$(password_of "$user")"
done

{
    echo "# Rendered by make-users.sh from acl.template for nodes: $*; HA prefix: $prefix"
    echo "# Edit acl.template (or re-run make-users.sh), not this file."
    # Everything outside the node block, without the template's own header, prefix filled in...
    sed -e '1,/^$/d' -e '/^#@node-begin$/,/^#@node-end$/d' -e "s/@HA_PREFIX@/$prefix/g" "$here/acl.template"
    # ...then the node block once per node.
    for node in "$@"; do
        echo
        sed -n -e '/^#@node-begin$/,/^#@node-end$/{/^#@node-/d;p;}' "$here/acl.template" \
            | sed -e "s/@NODE@/$node/g" -e "s/@HA_PREFIX@/$prefix/g"
    done
} >"$tmp_acl"

# The broker reads these as the mosquitto user; group-readable if that group exists.
chmod 640 "$tmp_passwd" "$tmp_acl"
if getent group mosquitto >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
    chgrp mosquitto "$tmp_passwd" "$tmp_acl"
fi
mv "$tmp_passwd" "$dir/passwd"
mv "$tmp_acl" "$dir/acl"
trap - EXIT

# Identities: the gateway is the mesh's certificate authority (mesh.auth). Home Assistant gets
# none: it cannot sign, the ACL alone guards what it may write.
if [ -z "$python" ]; then
    for candidate in /opt/mesh/.venv/bin/python "$repo/.venv/bin/python" python3; do
        if command -v "$candidate" >/dev/null 2>&1; then python="$candidate"; break; fi
    done
fi
identity() { PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$python" -m nodes.identity_cli "$@" --dir "$dir/identity" >/dev/null; }
identity issue --role asker asker
identity issue --role coordinator coordinator
identity issue --role node "$@"
echo "users: ${reserved[*]} $*" >&2
echo "wrote $dir/passwd, $dir/acl, $dir/secrets/<user>.password, $dir/identity/<user>.{crt,key} and $dir/identity/<node>.catalog-key" >&2
