"""The nightly's Airflow DAG (deploy/nightly/airflow_dag.py), loaded by Airflow's own DagBag in an
environment of its own (Airflow and Beam pin different libraries): it imports without errors,
runs the nightly as separate tasks in reindex.sh's order, maps the exit statuses (store busy ->
skip, gate refused -> no retry) and passes JSON summaries between tasks through XCom.

The environment: a virtualenv with Airflow and the Kubernetes provider, made by
`bash scripts/airflow_venv.sh` (scripts/test.sh, and so CI, runs it: .airflow-venv at the
repository root); REMAP_AIRFLOW_PYTHON names another one's python.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAG_FILE = ROOT / "deploy" / "nightly" / "airflow_dag.py"
AIRFLOW_PYTHON = os.environ.get("REMAP_AIRFLOW_PYTHON",
                                str(ROOT / ".airflow-venv" / "bin" / "python"))

LOAD = r"""
import json, sys
from airflow.models.dagbag import DagBag

bag = DagBag(dag_folder=sys.argv[1])
out = {"import_errors": {str(k): str(v) for k, v in bag.import_errors.items()}, "dags": {}}
for dag_id, dag in bag.dags.items():
    tasks = {}
    for t in dag.tasks:
        tasks[t.task_id] = {
            "type": type(t).__name__, "downstream": sorted(t.downstream_task_ids),
            "retries": t.retries, "trigger_rule": str(t.trigger_rule.value
                                                       if hasattr(t.trigger_rule, "value")
                                                       else t.trigger_rule),
            "skip_on_exit_code": sorted(getattr(t, "skip_on_exit_code", None) or []),
            "do_xcom_push": getattr(t, "do_xcom_push", None),
            "arguments": list(getattr(t, "arguments", None) or []),
            "cmds": list(getattr(t, "cmds", None) or []),
        }
    out["dags"][dag_id] = {"tasks": tasks, "max_active_runs": dag.max_active_runs}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    if not os.path.exists(AIRFLOW_PYTHON):
        pytest.skip(f"no Airflow environment at {AIRFLOW_PYTHON}: make one with `bash "
                    f"scripts/airflow_venv.sh` (or set REMAP_AIRFLOW_PYTHON)")
    home = tmp_path_factory.mktemp("airflow_home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               AIRFLOW__CORE__UNIT_TEST_MODE="True")
    done = subprocess.run([AIRFLOW_PYTHON, "-c", LOAD, str(DAG_FILE)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_dag_loads_in_airflows_dagbag_without_import_errors(loaded):
    assert loaded["import_errors"] == {}
    assert list(loaded["dags"]) == ["remap_nightly_reindex"]
    assert loaded["dags"]["remap_nightly_reindex"]["max_active_runs"] == 1


def test_the_nightly_runs_as_separate_tasks_in_reindex_order(loaded):
    tasks = loaded["dags"]["remap_nightly_reindex"]["tasks"]
    order = ["embed", "plan", "needs_index", "build_index", "gate", "publish", "prune"]
    assert sorted(tasks) == sorted(order)
    for a, b in zip(order, order[1:]):
        assert b in tasks[a]["downstream"], (a, b)
    assert tasks["needs_index"]["downstream"] == ["build_index", "prune"]   # keep -> prune only
    assert tasks["prune"]["trigger_rule"] == "none_failed"
    script = {t: " ".join(v["arguments"]) for t, v in tasks.items()}
    assert "remap embed " in script["embed"] and "--runner=DataflowRunner" in script["embed"]
    assert "remap index-beam " in script["build_index"]
    for step in ("plan", "check", "publish", "prune"):
        task = "gate" if step == "check" else step
        assert f"index_pointer.py {step} " in script[task]


def test_exit_statuses_are_mapped_and_json_summaries_go_through_xcom(loaded):
    tasks = loaded["dags"]["remap_nightly_reindex"]["tasks"]
    assert tasks["embed"]["skip_on_exit_code"] == [75]          # store busy: skip the night
    assert tasks["gate"]["retries"] == 0                          # refused: refused again
    assert all(tasks[t]["retries"] == 1 for t in ("embed", "build_index", "publish"))
    pods = [t for t, v in tasks.items() if v["type"] == "KubernetesPodOperator"]
    assert len(pods) == 6
    for t in pods:
        assert tasks[t]["do_xcom_push"] and tasks[t]["cmds"] == ["bash", "-c"]
        assert "pipefail" in tasks[t]["arguments"][0]
        assert "> /airflow/xcom/return.json" in tasks[t]["arguments"][0]
    target = "ti.xcom_pull(task_ids='plan')['target']"
    for t in ("build_index", "gate", "publish"):
        assert target in tasks[t]["arguments"][0]


def test_the_index_task_passes_only_options_remap_index_beam_defines():
    """The DAG's default index-build flags are IndexBuildOptions' (read from the file, so this
    runs without Airflow)."""
    import re

    from pipelines.options import unknown_options

    text = DAG_FILE.read_text()
    default = re.search(r"remap_index_beam_args', \"\s*\"'([^']*)'", text) or \
        re.search(r"remap_index_beam_args',\s*\"?\s*'([^']*)'", text)
    flags = default.group(1).split()
    assert flags and unknown_options(flags) == []
