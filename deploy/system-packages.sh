#!/usr/bin/env bash
# The Debian packages the tests run for real (Prometheus scrapes the servers in tests/test_system.py; coordinators
# share a Redis store in tests/test_adapter_store.py and tests/test_cluster.py).
# Installs the missing ones as root or through sudo; otherwise names the command to run and fails.
set -euo pipefail
packages=(prometheus redis-server)
commands=(prometheus redis-server)
missing=()
for i in "${!packages[@]}"; do
    command -v "${commands[$i]}" >/dev/null || missing+=("${packages[$i]}")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
install="apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y ${missing[*]}"
if [[ "$(id -u)" == 0 ]]; then
    sudo=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo=(sudo)
else
    echo "The tests need ${missing[*]}: run  sudo sh -c '$install'  then make test again." >&2
    exit 1
fi
echo "Installing ${missing[*]} for the tests ..." >&2
"${sudo[@]}" apt-get update -q
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
