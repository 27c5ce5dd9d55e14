"""XGBEstimator / LightGBMEstimator as a user meets them: the seed's example, the API surface."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from conftest import make_frame
from neve.data import DataConnector
from neve.exceptions import ConfigError, ResourcesUnavailableError
from neve.lightgbm import LightGBMEstimator, LightGBMScalingConfig
from neve.xgboost import XGBEstimator, XGBScalingConfig

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(120)]

INPUTS = ["f0", "f1", "f2", "f3"]
TWO_XGB = XGBScalingConfig(num_workers=2, num_cpu_per_worker=1)
TWO_LGB = LightGBMScalingConfig(num_workers=2, num_cpu_per_worker=1)
EVAL_LINE = re.compile(r"^\[(\d+)\]\ttrain-(\w+):[-\d.]+\teval-\2:[-\d.]+$")


@pytest.fixture(scope="module")
def credit_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DuckDB file shaped like the seed's example: age, income, credit_score -> default_risk."""
    import duckdb

    path = tmp_path_factory.mktemp("credit") / "credit.duckdb"
    con = duckdb.connect(str(path))
    for table, rows, seed in (("TRAINING_DATA", 6_000, 11), ("EVAL_DATA", 1_500, 12)):
        rng = np.random.default_rng(seed)
        age = rng.integers(18, 78, size=rows)
        income = np.round(rng.uniform(15_000, 165_000, size=rows), 2)
        credit_score = rng.integers(300, 850, size=rows)
        logit = 0.04 * (45 - age) - income / 40_000 - (credit_score - 650) / 60 + 1.5
        frame = pd.DataFrame({  # noqa: F841 - read by DuckDB's replacement scan
            "age": age.astype(np.int32),
            "income": income,
            "credit_score": credit_score.astype(np.int32),
            "default_risk": 1 / (1 + np.exp(-logit)),
        })
        con.execute(f"CREATE TABLE {table} AS SELECT * FROM frame")
    con.close()
    return path


def test_the_seed_example_runs_with_only_its_import_and_session_lines_changed(
    credit_db: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    import duckdb
    import xgboost

    session = duckdb.connect(str(credit_db))
    # -- from here on, the seed's code as written (import lines changed) ---------------
    from neve.data import DataConnector

    train_connector = DataConnector.from_dataframe(session.table('TRAINING_DATA'))
    eval_connector = DataConnector.from_dataframe(session.table('EVAL_DATA'))

    from neve.xgboost import XGBEstimator, XGBScalingConfig

    params = {
        'objective': 'reg:squarederror',
        'max_depth': 6,
        'learning_rate': 0.1
    }
    estimator = XGBEstimator(
        params=params
    )
    gpu_estimator = XGBEstimator(  # noqa: F841 - built, as in the seed, never fitted
        params=params,
        scaling_config=XGBScalingConfig(use_gpu=True)
    )
    booster = estimator.fit(
        dataset=train_connector,
        input_cols=['age', 'income', 'credit_score'],
        label_col='default_risk',
        eval_set=eval_connector,
        verbose_eval=10
    )
    booster = estimator.get_booster()
    feature_importance = booster.get_score(importance_type='gain')
    # -- end of the seed's code ---------------------------------------------------------

    out, err = capfd.readouterr()
    lines = [line for line in out.splitlines() if EVAL_LINE.match(line)]
    rounds = [int(EVAL_LINE.match(line).group(1)) for line in lines]  # type: ignore[union-attr]
    # Every 10th of the 100 rounds plus the last, each printed once, by the driver.
    assert rounds == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99], out
    assert all(EVAL_LINE.match(line).group(2) == "rmse" for line in lines)  # type: ignore[union-attr]
    assert "train-rmse" not in err  # no worker copy of them on stderr either
    assert isinstance(booster, xgboost.Booster)
    assert booster.num_boosted_rounds() == 100
    assert booster.feature_names == ['age', 'income', 'credit_score']
    assert set(feature_importance) == {'age', 'income', 'credit_score'}
    assert all(gain > 0 for gain in feature_importance.values())
    # The history printed is the one kept, and the model learnt the signal.
    history = estimator.get_eval_results()
    assert len(history["eval"]["rmse"]) == 100
    assert history["eval"]["rmse"][-1] < 0.25 * history["eval"]["rmse"][0]
    evaluation = session.table('EVAL_DATA').df()
    predicted = estimator.predict(eval_connector)
    rmse = float(np.sqrt(np.mean((predicted - evaluation['default_risk']) ** 2)))
    assert rmse == pytest.approx(history["eval"]["rmse"][-1], rel=1e-4)


