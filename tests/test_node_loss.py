"""Node loss: a node of a two-node test cluster is removed in the middle of a fit.

As in ``test_gbdt_multinode``, the cluster and its driver live in a child process
(a process joins one Ray instance, and the session already runs one). The head
node has no CPUs; workers run on two worker nodes. When the node of rank 1 goes:

* 2 workers x 1 CPU: the other node has room for both, so the fit completes there;
* one worker per node (``num_workers=-1``): the layout no longer fits, and a clear
  error naming the lost node comes within 30 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, threading, time
    import numpy as np, pandas as pd
    import ray
    import xgboost as xgb
    from ray.cluster_utils import Cluster

    mode = sys.argv[1]
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=2), cluster.add_node(num_cpus=2)]
    marker = sys.argv[2]
    try:
        ray.init(address=cluster.address, include_dashboard=False, logging_level="ERROR")
        cluster.wait_for_nodes()
        from neve._internal.runtime import group
        from neve.xgboost import XGBEstimator, XGBScalingConfig

        groups = []
        acquire = group.acquire

        def spy(layout):
            groups.append(acquire(layout))
            return groups[-1]

        group.acquire = spy

        class Slow(xgb.callback.TrainingCallback):
            def after_iteration(self, model, epoch, evals_log):
                if epoch == 3:
                    open(marker, "a").close()
                time.sleep(0.3)
                return False

        def remove_rank_1_node():
            while not os.path.exists(marker):
                time.sleep(0.05)
            node_id = groups[0].workers[1].node_id
            (node,) = [n for n in nodes if n.node_id == node_id]
            removed.append((node_id, time.time()))
            cluster.remove_node(node)

        removed = []
        remover = threading.Thread(target=remove_rank_1_node, daemon=True)
        remover.start()
        rng = np.random.default_rng(0)
        frame = pd.DataFrame(rng.normal(size=(4000, 3)), columns=["a", "b", "c"])
        frame["y"] = 2 * frame["a"] - frame["b"]
        workers = 2 if mode == "fits" else -1
        scaling = XGBScalingConfig(num_workers=workers, num_cpu_per_worker=1)
        out = {"mode": mode}
        try:
            booster = XGBEstimator(n_estimators=20, callbacks=[Slow()],
                                   scaling_config=scaling).fit(frame, ["a", "b", "c"], "y")
            out["rounds"] = booster.num_boosted_rounds()
            out["last_nodes"] = sorted({w.node_id for w in groups[-1].workers})
        except Exception as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
        out["seconds_after_loss"] = time.time() - removed[0][1] if removed else None
        out["removed"] = [node_id for node_id, _ in removed]
        out["groups"] = len(groups)
        print("RESULT " + json.dumps(out), flush=True)
        # The fit can fail while remove_node() is still waiting on the node's
        # processes; Cluster.shutdown() would then remove the same node again.
        remover.join(timeout=60)
    finally:
        group.shutdown_idle()
        ray.shutdown()
        cluster.shutdown()
    """
)


def _run(mode: str, tmp_path: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(NEVE_PROGRESS="0", RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", NEVE_PLACEMENT_TIMEOUT_S="30")
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode, f"{tmp_path}/marker"],
                          capture_output=True, text=True, timeout=280, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    return dict(json.loads(lines[-1][len("RESULT "):]))


@pytest.mark.timeout(300)
def test_losing_a_node_completes_on_what_remains(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = _run("fits", str(tmp_path))
    assert "error" not in result, result
    assert result["rounds"] == 20
    assert len(result["removed"]) == 1
    assert result["groups"] == 2  # a new group after the loss
    assert result["removed"][0] not in result["last_nodes"]  # only the node that remained


@pytest.mark.timeout(300)
def test_losing_a_node_the_layout_needs_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = _run("too-big", str(tmp_path))
    assert "error" in result, result
    error = result["error"]
    assert error.startswith("ResourcesUnavailableError"), result
    assert result["removed"], result
    assert result["removed"][0][:8] in error  # the lost node is named
    assert "rank 1" in error
    assert result["seconds_after_loss"] < 30
