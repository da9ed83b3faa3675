#!/usr/bin/env bash
# Flame graph of a BeTrace worker under load (py-spy, sampling, no code changes).
#
# Runs benchmarks/loadtest.py at RATE spans/s for DURATION seconds and, after
# the warm-up (the first 20 % of the run), records worker TARGET with py-spy
# until the load ends. The SVG opens in a browser; the widest frames are where
# the worker spends its time.
#
#   benchmarks/profile.sh                                   # 1 worker, all stages
#   RATE=40000 benchmarks/profile.sh --split-ingest         # the downstream worker (w0)
#   TARGET=ingest0 OUT=benchmarks/flamegraph-ingest.svg benchmarks/profile.sh --split-ingest
#   benchmarks/profile.sh --brokers 127.0.0.1:19092         # extra arguments go to loadtest.py
#
# py-spy attaches with ptrace: run as root, or grant CAP_SYS_PTRACE, or set
# kernel.yama.ptrace_scope=0. The producers are not required to reach RATE
# here (a profile is still useful when the machine is saturated).
set -euo pipefail
cd "$(dirname "$0")/.."

RATE=${RATE:-30000}
DURATION=${DURATION:-30}
WORKERS=${WORKERS:-1}
TARGET=${TARGET:-w0}
OUT=${OUT:-benchmarks/flamegraph-pipeline.svg}

if [[ ! -x .venv/bin/py-spy ]]; then
    echo "error: .venv/bin/py-spy not found; run 'make setup' (py-spy is a dev dependency)" >&2
    exit 1
fi
if [[ $(id -u) -ne 0 ]] && [[ $(cat /proc/sys/kernel/yama/ptrace_scope 2>/dev/null || echo 0) -ne 0 ]]; then
    echo "error: py-spy needs ptrace: run as root or set kernel.yama.ptrace_scope=0" >&2
    exit 1
fi

exec .venv/bin/python benchmarks/loadtest.py \
    --rate "$RATE" --duration "$DURATION" --workers "$WORKERS" \
    --py-spy "$OUT" --py-spy-target "$TARGET" --min-produce-ratio 0 "$@"
