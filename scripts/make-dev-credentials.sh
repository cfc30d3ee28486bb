#!/usr/bin/env bash
# Development credentials for running fedhpro-flwr in Flower deployment mode over TLS with
# SuperNode authentication, on this machine only (loopback). NOT for production: the CA
# key sits next to the certificates, unencrypted.
#
# Usage: scripts/make-dev-credentials.sh [--force] OUT_DIR [NUM_NODES]
#
# Writes into OUT_DIR:
#   ca.crt / ca.key                    development certificate authority
#   superlink.crt / superlink.key      SuperLink server certificate (SANs: 127.0.0.1, ::1,
#                                      localhost), signed by the CA
#   supernode-N / supernode-N.pub      SuperNode N's auth key pair (N = 0..NUM_NODES-1),
#                                      ECDSA P-384 in OpenSSH format
#
# For a SuperLink on another machine, add the names SuperNodes dial to the certificate:
#   EXTRA_SANS="DNS:superlink.example.org,IP:10.0.0.5" scripts/make-dev-credentials.sh DIR 4
#
# Needs only openssl and ssh-keygen.
set -euo pipefail

usage() {
  echo "usage: $0 [--force] OUT_DIR [NUM_NODES]" >&2
  echo "  --force  overwrite credentials already in OUT_DIR" >&2
  exit 2
}

force=0
positional=()
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h|--help) usage ;;
    -*) echo "unknown option: $arg" >&2; usage ;;
    *) positional+=("$arg") ;;
  esac
done
[[ ${#positional[@]} -ge 1 && ${#positional[@]} -le 2 ]] || usage
out_dir=${positional[0]}
num_nodes=${positional[1]:-2}
if ! [[ "$num_nodes" =~ ^[0-9]+$ ]] || (( num_nodes < 1 )); then
  echo "NUM_NODES must be a positive integer, got '$num_nodes'" >&2
  exit 2
fi

for tool in openssl ssh-keygen; do
  command -v "$tool" >/dev/null || { echo "$tool not found on PATH" >&2; exit 1; }
done

# Every file this script writes, so that we can refuse to clobber any of them.
files=(ca.crt ca.key superlink.crt superlink.key)
for ((i = 0; i < num_nodes; i++)); do
  files+=("supernode-$i" "supernode-$i.pub")
done

mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)  # absolute: flwr's config.toml rejects relative cert paths

existing=()
for f in "${files[@]}"; do
  [[ -e "$out_dir/$f" ]] && existing+=("$f")
done
if (( ${#existing[@]} > 0 )); then
  if (( force )); then
    # ssh-keygen prompts before overwriting, so clear the old files first.
    for f in "${existing[@]}"; do rm -f "$out_dir/$f"; done
  else
    echo "refusing to overwrite in $out_dir: ${existing[*]} (pass --force to replace them)" >&2
    exit 1
  fi
fi

# Private keys must not be readable by other users.
umask 077
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 1. Development CA. basicConstraints/keyUsage are marked critical and the key identifiers
#    are set because strict X.509 verifiers (Python >= 3.13's default SSL context) need them.
openssl ecparam -name secp384r1 -genkey -noout -out "$out_dir/ca.key"
cat >"$work/ca.ext" <<'EOF'
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
openssl req -new -x509 -sha384 -days 365 -key "$out_dir/ca.key" \
  -subj "/O=fedhpro-flwr development/CN=fedhpro-flwr dev CA" \
  -extensions v3_ca_dev -config <(printf '[req]\ndistinguished_name=dn\n[dn]\n[v3_ca_dev]\n'; cat "$work/ca.ext") \
  -out "$out_dir/ca.crt"

# 2. SuperLink server certificate. The SANs cover every loopback name a client may dial:
#    SuperNodes, the flwr CLI and the ServerApp process (which reaches the SuperLink's
#    Runtime API on 127.0.0.1) all verify the host name against them.
openssl ecparam -name secp384r1 -genkey -noout -out "$out_dir/superlink.key"
openssl req -new -sha384 -key "$out_dir/superlink.key" \
  -subj "/O=fedhpro-flwr development/CN=localhost" -out "$work/superlink.csr"
cat >"$work/server.ext" <<'EOF'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyAgreement
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer
EOF
echo "subjectAltName = IP:127.0.0.1, IP:::1, DNS:localhost${EXTRA_SANS:+, $EXTRA_SANS}" >>"$work/server.ext"
openssl x509 -req -sha384 -days 365 -in "$work/superlink.csr" \
  -CA "$out_dir/ca.crt" -CAkey "$out_dir/ca.key" -CAcreateserial -CAserial "$work/ca.srl" \
  -extfile "$work/server.ext" -out "$out_dir/superlink.crt"
openssl verify -CAfile "$out_dir/ca.crt" "$out_dir/superlink.crt" >/dev/null

# 3. SuperNode auth keys. Flower 1.42 accepts only NIST-curve EC keys here (not ed25519 or
#    RSA): `flwr supernode register` reads the OpenSSH public key, `flower-supernode
#    --auth-supernode-private-key` the OpenSSH private key (no passphrase).
for ((i = 0; i < num_nodes; i++)); do
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedhpro-flwr supernode-$i" -f "$out_dir/supernode-$i"
done

# Certificates and public keys may be shared; private keys stay 0600 (from umask).
chmod 644 "$out_dir/ca.crt" "$out_dir/superlink.crt" "$out_dir"/supernode-*.pub

echo "Development credentials written to $out_dir:"
echo "  CA certificate         $out_dir/ca.crt   (SuperLink --ssl-ca-certfile, SuperNode --root-certificates, config.toml root-certificates)"
echo "  CA private key         $out_dir/ca.key"
echo "  SuperLink certificate  $out_dir/superlink.crt   (--ssl-certfile; SANs 127.0.0.1, ::1, localhost${EXTRA_SANS:+, $EXTRA_SANS})"
echo "  SuperLink private key  $out_dir/superlink.key   (--ssl-keyfile)"
for ((i = 0; i < num_nodes; i++)); do
  echo "  SuperNode $i key pair   $out_dir/supernode-$i (--auth-supernode-private-key), $out_dir/supernode-$i.pub (flwr supernode register)"
done
