#!/usr/bin/env bash
# setup.sh - make this machine ready to run tcpstates and its tests. Idempotent:
# the second run only checks and takes about a second.
#
#   scripts/setup.sh          runtime: bcc, kernel headers, tracefs, venv with tcpstates
#   scripts/setup.sh --test   also what the test suite needs (journald, pytest, ...)
#
# Needs root (apt, mount). Debian 12+ and Ubuntu 22.04+; other distributions:
# see README.md for the package names.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv=${TCPSTATES_VENV:-$here/.venv}
want_test=no
[ "${1:-}" = --test ] && want_test=yes

say() { echo "setup: $*" >&2; }
die() { echo "setup: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (installs OS packages, mounts tracefs): run it with sudo"
command -v apt-get >/dev/null || die "no apt-get: install bcc's Python bindings, kernel headers and python3-venv with your package manager (README.md lists them), then run again"

# --- OS packages --------------------------------------------------------------
# gcc + python3-dev build the optional C hot path (setup.py; without them: pure Python)
pkgs=(python3 python3-venv python3-dev gcc libc6-dev python3-bpfcc python3-systemd ca-certificates)
if [ "$want_test" = yes ]; then
    # journald + journalctl for the private test journal, unshare/nsenter, ss,
    # /etc/services for the example plugin, bcc's own tcpstates for the benchmark,
    # a C compiler for the record-layout test, the real Fluent Bit's runtime libraries
    pkgs+=(systemd util-linux iproute2 procps netbase bpfcc-tools gcc libc6-dev
           libsqlite3-0 libssl3 libyaml-0-2 libsystemd0 libstdc++6)
fi
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

# A header tree for bcc's compiler: the running kernel's own, else generic ones.
release=$(uname -r)
have_headers=no
if [ -e "/lib/modules/$release/build/include/linux/kconfig.h" ] || [ -e /sys/kernel/kheaders.tar.xz ]; then
    have_headers=yes
elif compgen -G "/usr/src/linux-headers-*/include/linux/kconfig.h" >/dev/null; then
    have_headers=yes   # generic headers; tcpstates merges them into /var/cache/tcpstates
fi

apt_updated=no
apt_install() {
    if [ "$apt_updated" = no ]; then
        say "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
        apt_updated=yes
    fi
    say "installing: $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
}
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"

if [ "$have_headers" = no ]; then
    if [ "$apt_updated" = no ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
        apt_updated=yes
    fi
    if apt-cache show "linux-headers-$release" >/dev/null 2>&1; then
        apt_install "linux-headers-$release"
    else
        # No package matches this kernel (custom or cloud kernel): the generic
        # headers work because tcpstates reads no kernel struct layouts.
        arch=$(dpkg --print-architecture)
        generic=linux-headers-$arch
        apt-cache show "$generic" >/dev/null 2>&1 || generic=linux-headers-generic   # Ubuntu
        say "no headers packaged for kernel $release; using generic $generic"
        apt_install "$generic"
    fi
fi

# --- tracefs ------------------------------------------------------------------
if [ ! -d /sys/kernel/tracing/events ] && [ ! -d /sys/kernel/debug/tracing/events ]; then
    say "mounting tracefs on /sys/kernel/tracing"
    mount -t tracefs tracefs /sys/kernel/tracing || die "cannot mount tracefs; is this a container without CAP_SYS_ADMIN?"
fi

# --- virtual environment ------------------------------------------------------
# --system-site-packages: bcc's Python module is the OS package's, never PyPI's.
if [ ! -x "$venv/bin/python" ]; then
    say "creating $venv"
    /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
extras=journal,metrics
[ "$want_test" = yes ] && extras=journal,metrics,test
stamp="$venv/.tcpstates-installed-$extras"
# reinstall when what the install builds changed (metadata, the C speed-ups)
stale=no
for f in "$here/pyproject.toml" "$here/setup.py" "$here"/plugins/*/*.c "$here"/core/*.h; do
    [ -e "$f" ] && [ "$f" -nt "$stamp" ] && stale=yes
done
if [ ! -f "$stamp" ] || [ "$stale" = yes ]; then
    say "installing tcpstates[$extras] into $venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$here[$extras]"
    touch "$stamp"
fi
"$venv/bin/python" -c "import bcc, pluggy, orjson, tcpstates" || die "the venv cannot import its dependencies; remove $venv and run again"
