#!/usr/bin/env bash
# Set up .venv (if needed) and run the offline demo. This is the README's first command.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh cpu
exec .venv/bin/python demo.py "$@"
