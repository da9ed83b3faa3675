#!/usr/bin/env bash
# Run the whole suite (unit, integration against a real local Kafka, chaos).
# pytest's exit code 5 ("no tests collected") is a failure here, not a pass.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
.venv/bin/python -m pytest "$@"
code=$?
if [[ $code -eq 5 ]]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit $code
