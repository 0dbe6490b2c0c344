#!/usr/bin/env bash
# Set up .venv (if needed) and run the offline demo. This is the README's first command.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[cpu]'
exec .venv/bin/python demo.py "$@"
