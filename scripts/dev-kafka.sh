#!/usr/bin/env bash
# Local Apache Kafka (KRaft) for development, tests and CI.
#
#   scripts/dev-kafka.sh up [--brokers N] [--port P]   start (fetches jars once, needs Java 17+ and Maven)
#   scripts/dev-kafka.sh status                        nodes, pids, ports (exit 3 if not ready)
#   scripts/dev-kafka.sh down                          stop, keep data
#   scripts/dev-kafka.sh clean                         stop and delete .dev/kafka
#   scripts/dev-kafka.sh describe-group GROUP          Kafka's kafka-consumer-groups --describe
#   scripts/dev-kafka.sh --help                        everything else
#
# Thin wrapper around `python -m betrace.dev.kafka` (src/betrace/dev/kafka.py).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "$repo/.venv/bin/python" ]]; then
    python="$repo/.venv/bin/python"
else
    python="python3"
fi

if [[ $# -eq 0 ]]; then
    set -- --help
fi

# Subcommand options (--root is added so it works from any directory).
case "$1" in
    up | down | clean | status | fetch | describe-group)
        cmd="$1"
        shift
        set -- "$cmd" --root "$repo" "$@"
        ;;
esac

export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m betrace.dev.kafka "$@"
