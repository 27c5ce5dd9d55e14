#!/usr/bin/env bash
# The main job: sets neve up, then trains XGBoost, LightGBM and a PyTorch MLP on a
# generated credit-risk table in a local DuckDB file, on a private local Ray.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
exec neve demo "$@"
