#!/bin/sh
# Regenerates the test certificates of src/net/testdata/tls (see README.md). Test-only:
# the keys are unencrypted and published; nothing trusts this CA outside keel's tests.
set -eu
cd "$(dirname "$0")"
days=36500
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }

# The test CA.
key ca.key
openssl req -x509 -new -key ca.key -sha256 -days $days -subj "/CN=keel test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out ca.pem

# sign NAME SUBJECT EXTENSIONS: NAME.pem from NAME.key, signed by the CA.
sign() {
  openssl req -new -key "$1.key" -subj "$2" -out "$1.csr"
  printf '%s\n' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -set_serial "0x$(openssl rand -hex 8)" \
    -sha256 -days $days -extfile "$1.ext" -out "$1.pem"
  rm -f "$1.csr" "$1.ext"
}

# The server: SAN IP:127.0.0.1 and DNS:localhost.
key server.key
sign server "/CN=localhost" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost"

# A server certificate of the CA for another host only (SAN DNS:other.example).
key wrong_host.key
sign wrong_host "/CN=other.example" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:other.example"

# The client (mTLS).
key client.key
sign client "/CN=keel test client" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"

# A key that matches no certificate here (for the mismatched-key case).
key other.key

# A self-signed server certificate, not signed by the CA.
key self_signed.key
openssl req -x509 -new -key self_signed.key -sha256 -days $days -subj "/CN=localhost" \
  -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" -out self_signed.pem
