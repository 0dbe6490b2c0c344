#!/usr/bin/env bash
# Set up .venv (if needed) and run the test suite. This is the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh cpu,test
exec .venv/bin/python -m pytest "$@"
