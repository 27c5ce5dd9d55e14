"""The GPU path: one worker per GPU, xgboost on ``device="cuda"`` (skipped without a GPU)."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import pytest

from conftest import make_frame

INPUTS = ["f0", "f1", "f2", "f3"]


def visible_gpus() -> int:
    """GPUs this machine shows (torch if it is installed, else nvidia-smi)."""
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.device_count())
    except ImportError:
        pass
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                 timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


@pytest.mark.gpu
@pytest.mark.timeout(180)
def test_xgboost_fits_on_gpus(ray_session: None, groups: list[Any]) -> None:
    if visible_gpus() == 0:
        pytest.skip("no NVIDIA GPU on this machine")
    import ray
    import xgboost as xgb

    if not xgb.build_info().get("USE_CUDA"):
        pytest.skip("this xgboost is built without CUDA (xgboost-cpu): pip install xgboost")
    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the session's Ray instance sees no GPU")

    from neve._internal.runtime import group
    from neve.xgboost import XGBEstimator, XGBScalingConfig

    frame = make_frame(20_000, seed=4)
    estimator = XGBEstimator(n_estimators=20, params={"max_depth": 6},
                             scaling_config=XGBScalingConfig(num_workers=1, use_gpu=True))
    booster = estimator.fit(frame, INPUTS, "y", eval_set=frame)
    (workers,) = groups
    assert workers.layout.gpus_per_worker == 1
    assert workers.workers[0].gpu_ids  # Ray gave the worker a GPU
    config = json.loads(booster.save_config())
    assert config["learner"]["generic_param"]["device"].startswith("cuda")
    history = estimator.get_eval_results()["eval"]["rmse"]
    assert history[-1] < 0.5 * history[0]
    group.shutdown_idle()
