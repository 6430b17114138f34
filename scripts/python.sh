#!/usr/bin/env bash
# Print the Python interpreter muonlab uses: $PYTHON if set, the active virtualenv / conda env,
# else the project's own ./.venv.
if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"
elif [ -n "${VIRTUAL_ENV:-}" ] || [ -n "${CONDA_PREFIX:-}" ]; then echo python
else echo .venv/bin/python
fi
