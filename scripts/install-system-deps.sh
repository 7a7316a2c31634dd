#!/usr/bin/env bash
# Install the system packages the test suite needs (Debian/Ubuntu): PostgreSQL, Redis, dnsmasq.
# Idempotent: does nothing when they are all installed. Starts no service -- the tests start
# their own private servers on 127.0.0.x (tests/servers.py). Quiet; on failure the apt output
# is shown. Needs root (or sudo).
set -euo pipefail

required=(postgresql redis-server dnsmasq)
packages=(postgresql postgresql-contrib redis-server dnsmasq)

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'
}

missing=()
for pkg in "${required[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

as_root=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        as_root=(sudo)
    else
        echo "install-system-deps: missing ${missing[*]}; run this script as root" >&2
        exit 1
    fi
fi

echo "install-system-deps: installing ${packages[*]} (missing: ${missing[*]})"

log=$(mktemp)
policy=/usr/sbin/policy-rc.d
remove_policy=false
cleanup() {
    if [ "$remove_policy" = true ]; then
        "${as_root[@]}" rm -f "$policy"
    fi
    rm -f "$log"
}
trap cleanup EXIT

# Keep the packages' maintainer scripts from starting their services (invoke-rc.d asks
# policy-rc.d; 101 = "action not allowed"). Without systemd a start may fail anyway, and a
# running dnsmasq/redis would only hold ports 53/6379 for nothing. An existing policy is kept.
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# temporary, from sqla-rebalance scripts/install-system-deps.sh\nexit 101\n' |
        "${as_root[@]}" tee "$policy" >/dev/null
    "${as_root[@]}" chmod 755 "$policy"
    remove_policy=true
fi

run_quiet() {
    # Quiet on success; the whole output on failure.
    if ! "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive "$@" >"$log" 2>&1; then
        echo "install-system-deps: failed: $*" >&2
        cat "$log" >&2
        return 1
    fi
}

run_quiet apt-get update
if ! run_quiet apt-get install -y --no-install-recommends "${packages[@]}"; then
    # A package whose service failed to start is left half-configured: configure it again
    # (no start this time) and judge by what is installed.
    echo "install-system-deps: retrying package configuration" >&2
    run_quiet dpkg --configure -a || true
fi

still_missing=()
for pkg in "${packages[@]}"; do
    installed "$pkg" || still_missing+=("$pkg")
done
if [ "${#still_missing[@]}" -ne 0 ]; then
    echo "install-system-deps: not installed: ${still_missing[*]}" >&2
    exit 1
fi
