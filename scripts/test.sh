#!/usr/bin/env bash
# Install (with test extras), then run the default test suite and, as a separate step, the
# cases marked slow.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
bash scripts/airflow_venv.sh          # Airflow in its own venv, for the DAG test (~65 s once)
. .venv/bin/activate
export GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
python -m pytest -q -p no:cacheprovider --durations=15
# Slow cases run here as their own step; "no tests selected" (exit 5) is not a failure.
python -m pytest -q -p no:cacheprovider -m slow || [ $? -eq 5 ]