def test_lightgbm_prints_its_eval_lines_once_on_the_driver(
    warehouse: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    import duckdb
    import lightgbm

    session = duckdb.connect(str(warehouse))
    estimator = LightGBMEstimator(n_estimators=30, scaling_config=TWO_LGB)
    booster = estimator.fit(
        dataset=DataConnector.from_dataframe(session.table("TRAINING_DATA")),
        input_cols=INPUTS,
        label_col="y",
        eval_set=DataConnector.from_dataframe(session.table("EVAL_DATA")),
        verbose_eval=10,
    )
    out, _ = capfd.readouterr()
    rounds = [int(m.group(1)) for m in map(EVAL_LINE.match, out.splitlines()) if m]
    assert rounds == [0, 10, 20, 29], out
    assert "l2" in out
    assert isinstance(booster, lightgbm.Booster)
    assert booster.feature_name() == INPUTS


def test_no_eval_lines_without_verbose_eval(capfd: pytest.CaptureFixture[str]) -> None:
    frame = make_frame(2_000, seed=3)
    XGBEstimator(n_estimators=12, scaling_config=TWO_XGB).fit(frame, INPUTS, "y", eval_set=frame)
    out, _ = capfd.readouterr()
    assert not [line for line in out.splitlines() if EVAL_LINE.match(line)], out


@pytest.mark.parametrize("framework", ["xgboost", "lightgbm"])
def test_eval_results_predict_and_pickle(framework: str) -> None:
    train, evaluation = make_frame(4_000, seed=1), make_frame(1_000, seed=2)
    if framework == "xgboost":
        estimator = XGBEstimator(n_estimators=15, params={"max_depth": 4}, scaling_config=TWO_XGB)
        metric = "rmse"
    else:
        estimator = LightGBMEstimator(n_estimators=15, params={"num_leaves": 15},
                                      scaling_config=TWO_LGB)
        metric = "l2"
    unfitted = pickle.loads(pickle.dumps(estimator))
    assert repr(unfitted) == repr(estimator)

    booster = estimator.fit(train, INPUTS, "y", eval_set=DataConnector.from_dataframe(evaluation))

    results = estimator.get_eval_results()
    assert set(results) == {"train", "eval"}
    assert set(results["train"]) == set(results["eval"]) == {metric}
    assert len(results["train"][metric]) == len(results["eval"][metric]) == 15
    assert all(isinstance(v, float) for v in results["eval"][metric])
    assert results["eval"][metric][-1] < results["eval"][metric][0]
    results["eval"][metric].clear()  # a copy: the estimator keeps its own
    assert len(estimator.get_eval_results()["eval"][metric]) == 15

    if framework == "xgboost":  # the training metric covers every worker's rows
        everything = rmse(train["y"], estimator.predict(train))
        assert results["train"]["rmse"][-1] == pytest.approx(everything, rel=1e-4)

    from_frame = estimator.predict(evaluation)
    from_connector = estimator.predict(DataConnector.from_dataframe(evaluation))
    assert from_frame.shape == (1_000,)
    np.testing.assert_array_equal(from_frame, from_connector)
    # predict equals the framework's own predict on the same rows.
    if framework == "xgboost":
        import xgboost as xgb

        native = booster.predict(xgb.DMatrix(evaluation[INPUTS]))
    else:
        native = booster.predict(evaluation[INPUTS].to_numpy(np.float32))
    np.testing.assert_allclose(from_frame, native, rtol=1e-6)
    # Extra columns in the frame, in any order, do not matter.
    shuffled = evaluation[["y", "f3", "id", "f1", "f0", "f2"]]
    np.testing.assert_array_equal(estimator.predict(shuffled), from_frame)

    # Unfitted copies are fit-able; fitted copies predict the same.
    restored = pickle.loads(pickle.dumps(estimator))
    np.testing.assert_array_equal(restored.predict(evaluation), from_frame)
    assert restored.get_eval_results() == estimator.get_eval_results()
    assert type(restored.get_booster()) is type(booster)
    unfitted.fit(train, INPUTS, "y")
    np.testing.assert_allclose(unfitted.predict(evaluation), from_frame, rtol=1e-5)


def rmse(y: Any, p: Any) -> float:
    return float(np.sqrt(np.mean((np.asarray(y) - np.asarray(p)) ** 2)))


@pytest.mark.xfail(strict=True, reason="LightGBM computes no metric across machines: its "
                   "'train' history is rank 0's shard only (known, not fixed yet)")
def test_lightgbm_training_metric_covers_every_worker() -> None:
    train = make_frame(4_000, seed=1)
    estimator = LightGBMEstimator(n_estimators=10, scaling_config=TWO_LGB)
    estimator.fit(train, INPUTS, "y")
    everything = float(np.mean((estimator.predict(train) - train["y"]) ** 2))
    assert estimator.get_eval_results()["train"]["l2"][-1] == pytest.approx(everything, rel=1e-4)


def test_params_override_n_estimators_and_objective() -> None:
    frame = make_frame(2_000, seed=4)
    xgb_est = XGBEstimator(
        n_estimators=100, objective="reg:squarederror",
        params={"n_estimators": 7, "objective": "binary:logistic", "max_depth": 2},
        scaling_config=TWO_XGB,
    )
    booster = xgb_est.fit(frame, INPUTS, "label")
    assert booster.num_boosted_rounds() == 7
    predictions = xgb_est.predict(frame)
    assert predictions.min() >= 0.0 and predictions.max() <= 1.0  # logistic, not regression
    assert xgb_est.n_estimators == 100 and xgb_est.objective == "reg:squarederror"  # untouched

    lgb_est = LightGBMEstimator(
        n_estimators=100, objective="regression",
        params={"num_iterations": 6, "objective": "binary", "num_leaves": 4},
        scaling_config=TWO_LGB,
    )
    booster = lgb_est.fit(frame, INPUTS, "label")
    assert booster.num_trees() == 6
    assert "binary" in booster.model_to_string().split("objective=", 1)[1].split("\n", 1)[0]
    predictions = lgb_est.predict(frame)
    assert predictions.min() >= 0.0 and predictions.max() <= 1.0


def test_n_estimators_and_objective_arguments_are_used() -> None:
    frame = make_frame(1_000, seed=6)
    estimator = XGBEstimator(n_estimators=4, objective="binary:logistic", scaling_config=TWO_XGB)
    booster = estimator.fit(frame, ["f0", "f1"], "label")
    assert booster.num_boosted_rounds() == 4
    assert set(estimator.get_eval_results()) == {"train"}
    assert "logloss" in estimator.get_eval_results()["train"]


def test_categorical_string_feature() -> None:
    rng = np.random.default_rng(8)
    colour = rng.choice(["red", "green", "blue"], size=3_000)
    frame = pd.DataFrame({
        "x": rng.normal(size=3_000),
        "colour": colour,
        "y": np.where(colour == "red", 3.0, 0.0) + rng.normal(scale=0.1, size=3_000),
    })
    estimator = XGBEstimator(n_estimators=20, params={"max_depth": 3}, scaling_config=TWO_XGB)
    booster = estimator.fit(frame, ["x", "colour"], "y")
    assert booster.feature_types == ["q", "c"]
    predicted = estimator.predict(frame)
    assert abs(predicted[colour == "red"].mean() - 3.0) < 0.2
    assert abs(predicted[colour != "red"].mean()) < 0.2


def test_estimator_arguments_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"num_workers.*-1 \(auto\) or >= 1, got 0"):
        XGBScalingConfig(num_workers=0)
    with pytest.raises(ConfigError, match="num_workers"):
        LightGBMScalingConfig(num_workers=0)
    with pytest.raises(ConfigError, match="num_cpu_per_worker"):
        XGBScalingConfig(num_cpu_per_worker=0)
    with pytest.raises(ConfigError, match="num_workers"):
        XGBScalingConfig(num_workers=True)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="use_gpu"):
        XGBScalingConfig(use_gpu="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        XGBScalingConfig(2)  # type: ignore[misc] - keyword-only

    frame = make_frame(100)
    with pytest.raises(ConfigError, match="early_stopping_rounds needs an eval_set"):
        XGBEstimator(scaling_config=TWO_XGB).fit(frame, INPUTS, "y", early_stopping_rounds=3)
    with pytest.raises(ConfigError, match="verbose_eval"):
        XGBEstimator(scaling_config=TWO_XGB).fit(frame, INPUTS, "y", verbose_eval=-1)
    with pytest.raises(ConfigError, match="n_estimators"):
        XGBEstimator(n_estimators=0, scaling_config=TWO_XGB).fit(frame, INPUTS, "y")
    with pytest.raises(ConfigError, match="scaling_config must be a XGBScalingConfig"):
        XGBEstimator(scaling_config={"num_workers": 2}).fit(frame, INPUTS, "y")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="also listed in input_cols"):
        XGBEstimator(scaling_config=TWO_XGB).fit(frame, ["f0", "y"], "y")
    with pytest.raises(ConfigError, match="DataConnector or a data frame"):
        XGBEstimator(scaling_config=TWO_XGB).fit([[1, 2]], INPUTS, "y")


