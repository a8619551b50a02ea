#!/usr/bin/env bash
# Runs jobs/submit.py with the project's Python: the active venv, else this checkout's .venv, else python3.
# Usage: jobs/submit.sh run|train|tune CONFIG [key=value ...] [--resume] [--no-wait]   (see jobs/README.md)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
  python="$VIRTUAL_ENV/bin/python"
elif [[ -x "$here/../.venv/bin/python" ]]; then
  python="$here/../.venv/bin/python"
else
  python=python3
fi
exec "$python" "$here/submit.py" "$@"
