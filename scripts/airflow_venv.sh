#!/usr/bin/env bash
# Create .airflow-venv at the repository root (if absent) with Airflow and its Kubernetes
# provider, pinned: the environment in which tests/deploy/test_airflow_dag.py loads the nightly
# DAG with Airflow's own DagBag (Airflow pins libraries Beam needs other versions of, so it gets
# a virtualenv of its own). About 65 s and 450 MB on the project's machine.
# Usage: bash scripts/airflow_venv.sh [folder]   (default: .airflow-venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.airflow-venv}"
PY="${PYTHON:-python3}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import airflow.providers.cncf.kubernetes" \
    2>/dev/null; then
  exit 0
fi
"$PY" -m venv "$VENV"
LOG="$VENV/install.log"
echo "installing Airflow into $VENV (log: $LOG) ..."
"$VENV/bin/python" -m pip install -q "apache-airflow==3.3.2" \
  "apache-airflow-providers-cncf-kubernetes==10.25.0" >"$LOG" 2>&1 \
  || { tail -40 "$LOG" >&2; echo "Airflow install failed (log: $LOG)" >&2; exit 1; }
