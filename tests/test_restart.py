"""Restart after a lost worker: every worker restarts from rank 0's last checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_no_reservations, make_frame
from neve.exceptions import WorkerError

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(180)]

INPUTS = ["f0", "f1", "f2", "f3"]


def _kill_rank_1_once(marker: Path, at_round: int):  # type: ignore[no-untyped-def]
    """A callback that kills rank 1's process at ``at_round``, the first time only."""

    def should_die(round_: int) -> bool:
        from neve._internal.context import current

        ctx = current()
        if ctx is not None and ctx.rank == 1 and round_ == at_round and not marker.exists():
            marker.touch()
            return True
        return False

    return should_die


def _xgboost_killer(marker: Path, at_round: int):  # type: ignore[no-untyped-def]
    """An xgboost callback that kills rank 1's process at ``at_round``, once."""
    import xgboost as xgb

    should_die = _kill_rank_1_once(marker, at_round)

    class KillOnce(xgb.callback.TrainingCallback):
        def after_iteration(self, model, epoch, evals_log):  # type: ignore[no-untyped-def]
            if should_die(epoch):
                os._exit(1)
            return False

    return KillOnce()


def test_xgboost_resumes_from_the_checkpoint_and_matches_an_uninterrupted_fit(
    tmp_path: Path,
) -> None:
    from neve.xgboost import XGBEstimator, XGBScalingConfig

    kill_once = _xgboost_killer(tmp_path / "killed", at_round=7)

    frame = make_frame(4_000, seed=5)
    scaling = XGBScalingConfig(num_workers=2, num_cpu_per_worker=1)
    plain = XGBEstimator(n_estimators=20, scaling_config=scaling)
    plain.fit(frame, INPUTS, "y", eval_set=frame)
    restarted = XGBEstimator(n_estimators=20, scaling_config=scaling, callbacks=[kill_once])
    booster = restarted.fit(frame, INPUTS, "y", eval_set=frame, max_failures=1)

    assert (tmp_path / "killed").exists()  # the worker really died once
    assert booster.num_boosted_rounds() == 20
    history = restarted.get_eval_results()["eval"]["rmse"]
    assert len(history) == 20
    np.testing.assert_allclose(history, plain.get_eval_results()["eval"]["rmse"], rtol=1e-6)
    np.testing.assert_allclose(restarted.predict(frame), plain.predict(frame), rtol=1e-5)
    assert_no_reservations()


def test_lightgbm_resumes_from_the_checkpoint(tmp_path: Path) -> None:
    from neve.lightgbm import LightGBMEstimator, LightGBMScalingConfig

    should_die = _kill_rank_1_once(tmp_path / "killed", at_round=6)

    def kill_once(env) -> None:  # type: ignore[no-untyped-def]
        if should_die(env.iteration):
            os._exit(1)

    frame = make_frame(4_000, seed=6)
    scaling = LightGBMScalingConfig(num_workers=2, num_cpu_per_worker=1)
    estimator = LightGBMEstimator(n_estimators=20, scaling_config=scaling, callbacks=[kill_once])
    booster = estimator.fit(frame, INPUTS, "y", eval_set=frame, max_failures=2)
    assert (tmp_path / "killed").exists()
    assert booster.current_iteration() == 20
    history = estimator.get_eval_results()["eval"]["l2"]
    assert len(history) == 20
    assert history[-1] < history[0] / 2
    assert_no_reservations()


def test_without_max_failures_a_lost_worker_fails_the_fit(tmp_path: Path) -> None:
    from neve.xgboost import XGBEstimator, XGBScalingConfig

    kill_once = _xgboost_killer(tmp_path / "killed", at_round=3)

    estimator = XGBEstimator(n_estimators=10, callbacks=[kill_once],
                             scaling_config=XGBScalingConfig(num_workers=2, num_cpu_per_worker=1))
    with pytest.raises(WorkerError, match="rank 1") as info:
        estimator.fit(make_frame(2_000), INPUTS, "y")
    assert info.value.rank == 1
    assert_no_reservations()
