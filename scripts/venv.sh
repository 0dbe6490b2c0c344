# Sourced by demo.sh and test.sh: make .venv if it is missing and install the project with the
# extras in $1 into it (pip makes a second run fast).
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[$1]"
