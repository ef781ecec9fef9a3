#!/bin/sh
# The update signing keys: a CA (its certificate is the keyring baked into the image) and a
# signing certificate issued by it. Made once in DIR if absent; a fleet keeps its own keys
# offline and points RAUC_KEYS at them. Usage: rauc-keys.sh DIR
set -eu
d="$1"
[ -f "$d/ca.cert.pem" ] && [ -f "$d/signing.cert.pem" ] && [ -f "$d/signing.key.pem" ] && exit 0
mkdir -p "$d"
chmod 700 "$d"
cd "$d"
cat > openssl.cnf <<CNF
[req]
distinguished_name = dn
[dn]
[v3_ca]
basicConstraints = critical,CA:true
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[v3_leaf]
basicConstraints = critical,CA:false
keyUsage = critical,digitalSignature
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
CNF
if [ ! -f ca.cert.pem ] || [ ! -f ca.key.pem ]; then
echo "rauc-keys: creating a development update CA in $d (use your fleet's own for production)"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
  -subj "/O=line-recorder/CN=update CA" -keyout ca.key.pem -out ca.cert.pem \
  -config openssl.cnf -extensions v3_ca 2>/dev/null
fi
echo "rauc-keys: issuing an update signing certificate in $d"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/O=line-recorder/CN=update signing" \
  -keyout signing.key.pem -out signing.csr.pem -config openssl.cnf 2>/dev/null
openssl x509 -req -in signing.csr.pem -CA ca.cert.pem -CAkey ca.key.pem -CAcreateserial -days 1825 \
  -extfile openssl.cnf -extensions v3_leaf -out signing.cert.pem 2>/dev/null
rm -f signing.csr.pem