def test_unfitted_estimator_says_so() -> None:
    from neve._internal.gbdt.estimator import NotFittedError

    for estimator in (XGBEstimator(), LightGBMEstimator()):
        with pytest.raises(NotFittedError, match="call fit"):
            estimator.get_booster()
        with pytest.raises(NotFittedError):
            estimator.predict(make_frame(10))
        with pytest.raises(NotFittedError):
            estimator.get_eval_results()


# -- scaling configs against a cluster (no Ray needed) ------------------------------------


def _view(*nodes: tuple[float, float]) -> Any:
    from neve._internal.runtime.cluster import ClusterView, NodeView

    return ClusterView("test", tuple(
        NodeView(f"n{i}", f"10.0.0.{i}", cpus, gpus, i == 0) for i, (cpus, gpus) in enumerate(nodes)
    ))


def test_scaling_resolves_against_the_cluster() -> None:
    from neve._internal.runtime.placement import Layout

    two = _view((2, 0), (2, 0))
    # -1: one worker per node with all of its CPUs.
    assert XGBScalingConfig().resolve(two) == Layout(
        num_groups=2, workers_per_group=1, cpus_per_worker=2, distinct_nodes=True)
    assert LightGBMScalingConfig(num_cpu_per_worker=1).resolve(two).cpus_per_worker == 1
    # A count: the cluster's CPUs divided among them, no more than the biggest node has.
    assert XGBScalingConfig(num_workers=3).resolve(two) == Layout(
        num_groups=3, workers_per_group=1, cpus_per_worker=1)
    assert XGBScalingConfig(num_workers=1).resolve(two).cpus_per_worker == 2
    # GPUs: one worker per GPU, the node's CPUs shared among its GPUs.
    gpus = _view((8, 2), (8, 2))
    assert XGBScalingConfig().resolve(gpus) == Layout(
        num_groups=4, workers_per_group=1, cpus_per_worker=4, gpus_per_worker=1.0)
    assert XGBScalingConfig(use_gpu=False).resolve(gpus).gpus_per_worker == 0
    with pytest.raises(ResourcesUnavailableError, match="use_gpu=True but the cluster has no"):
        XGBScalingConfig(use_gpu=True).resolve(two)


def test_a_framework_built_without_cuda_trains_on_cpus_by_default() -> None:
    import xgboost

    from neve._internal.gbdt.lgbm import LightGBMBackend
    from neve._internal.gbdt.xgb import XGBoostBackend

    reason = XGBoostBackend().gpu_unsupported()
    assert (reason is None) == bool(xgboost.build_info().get("USE_CUDA"))
    lgb_reason = LightGBMBackend().gpu_unsupported()
    assert lgb_reason is None or "lightgbm is built without CUDA" in lgb_reason

    gpus = _view((8, 2))
    cpu_build = "this xgboost is built without CUDA (the xgboost-cpu package)"
    # use_gpu=None on a GPU cluster: CPUs when the framework cannot use the GPUs ...
    layout = XGBScalingConfig().resolve(gpus, gpu_unsupported=cpu_build)
    assert layout.gpus_per_worker == 0 and layout.cpus_per_worker == 8
    # ... and use_gpu=True says why it cannot, and what to do.
    with pytest.raises(ConfigError, match=r"use_gpu=True but this xgboost is built without "
                       r"CUDA \(the xgboost-cpu package\); set use_gpu=None or False"):
        XGBScalingConfig(use_gpu=True).resolve(gpus, gpu_unsupported=cpu_build)
