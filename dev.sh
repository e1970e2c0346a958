#!/usr/bin/env bash
# Developer entry point. As root on a fresh Debian 12 machine:
#   ./dev.sh setup   install the system packages and .venv (idempotent, quick when done)
#   ./dev.sh demo    setup, then map a LAN service through the daemon in the namespace lab
#   ./dev.sh test    setup, then pytest (lab tests included), ruff (lint, format) and mypy
#   ./dev.sh bench   setup, then the benchmark against miniupnpd (options: ./dev.sh bench --help)
#   ./dev.sh lab     the namespace lab's command line: up, exec, down, demo (./dev.sh lab --help)
#   ./dev.sh fuzz    setup, then the decoder and live-server fuzz tests with many more examples
set -euo pipefail

cd "$(dirname "$(readlink -f "$0")")"

# What the lab and its tests run: ip, nft, natpmpc, upnpc, miniupnpd (the reference
# gateway), conntrack, socat, ping, sysctl/pgrep; tshark: Wireshark's NAT-PMP/PCP
# dissector is the strict second reader of every answer the gateway sends (tests/dissect.py);
# it only reads pcap files the tests write, so it needs no capture rights; systemd-analyze
# (package systemd: it verifies the shipped unit and needs no running systemd) and setpriv
# (util-linux: the lab test that starts the daemon with the unit's capabilities only, as an
# unprivileged user, with Debian's python3 when the venv's interpreter lives where that user
# cannot go, e.g. /root).
# chromium and chromium-driver: the admin console's end-to-end tests drive the page headless
# (Selenium with SE_OFFLINE=true, so nothing is downloaded).
# hping3, and trafgen (package netsniff-ng) with ethtool: the data-path benchmark's load
# generators (lab/bench_datapath.py; ethtool turns off scatter-gather on the sender's veth so
# trafgen's frames reach the gateway in one piece).
# miniupnpd-nftables ships only the binary and its nft scripts: no maintainer scripts,
# no service. The service, its debconf questions and its config live in Debian's
# `miniupnpd` package, which we do not install, so nothing starts behind our back.
APT_PACKAGES=(
    iproute2
    nftables
    natpmpc
    miniupnpc
    miniupnpd-nftables
    conntrack
    hping3
    netsniff-ng
    ethtool
    socat
    iputils-ping
    procps
    tshark
    systemd
    util-linux
    python3
    chromium
    chromium-driver
)

die() {
    echo "dev.sh: $*" >&2
    exit 1
}

missing_packages() {
    local pkg
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
            echo "$pkg"
        fi
    done
}

apt_install() {
    local missing
    mapfile -t missing < <(missing_packages "$@")
    if ((${#missing[@]} == 0)); then
        return 0
    fi
    echo "dev.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
}

setup() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and builds network namespaces)"
    command -v apt-get >/dev/null || die "needs a Debian machine (apt-get not found)"
    apt_install "${APT_PACKAGES[@]}"

    # The machine's python3 may not be Debian's (pyenv): use whichever `python3` is first,
    # and fall back to Debian's venv module only if that one cannot make a venv.
    if [[ ! -x .venv/bin/python ]]; then
        if ! command -v python3 >/dev/null; then
            apt_install python3 python3-venv
        elif ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
            apt_install python3-venv
        fi
        python3 -m venv .venv
    fi
    # Reinstall when pyproject.toml changed since the last install.
    local stamp=.venv/.igd-installed
    if [[ ! -f $stamp || pyproject.toml -nt $stamp ]] || ! .venv/bin/python -c 'import igd' 2>/dev/null; then
        .venv/bin/python -m pip install -q -e '.[test]'
        touch "$stamp"
    fi
}

run_tests() {
    local status=0
    # pytest first, so its results always show; then the linters. Fail if any failed.
    .venv/bin/pytest -q || status=$?
    .venv/bin/ruff check igd lab tests || status=$((status ? status : 1))
    .venv/bin/ruff format --check igd lab tests || status=$((status ? status : 1))
    .venv/bin/mypy || status=$((status ? status : 1))
    if ((status != 0)); then
        echo "dev.sh: test FAILED (exit $status)" >&2
    fi
    return "$status"
}

usage() {
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

case "${1:-}" in
setup) setup ;;
demo)
    setup
    .venv/bin/python -m lab demo
    ;;
lab)
    # The lab is not installed with igd: it runs from this checkout (the cd above).
    [[ -x .venv/bin/python ]] || setup
    shift
    exec .venv/bin/python -m lab "$@"
    ;;
test)
    setup
    run_tests
    ;;
bench)
    setup
    shift
    # About 8 minutes with the defaults; docs/performance.md explains the method. The report
    # is printed and written to build/ (ignored by git); a later --output wins.
    .venv/bin/python -m lab.bench --output build/bench-results.md "$@"
    ;;
fuzz)
    setup
    shift
    # The properties marked `fuzz` (decoders of network input, random bytes at the live HTTP
    # and SSDP sockets) with IGD_FUZZ_EXAMPLES examples each (default 10000): about 5 minutes.
    .venv/bin/pytest -q -m fuzz --hypothesis-profile=fuzz "$@"
    ;;
*) usage ;;
esac
