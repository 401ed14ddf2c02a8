#!/usr/bin/env bash
# Make a local certificate authority and a server certificate for the gateway's TLS listener.
#
#   make-certs.sh [-d DIR] [-n DAYS] NAME...
#
# NAME: every host name and IP address clients use to reach the gateway (for example
# gateway.local 192.168.1.2). Writes, under DIR (default /etc/mesh/mosquitto/certs):
#   ca.key ca.crt            the local CA; kept if present, so re-running only renews the server
#                            certificate and clients keep trusting ca.crt
#   server.key server.crt    the broker's key and certificate, with NAME... as subjectAltNames
# Copy ca.crt (never ca.key) to every node as /etc/mesh/ca.crt and into Home Assistant.
set -euo pipefail

dir=/etc/mesh/mosquitto/certs
days=1825

usage() {
    sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

while getopts "d:n:h" opt; do
    case "$opt" in
        d) dir="$OPTARG" ;;
        n) days="$OPTARG" ;;
        h) usage 0 ;;
        *) usage 2 ;;
    esac
done
shift $((OPTIND - 1))
[ "$#" -ge 1 ] || { echo "make-certs.sh: name at least one host name or IP address" >&2; usage 2; }
command -v openssl >/dev/null 2>&1 || { echo "make-certs.sh: openssl not found (apt-get install openssl)" >&2; exit 1; }

san=""
for name in "$@"; do
    if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then
        san="${san:+$san,}IP:$name"
    else
        san="${san:+$san,}DNS:$name"
    fi
done

umask 077
mkdir -p "$dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [ ! -s "$dir/ca.key" ] || [ ! -s "$dir/ca.crt" ]; then
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/ca.key"
    openssl req -x509 -new -key "$dir/ca.key" -sha256 -days "$days" -subj "/CN=mesh local CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" \
        -out "$dir/ca.crt"
    echo "made a new CA: $dir/ca.crt" >&2
fi

openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/server.key"
openssl req -new -key "$work/server.key" -subj "/CN=$1" -out "$work/server.csr"
cat >"$work/server.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
EXT
openssl x509 -req -in "$work/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -CAserial "$work/ca.srl" -days "$days" -sha256 -extfile "$work/server.ext" -out "$work/server.crt" 2>/dev/null
openssl verify -CAfile "$dir/ca.crt" "$work/server.crt" >/dev/null

mv "$work/server.key" "$dir/server.key"
mv "$work/server.crt" "$dir/server.crt"
chmod 644 "$dir/ca.crt" "$dir/server.crt"
chmod 640 "$dir/server.key"
chmod 600 "$dir/ca.key"
chmod 755 "$dir"
# The broker runs as mosquitto and must read its key.
if getent group mosquitto >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
    chgrp mosquitto "$dir/server.key"
fi
echo "server certificate for $san: $dir/server.crt" >&2
