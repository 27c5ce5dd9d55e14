"""Two nodes: a ``ray.cluster_utils.Cluster`` of 2 nodes x 2 CPUs, in its own process.

The test session already runs a local Ray instance, and a process can be
connected to only one, so the cluster, the driver and its fits live in a child
Python process that prints one ``RESULT`` line of JSON and shuts everything down.
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
    import json, os, sys
    import numpy as np, pandas as pd
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    try:
        ray.init(address=cluster.address, include_dashboard=False, logging_level="ERROR")
        cluster.wait_for_nodes()
        from neve._internal.runtime import group
        from neve.lightgbm import LightGBMEstimator
        from neve.xgboost import XGBEstimator

        groups = []
        acquire = group.acquire

        def spy(layout):
            groups.append(acquire(layout))
            return groups[-1]

        group.acquire = spy  # the runner takes its worker group through this

        rng = np.random.default_rng(0)
        x = rng.normal(size=(6000, 3))
        frame = pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2]})
        frame["y"] = 2 * frame["a"] - frame["b"] + rng.normal(scale=0.1, size=6000)

        xgb_est = XGBEstimator(n_estimators=30, params={"max_depth": 3, "eta": 0.3})
        booster = xgb_est.fit(frame, ["a", "b", "c"], "y", eval_set=frame)
        cover = json.loads(booster.get_dump(with_stats=True, dump_format="json")[0])["cover"]
        lgb_est = LightGBMEstimator(n_estimators=30, params={"num_leaves": 7, "learning_rate": 0.3})
        lgb_booster = lgb_est.fit(frame, ["a", "b", "c"], "y", eval_set=frame)
        lgb_count = lgb_booster.dump_model()["tree_info"][0]["tree_structure"]["internal_count"]

        def rmse(p):
            return float(np.sqrt(np.mean((p - frame["y"].to_numpy()) ** 2)))

        print("RESULT " + json.dumps({
            "nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
            "layouts": [repr(g.layout) for g in groups],
            "same_group": len({id(g) for g in groups}) == 1,
            "workers": [
                {"rank": w.rank, "node_id": w.node_id, "node_rank": w.node_rank,
                 "local_rank": w.local_rank, "pid": w.pid}
                for w in groups[0].workers
            ],
            "xgb_rmse": rmse(xgb_est.predict(frame)),
            "xgb_eval_rmse": xgb_est.get_eval_results()["eval"]["rmse"][-1],
            "xgb_root_cover": cover,
            "lgb_rmse": rmse(lgb_est.predict(frame)),
            "lgb_root_count": lgb_count,
            "rows": len(frame),
        }), flush=True)
    finally:
        group.shutdown_idle()
        ray.shutdown()
        cluster.shutdown()
    """
)


@pytest.mark.timeout(240)
def test_default_scaling_puts_one_worker_on_each_node() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Ray's cluster mode off: every node of the test cluster binds 127.0.0.1 only.
    env.update(NEVE_PROGRESS="0", RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=220, env=env
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])

    assert len(result["nodes"]) == 2
    # num_workers=-1: one worker per node with all of its CPUs, XGBoost and LightGBM alike.
    assert result["layouts"] == [
        "Layout(num_groups=2, workers_per_group=1, cpus_per_worker=2, gpus_per_worker=0.0, "
        "distinct_nodes=True)"
    ] * 2
    assert result["same_group"]  # LightGBM's fit reused XGBoost's warm workers
    workers = result["workers"]
    assert [w["rank"] for w in workers] == [0, 1]
    assert sorted(w["node_id"] for w in workers) == result["nodes"]  # one on each node
    assert [w["node_rank"] for w in workers] == [0, 1]
    assert [w["local_rank"] for w in workers] == [0, 0]
    # Sane models, grown on the rows of both nodes.
    assert result["xgb_root_cover"] == pytest.approx(result["rows"])
    assert result["lgb_root_count"] == result["rows"]
    # y has a standard deviation of about 2.2: predicting its mean scores that.
    assert result["xgb_rmse"] < 0.3 and result["lgb_rmse"] < 0.3
    assert result["xgb_eval_rmse"] == pytest.approx(result["xgb_rmse"], rel=1e-4)
