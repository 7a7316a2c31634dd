#!/usr/bin/env bash
# Install the system packages the test suite needs (Debian/Ubuntu): PostgreSQL, MariaDB, Redis,
# dnsmasq, and what pip needs to build mysqlclient from source (the MariaDB client headers,
# pkg-config, a C compiler and Python's headers). Idempotent: does nothing when they are all
# installed. Starts no service -- the tests start their own private servers on 127.0.0.x
# (sqla_rebalance.devservers) -- and disables the system services of the packages it installs. Quiet; on
# failure the apt output is shown. Needs root (or sudo).
set -euo pipefail

# The servers (and client) the tests start.
required=(postgresql mariadb-server mariadb-client redis-server dnsmasq)
# Build dependencies of mysqlclient (the `test` extra builds it from source with pip); a missing
# one is installed too, even when every server is already there.
build=(default-libmysqlclient-dev pkg-config gcc python3-dev)
packages=(postgresql postgresql-contrib mariadb-server mariadb-client redis-server dnsmasq
    "${build[@]}")
# System services of those packages: none may run (or start at boot) for the tests' sake.
declare -A services=(
    [postgresql]=postgresql
    [mariadb-server]=mariadb
    [redis-server]=redis-server
    [dnsmasq]=dnsmasq
)

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'
}

missing=()
for pkg in "${required[@]}" "${build[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
# Packages installed by this run (their services get disabled; pre-existing set-ups are kept).
new_packages=()
for pkg in "${packages[@]}"; do
    installed "$pkg" || new_packages+=("$pkg")
done

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
saved_policy="$policy.sqla-rebalance-saved"
policy_installed=false
cleanup() {
    if [ "$policy_installed" = true ]; then
        if [ -e "$saved_policy" ]; then
            "${as_root[@]}" mv -f "$saved_policy" "$policy"
        else
            "${as_root[@]}" rm -f "$policy"
        fi
    fi
    rm -f "$log"
}
trap cleanup EXIT

# Keep the packages' maintainer scripts from starting their services (invoke-rc.d and
# deb-systemd-invoke ask policy-rc.d; 101 = "action not allowed"). Without systemd a start may
# fail anyway, and a running dnsmasq/redis/mariadb would only hold ports 53/6379/3306 for
# nothing. An existing policy (which might allow starts) is set aside and restored afterwards.
if [ -e "$policy" ] && [ ! -e "$saved_policy" ]; then
    "${as_root[@]}" cp -a "$policy" "$saved_policy"
fi
printf '#!/bin/sh\n# temporary, from sqla-rebalance scripts/install-system-deps.sh\nexit 101\n' |
    "${as_root[@]}" tee "$policy" >/dev/null
"${as_root[@]}" chmod 755 "$policy"
policy_installed=true

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

# Nothing started, but the packages enabled their services for the next boot: disable those
# of the packages installed now (the tests never use them).
for pkg in "${new_packages[@]}"; do
    service=${services[$pkg]:-}
    [ -n "$service" ] || continue
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        "${as_root[@]}" systemctl disable --quiet "$service.service" >/dev/null 2>&1 || true
    fi
    if [ -e "/etc/init.d/$service" ] && command -v update-rc.d >/dev/null 2>&1; then
        "${as_root[@]}" update-rc.d "$service" disable >/dev/null 2>&1 || true
    fi
done
