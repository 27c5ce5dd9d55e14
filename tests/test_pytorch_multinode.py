"""Two nodes (ray.cluster_utils.Cluster, in its own process): one worker per node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")


@pytest.mark.timeout(240)
def test_one_worker_on_each_of_two_nodes(tmp_path: Path) -> None:
    script = Path(__file__).with_name("_two_node_torch.py")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "stage")],
        capture_output=True, text=True, timeout=220, env=env,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    workers = sorted(result["workers"], key=lambda w: w["rank"])
    assert [w["node_rank"] for w in workers] == [0, 1]
    assert [w["local_rank"] for w in workers] == [0, 0]
    assert workers[0]["node_id"] != workers[1]["node_id"]
    assert all(w["sum"] == 3.0 for w in workers)  # a real allreduce across the nodes
    published = Path(result["model_dir"])
    assert published.parent == tmp_path / "stage" / "model"
    assert json.loads((published / "workers.json").read_text()) == result["workers"]
