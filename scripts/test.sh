#!/usr/bin/env bash
# Set up .venv (if needed) and run the test suite. This is the README's test command.
#
# Plainly it leaves out the tests marked `slow` (the heavier proofs, over 10 s each on 2 cores),
# so that it takes about 10 minutes there; with CI=true (as CI runs it), with --all, with -m, or
# with tests named by path, it runs what pytest would.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh cpu,test
all=
args=()
for a in "$@"; do
    case "$a" in
        --all) all=1 ;;
        -m*|tests/*|./tests/*) all=1; args+=("$a") ;;
        *) args+=("$a") ;;
    esac
done
ci=${CI:-}
if [ "${ci,,}" = true ]; then
    all=1
fi
if [ -z "$all" ]; then
    echo "scripts/test.sh: leaving out the tests marked slow; --all runs them too (CI does)" >&2
    args=(-m 'not slow' "${args[@]}")
fi
exec .venv/bin/python -m pytest "${args[@]}"
