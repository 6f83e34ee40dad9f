#!/usr/bin/env bash
# Install what PyPubSub needs on Debian 12 into ./.venv.
#   bash scripts/install.sh          the daemon (Debian build deps + requirements.txt)
#   bash scripts/install.sh --dev    also the test tools and the real servers the tests start
# Runs apt-get as root, or through sudo. Fails loudly when anything is missing afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[ "${1:-}" = "--dev" ] && dev=1

SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "install.sh: run as root or install sudo" >&2; exit 1; }
  SUDO=sudo
fi

# bonsai (LDAP) builds from source: it needs the OpenLDAP and SASL headers and a compiler.
APT=(python3 python3-venv python3-dev gcc libldap2-dev libsasl2-dev)
if [ $dev = 1 ]; then
  # real components the tests start: slapd (LDAP), redis, node and ruby for the clients,
  # systemd-analyze for the unit file, openssl for TLS, headless Chromium for the web pages
  APT+=(slapd ldap-utils redis-server redis-tools nodejs ruby systemd openssl procps curl
        chromium chromium-driver)
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${APT[@]}" >/dev/null

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if [ $dev = 1 ]; then
  .venv/bin/pip install -q -r requirements-dev.txt
else
  .venv/bin/pip install -q -r requirements.txt
fi

missing=0
check() { command -v "$1" >/dev/null || { echo "install.sh: $1 is missing after install" >&2; missing=1; }; }
.venv/bin/python -c "import aiohttp, httptools, yaml, netaddr, orjson, uvloop, bonsai, argon2, bcrypt, aiobotocore, redis, hiredis, prometheus_client" \
  || missing=1
if [ $dev = 1 ]; then
  for t in slapd slapadd redis-server node ruby systemd-analyze openssl chromium chromedriver; do check "$t"; done
  .venv/bin/python -c "import pytest, moto, trustme, asfpy, selenium, wheel" || missing=1
fi
[ $missing = 0 ] || { echo "install.sh: installation incomplete" >&2; exit 1; }
echo "install.sh: ready (.venv)"
