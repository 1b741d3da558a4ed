#!/usr/bin/env bash
# Installs what linkedge needs on a Debian machine into ./.venv (idempotent).
#   deploy/bootstrap.sh          runtime + demo (Debian: pebble, python3-venv)
#   deploy/bootstrap.sh --test   also the test tools (curl, openssl, chromium, promtool, pytest, playwright)
#   deploy/bootstrap.sh --bench  also the peers and tools of tests/benchmarks/bench_peers.py
#                                (caddy, nginx-light, py-spy, uvloop) and of bench_burst_memory.py
#                                (nghttp2-client: h2load); CI does not need them
set -euo pipefail
cd "$(dirname "$0")/.."

with_tests=0
with_bench=0
for arg in "$@"; do
    case "$arg" in
        --test) with_tests=1 ;;
        --bench) with_bench=1 ;;
        *) echo "bootstrap: unknown option $arg" >&2; exit 2 ;;
    esac
done

sudo_if_needed() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

debs=(pebble ca-certificates)
# chromium: the status page is tested in a real headless browser (Playwright drives
# Debian's build; Playwright's own browser download is not used)
# postgresql: the fleet store; the tests start throwaway clusters of it
# prometheus: its promtool checks and unit-tests deploy/prometheus/linkedge-alerts.yml
((with_tests)) && debs+=(curl openssl chromium prometheus postgresql)
((with_bench)) && debs+=(caddy nginx-light nghttp2-client)
missing=()
for pkg in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    missing+=(python3-venv)
fi
if ((${#missing[@]})); then
    echo "bootstrap: installing Debian packages: ${missing[*]}"
    sudo_if_needed apt-get update -qq
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
extra=""
((with_tests)) && extra="[test]"
.venv/bin/pip install -q --disable-pip-version-check -e ".${extra}"
if ((with_tests)); then
    # sslyze (the TLS profile test) pins cryptography<47 while acme needs >=47: it gets a
    # virtualenv of its own, so neither constrains the project's dependencies
    if [[ ! -x .venv-sslyze/bin/python ]]; then
        python3 -m venv .venv-sslyze
    fi
    .venv-sslyze/bin/pip install -q --disable-pip-version-check "sslyze>=6.1,<7"
fi
if ((with_bench)); then
    .venv/bin/pip install -q --disable-pip-version-check py-spy uvloop
fi
