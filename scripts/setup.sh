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
    # (libssl3t64|libssl3: Ubuntu 24.04 renamed it for 64-bit time_t; Debian 12 did not)
    pkgs+=(systemd util-linux iproute2 procps netbase bpfcc-tools gcc libc6-dev
           libsqlite3-0 "libssl3t64|libssl3" libyaml-0-2 libsystemd0 libstdc++6)
fi

# (output captured, not piped into grep -q: grep's early exit would kill the
# writer with SIGPIPE, a failure under pipefail)
installed() {
    local status
    status=$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) || return 1
    [ "$status" = "install ok installed" ]
}
# apt-cache show succeeds for a purely virtual name (Ubuntu: linux-headers-amd64),
# so ask whether apt would install a real version.
has_candidate() {
    local policy
    policy=$(apt-cache policy "$1" 2>/dev/null) || return 1
    [[ $policy =~ $'\n'"  Candidate: "[^\(] ]]
}
missing=()
for p in "${pkgs[@]}"; do
    # "a|b": alternatives (names differ between Debian and Ubuntu releases);
    # present if any is installed, else the first one apt can install
    found=no
    for alt in ${p//|/ }; do installed "$alt" && found=yes && break; done
    [ "$found" = yes ] || missing+=("$p")
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
apt_refresh() {
    if [ "$apt_updated" = no ]; then
        say "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
        apt_updated=yes
    fi
}
apt_install() {
    apt_refresh
    say "installing: $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
}
if [ ${#missing[@]} -gt 0 ]; then
    apt_refresh
    names=()
    for p in "${missing[@]}"; do
        pick=
        for alt in ${p//|/ }; do has_candidate "$alt" && pick=$alt && break; done
        [ -n "$pick" ] || die "no package of ${p//|/ or } can be installed: are the main and universe components in /etc/apt/sources.list?"
        names+=("$pick")
    done
    apt_install "${names[@]}"
fi

if [ "$have_headers" = no ]; then
    apt_refresh
    if has_candidate "linux-headers-$release"; then
        apt_install "linux-headers-$release"
    else
        # No package matches this kernel (custom or cloud kernel): the generic
        # headers work because tcpstates reads no kernel struct layouts.
        arch=$(dpkg --print-architecture)
        generic=linux-headers-$arch
        has_candidate "$generic" || generic=linux-headers-generic   # Ubuntu
        say "no headers packaged for kernel $release; using generic $generic"
        apt_install "$generic"
    fi
fi

# --- Python >= 3.11 (pyproject.toml) ---------------------------------------------
# Ubuntu 22.04's python3 is 3.10: use its python3.11 (universe) for the venv.
# bcc's Python module is pure Python, so the OS's copy works from 3.11 too;
# python3-systemd's C modules are built for 3.10 only, so the venv builds its own.
new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
py=/usr/bin/python3
if ! new_enough "$py"; then
    py=/usr/bin/python3.11
    extra=()
    for p in python3.11 python3.11-venv python3.11-dev libsystemd-dev pkg-config; do
        installed "$p" || extra+=("$p")
    done
    if [ ${#extra[@]} -gt 0 ]; then
        apt_refresh
        has_candidate python3.11-venv ||
            die "tcpstates needs Python >= 3.11; $(/usr/bin/python3 -V 2>&1) is older and apt offers no python3.11 (on Ubuntu 22.04 enable the universe component)"
        apt_install "${extra[@]}"
    fi
    new_enough "$py" || die "tcpstates needs Python >= 3.11; $py is not usable"
fi

# --- tracefs ------------------------------------------------------------------
if [ ! -d /sys/kernel/tracing/events ] && [ ! -d /sys/kernel/debug/tracing/events ]; then
    say "mounting tracefs on /sys/kernel/tracing"
    mount -t tracefs tracefs /sys/kernel/tracing || die "cannot mount tracefs; is this a container without CAP_SYS_ADMIN?"
fi

# bcc before 0.26 (Ubuntu 22.04: 0.18) reads tracepoint formats only under
# /sys/kernel/debug/tracing; systemd mounts debugfs at boot, a chroot or a
# container may not have it
if [ ! -d /sys/kernel/debug/tracing/events ] &&
   /usr/bin/python3 -c 'import bcc, sys; sys.exit(tuple(map(int, bcc.__version__.split(".")[:2])) >= (0, 26))' 2>/dev/null; then
    say "mounting debugfs on /sys/kernel/debug (this bcc finds tracepoints only there)"
    mount -t debugfs debugfs /sys/kernel/debug || die "cannot mount debugfs, which this bcc needs for tracepoints"
fi

# --- virtual environment ------------------------------------------------------
# --system-site-packages: bcc's Python module is the OS package's, never PyPI's.
if [ ! -x "$venv/bin/python" ]; then
    say "creating $venv"
    "$py" -m venv --system-site-packages "$venv"
elif ! new_enough "$venv/bin/python"; then
    # made by an older set-up with a too old Python: nothing in it is usable
    say "recreating $venv with $("$py" -V 2>&1)"
    "$py" -m venv --clear --system-site-packages "$venv"
fi
if [ "$py" != /usr/bin/python3 ] && ! "$venv/bin/python" -c "import systemd.journal" 2>/dev/null; then
    # the OS's python3-systemd satisfies pip's systemd-python requirement but
    # its C modules do not load in this Python: build systemd-python here
    say "building systemd-python for $("$py" -V 2>&1) into $venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --ignore-installed "systemd-python>=234"
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
