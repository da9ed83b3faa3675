#!/usr/bin/env bash
# Install everything BeTrace needs on a fresh machine, idempotently:
#   - Java 17+, Maven and redis-server (Debian packages) when missing and we are root,
#   - a Python 3.11 virtualenv in .venv with the pinned dependencies,
#   - the Apache Kafka jars, fetched once with Maven into .cache/kafka.
# Re-running is cheap: each step is skipped when already done.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

need_apt=()
command -v java >/dev/null 2>&1 || need_apt+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || need_apt+=(maven)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
if ((${#need_apt[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        say "installing ${need_apt[*]} with apt-get"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
    else
        echo "error: please install ${need_apt[*]} (Java 17+ and Maven run the local Kafka broker, redis-server the cache tier)" >&2
        exit 1
    fi
fi

python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
            python="$candidate"
            break
        fi
    done
fi
if [[ -z "$python" ]]; then
    echo "error: BeTrace needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi

stamp=.venv/.betrace-installed
want="$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    say "creating .venv with $("$python" --version) and the pinned dependencies"
    [[ -x .venv/bin/python ]] || "$python" -m venv .venv
    .venv/bin/python -m pip install -q -c requirements.lock -e ".[dev]"
    echo "$want" >"$stamp"
fi

say "fetching Apache Kafka with Maven (cached in .cache/kafka)"
.venv/bin/python -m betrace.dev.kafka fetch --root "$repo" >/dev/null
