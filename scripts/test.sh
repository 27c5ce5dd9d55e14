#!/usr/bin/env bash
# The test command: sets everything up on a fresh machine, starts nothing by hand,
# and runs the whole suite (a real DuckDB file, a real PostgreSQL server that the
# fixtures start on a free loopback port, one private local Ray per session).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/ensure-postgres.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export NEVE_PROGRESS=0
python -m pytest -p no:cacheprovider "$@"
