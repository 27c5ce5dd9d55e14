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


@pytest.mark.parametrize("at_round", [0, 7])
def test_xgboost_restarts_and_matches_an_uninterrupted_fit(tmp_path: Path, at_round: int) -> None:
    """Killed before its first checkpoint (round 0: it starts over) or after one
    (round 7: it goes on from round 6), with the default max_failures=1."""
    from neve.xgboost import XGBEstimator, XGBScalingConfig

    kill_once = _xgboost_killer(tmp_path / "killed", at_round=at_round)

    frame = make_frame(4_000, seed=5)
    scaling = XGBScalingConfig(num_workers=2, num_cpu_per_worker=1)
    plain = XGBEstimator(n_estimators=20, scaling_config=scaling)
    plain.fit(frame, INPUTS, "y", eval_set=frame)
    restarted = XGBEstimator(n_estimators=20, scaling_config=scaling, callbacks=[kill_once])
    booster = restarted.fit(frame, INPUTS, "y", eval_set=frame)

    assert (tmp_path / "killed").exists()  # the worker really died once
    assert booster.num_boosted_rounds() == 20
    history = restarted.get_eval_results()["eval"]["rmse"]
    assert len(history) == 20
    np.testing.assert_allclose(history, plain.get_eval_results()["eval"]["rmse"], rtol=1e-6)
    np.testing.assert_allclose(restarted.predict(frame), plain.predict(frame), rtol=1e-5)
    assert_no_reservations()


@pytest.mark.parametrize("at_round", [0, 6])
def test_lightgbm_restarts_and_matches_an_uninterrupted_fit(tmp_path: Path,
                                                            at_round: int) -> None:
    from neve.lightgbm import LightGBMEstimator, LightGBMScalingConfig

    should_die = _kill_rank_1_once(tmp_path / "killed", at_round=at_round)

    def kill_once(env) -> None:  # type: ignore[no-untyped-def]
        if should_die(env.iteration):
            os._exit(1)

    frame = make_frame(4_000, seed=6)
    scaling = LightGBMScalingConfig(num_workers=2, num_cpu_per_worker=1)
    plain = LightGBMEstimator(n_estimators=20, scaling_config=scaling)
    plain.fit(frame, INPUTS, "y", eval_set=frame)
    estimator = LightGBMEstimator(n_estimators=20, scaling_config=scaling, callbacks=[kill_once])
    booster = estimator.fit(frame, INPUTS, "y", eval_set=frame, max_failures=2)
    assert (tmp_path / "killed").exists()
    assert booster.current_iteration() == 20
    history = estimator.get_eval_results()["eval"]["l2"]
    assert len(history) == 20
    np.testing.assert_allclose(history, plain.get_eval_results()["eval"]["l2"], rtol=1e-6)
    np.testing.assert_allclose(estimator.predict(frame), plain.predict(frame), rtol=1e-6)
    assert_no_reservations()


def test_with_max_failures_0_a_lost_worker_fails_the_fit(tmp_path: Path) -> None:
    from neve.xgboost import XGBEstimator, XGBScalingConfig

    kill_once = _xgboost_killer(tmp_path / "killed", at_round=3)

    estimator = XGBEstimator(n_estimators=10, callbacks=[kill_once],
                             scaling_config=XGBScalingConfig(num_workers=2, num_cpu_per_worker=1))
    with pytest.raises(WorkerError, match="rank 1") as info:
        estimator.fit(make_frame(2_000), INPUTS, "y", max_failures=0)
    assert info.value.rank == 1
    assert "No restart was tried: max_failures=0" in str(info.value)
    assert_no_reservations()


def test_when_every_restart_is_used_the_error_says_what_was_tried(tmp_path: Path) -> None:
    """Rank 1 dies in every attempt: two restarts, then an error listing both."""
    import xgboost as xgb

    from neve.xgboost import XGBEstimator, XGBScalingConfig

    class AlwaysKill(xgb.callback.TrainingCallback):
        def after_iteration(self, model, epoch, evals_log):  # type: ignore[no-untyped-def]
            from neve._internal.context import current

            ctx = current()
            if ctx is not None and ctx.rank == 1 and epoch == 4:
                os._exit(1)
            return False

    estimator = XGBEstimator(n_estimators=20, callbacks=[AlwaysKill()],
                             scaling_config=XGBScalingConfig(num_workers=2, num_cpu_per_worker=1))
    with pytest.raises(WorkerError) as info:
        estimator.fit(make_frame(2_000), INPUTS, "y", max_failures=2)
    message = str(info.value)
    assert "Every restart was used (max_failures=2)" in message
    assert "1. worker rank 1" in message and "2. worker rank 1" in message
    assert "from the checkpoint at round 4" in message
    assert_no_reservations()


def test_an_exception_in_user_code_is_never_retried(tmp_path: Path) -> None:
    import xgboost as xgb

    from neve.xgboost import XGBEstimator, XGBScalingConfig

    calls = tmp_path / "calls"

    class Raise(xgb.callback.TrainingCallback):
        def after_iteration(self, model, epoch, evals_log):  # type: ignore[no-untyped-def]
            with open(calls, "a") as handle:
                handle.write("x")
            raise ValueError("a bug in my callback")

    estimator = XGBEstimator(n_estimators=5, callbacks=[Raise()],
                             scaling_config=XGBScalingConfig(num_workers=2, num_cpu_per_worker=1))
    with pytest.raises(WorkerError, match="a bug in my callback"):
        estimator.fit(make_frame(1_000), INPUTS, "y", max_failures=3)
    assert len(calls.read_text()) <= 2  # one attempt: each rank's callback ran at most once
    assert_no_reservations()


def test_a_short_fit_restarts_from_the_start_instead_of_checkpointing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Restart checkpoints come no sooner than NEVE_CHECKPOINT_INTERVAL_S apart: a fit
    shorter than that makes none, and a lost worker starts it again from round 0."""
    import logging

    from neve.xgboost import XGBEstimator, XGBScalingConfig

    monkeypatch.setenv("NEVE_CHECKPOINT_INTERVAL_S", "3600")
    kill_once = _xgboost_killer(tmp_path / "killed", at_round=7)
    scaling = XGBScalingConfig(num_workers=2, num_cpu_per_worker=1)
    frame = make_frame(2_000, seed=5)
    estimator = XGBEstimator(n_estimators=20, scaling_config=scaling, callbacks=[kill_once])
    with caplog.at_level(logging.WARNING, logger="neve"):
        booster = estimator.fit(frame, INPUTS, "y")
    assert (tmp_path / "killed").exists()
    assert booster.num_boosted_rounds() == 20
    assert "restarting every worker from the start" in caplog.text
    assert_no_reservations()
