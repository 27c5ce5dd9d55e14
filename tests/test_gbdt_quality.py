"""Distributed fits on 2 workers match single-process fits (plain xgboost/lightgbm ``train``).

Each test trains the framework's own ``train`` in this process and the estimator on
two Ray workers with the same parameters, then compares held-out quality. The
settings are chosen so the models converge: early in training, tiny differences
in the distributed quantile sketch (xgboost) or in bins found from each worker's
part (LightGBM) move an unconverged model more than the tolerance (plain xgboost
on two RabitTracker workers, without neve, differs from one process by 0.04 RMSE
after 40 depth-4 rounds on ``make_frame``). Where a test is about what neve
passes to the framework (weights, query groups) its features take few distinct
values, so both sketches are exact and the comparison is tight.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import make_frame
from neve.data import DataConnector
from neve.lightgbm import LightGBMEstimator, LightGBMScalingConfig
from neve.xgboost import XGBEstimator, XGBScalingConfig

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(120)]

TOLERANCE = 0.005
INPUTS = ["f0", "f1", "f2", "f3"]
TWO_XGB = XGBScalingConfig(num_workers=2, num_cpu_per_worker=1)
TWO_LGB = LightGBMScalingConfig(num_workers=2, num_cpu_per_worker=1)


def rmse(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(y) - np.asarray(p)) ** 2)))


def weighted_rmse(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> float:
    return float(np.sqrt(np.average((np.asarray(y) - np.asarray(p)) ** 2, weights=w)))


def xgb_root_cover(booster) -> float:  # type: ignore[no-untyped-def]
    """Sum of hessians at the first tree's root: the rows (or weights) it was grown on."""
    tree = json.loads(booster.get_dump(with_stats=True, dump_format="json")[0])
    return float(tree["cover"])


def lgb_root(booster) -> dict:  # type: ignore[no-untyped-def, type-arg]
    return booster.dump_model()["tree_info"][0]["tree_structure"]


@pytest.fixture(scope="module")
def breast_cancer() -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True, as_frame=True)
    x.columns = [c.replace(" ", "_") for c in x.columns]
    frame = x.assign(target=y.astype(np.float64))
    order = np.random.default_rng(0).permutation(len(frame))
    return frame.iloc[order[:400]], frame.iloc[order[400:]], list(x.columns)


def test_xgboost_breast_cancer_auc_matches_single_process(breast_cancer) -> None:  # type: ignore[no-untyped-def]
    import xgboost as xgb
    from sklearn.metrics import roc_auc_score

    train, test, cols = breast_cancer
    params = {"objective": "binary:logistic", "max_depth": 3, "eta": 0.1, "nthread": 1}
    single = xgb.train(params, xgb.QuantileDMatrix(train[cols], train["target"]), 50)
    single_auc = roc_auc_score(test["target"], single.predict(xgb.DMatrix(test[cols])))

    estimator = XGBEstimator(n_estimators=50, params=params, scaling_config=TWO_XGB)
    booster = estimator.fit(train, cols, "target")
    auc = roc_auc_score(test["target"], estimator.predict(test))
    print(f"breast cancer auc: single {single_auc:.5f}, distributed {auc:.5f}")

    assert abs(auc - single_auc) <= TOLERANCE, (auc, single_auc)
    assert auc > 0.97
    # Both workers' rows went into the first tree (hessian p(1-p) = 0.25 per row at start).
    assert xgb_root_cover(booster) == pytest.approx(xgb_root_cover(single), rel=1e-4)


def test_lightgbm_breast_cancer_auc_matches_single_process(breast_cancer) -> None:  # type: ignore[no-untyped-def]
    import lightgbm as lgb
    from sklearn.metrics import roc_auc_score

    train, test, cols = breast_cancer
    params = {"objective": "binary", "num_leaves": 15, "learning_rate": 0.1,
              "verbosity": -1, "num_threads": 1}
    single = lgb.train(params, lgb.Dataset(train[cols].to_numpy(np.float32), train["target"]), 50)
    single_auc = roc_auc_score(test["target"], single.predict(test[cols].to_numpy(np.float32)))

    estimator = LightGBMEstimator(n_estimators=50, params=params, scaling_config=TWO_LGB)
    booster = estimator.fit(train, cols, "target")
    auc = roc_auc_score(test["target"], estimator.predict(test))
    print(f"breast cancer auc: single {single_auc:.5f}, distributed {auc:.5f}")

    assert abs(auc - single_auc) <= TOLERANCE, (auc, single_auc)
    assert auc > 0.97
    assert lgb_root(booster)["internal_count"] == len(train)  # grown on both shards


def test_xgboost_regression_with_eval_set_and_early_stopping(warehouse) -> None:  # type: ignore[no-untyped-def]
    import duckdb
    import xgboost as xgb

    session = duckdb.connect(str(warehouse))
    train = session.table("TRAINING_DATA").df()
    evaluation = session.table("EVAL_DATA").df()
    params = {"objective": "reg:squarederror", "max_depth": 6, "eta": 0.3, "nthread": 1}

    dtrain = xgb.QuantileDMatrix(train[INPUTS], train["y"])
    deval = xgb.QuantileDMatrix(evaluation[INPUTS], evaluation["y"], ref=dtrain)
    single = xgb.train(params, dtrain, 300, evals=[(dtrain, "train"), (deval, "eval")],
                       early_stopping_rounds=10, verbose_eval=False)
    single_rmse = rmse(evaluation["y"], single.predict(
        xgb.DMatrix(evaluation[INPUTS]), iteration_range=(0, single.best_iteration + 1)))

    estimator = XGBEstimator(n_estimators=300, params=params, scaling_config=TWO_XGB)
    booster = estimator.fit(
        DataConnector.from_dataframe(session.table("TRAINING_DATA")), INPUTS, "y",
        eval_set=DataConnector.from_dataframe(session.table("EVAL_DATA")),
        early_stopping_rounds=10,
    )
    predicted = estimator.predict(evaluation)
    distributed_rmse = rmse(evaluation["y"], predicted)
    print(f"xgboost rmse: single {single_rmse:.5f}, distributed {distributed_rmse:.5f}")

    assert abs(distributed_rmse - single_rmse) <= TOLERANCE, (distributed_rmse, single_rmse)
    # Early stopping stopped it, at about the same round as in one process.
    best = estimator.best_iteration
    assert best is not None and best == booster.best_iteration
    assert booster.num_boosted_rounds() == best + 11 < 300
    assert abs(best - single.best_iteration) <= 10
    # predict() uses the best iteration, as xgboost's own estimators do.
    native = booster.predict(xgb.DMatrix(evaluation[INPUTS]), iteration_range=(0, best + 1))
    np.testing.assert_allclose(predicted, native, rtol=1e-6)
    # The eval metric is over the whole eval set (combined across workers), not a shard.
    history = estimator.get_eval_results()["eval"]["rmse"]
    assert len(history) == booster.num_boosted_rounds()
    assert history[best] == pytest.approx(distributed_rmse, rel=1e-4)
    assert xgb_root_cover(booster) == pytest.approx(len(train), rel=1e-6)


def test_lightgbm_regression_with_eval_set_and_early_stopping(warehouse) -> None:  # type: ignore[no-untyped-def]
    import duckdb
    import lightgbm as lgb

    session = duckdb.connect(str(warehouse))
    train = session.table("TRAINING_DATA").df()
    evaluation = session.table("EVAL_DATA").df()
    params = {"objective": "regression", "num_leaves": 31, "learning_rate": 0.3,
              "verbosity": -1, "num_threads": 1}

    dtrain = lgb.Dataset(train[INPUTS].to_numpy(np.float32), train["y"])
    deval = lgb.Dataset(evaluation[INPUTS].to_numpy(np.float32), evaluation["y"], reference=dtrain)
    single = lgb.train(params, dtrain, 300, valid_sets=[deval],
                       callbacks=[lgb.early_stopping(10, verbose=False)])
    single_rmse = rmse(evaluation["y"], single.predict(evaluation[INPUTS].to_numpy(np.float32)))

    estimator = LightGBMEstimator(n_estimators=300, params=params, scaling_config=TWO_LGB)
    booster = estimator.fit(
        DataConnector.from_dataframe(session.table("TRAINING_DATA")), INPUTS, "y",
        eval_set=DataConnector.from_dataframe(session.table("EVAL_DATA")),
        early_stopping_rounds=10,
    )
    distributed_rmse = rmse(evaluation["y"], estimator.predict(evaluation))
    print(f"lightgbm rmse: single {single_rmse:.5f}, distributed {distributed_rmse:.5f}")

    assert abs(distributed_rmse - single_rmse) <= TOLERANCE, (distributed_rmse, single_rmse)
    best = estimator.best_iteration
    assert best is not None and 1 <= best < 290
    assert single.best_iteration < 290
    assert booster.num_trees() == best  # LightGBM keeps the model up to the best round
    # As lightgbm.train leaves them (it was -1 on the Booster fit returned).
    assert booster.best_iteration == best
    assert booster.best_score["eval"]["l2"] == pytest.approx(distributed_rmse**2, rel=1e-4)
    history = estimator.get_eval_results()["eval"]["l2"]
    assert history[best - 1] == pytest.approx(distributed_rmse**2, rel=1e-4)
    assert lgb_root(booster)["internal_count"] == len(train)


def _discrete(frame: pd.DataFrame) -> pd.DataFrame:
    """Features rounded to 0.1 (about 80 distinct values each: every sketch is exact)."""
    frame[INPUTS] = frame[INPUTS].round(1)
    return frame


def _weighted_frame(rows: int, seed: int) -> pd.DataFrame:
    """Two populations that disagree about ``y``; weights decide which one wins."""
    frame = _discrete(make_frame(rows, seed=seed))
    rng = np.random.default_rng(seed + 100)
    heavy = rng.random(rows) < 0.3
    frame["y"] = np.where(heavy, frame["y"] + 0.5, frame["y"] - 0.25)
    frame["w"] = np.where(heavy, 5.0, 0.5)
    return frame


@pytest.mark.parametrize("framework", ["xgboost", "lightgbm"])
def test_sample_weights(framework: str) -> None:
    train, test = _weighted_frame(8_000, seed=21), _weighted_frame(3_000, seed=22)
    if framework == "xgboost":
        import xgboost as xgb

        params = {"objective": "reg:squarederror", "max_depth": 4, "eta": 0.1,
                  "min_child_weight": 20, "nthread": 1}
        single = xgb.train(params, xgb.QuantileDMatrix(train[INPUTS], train["y"],
                                                      weight=train["w"]), 100)
        single_pred = single.predict(xgb.DMatrix(test[INPUTS]))
        estimator: XGBEstimator | LightGBMEstimator = XGBEstimator(
            n_estimators=100, params=params, scaling_config=TWO_XGB)
    else:
        import lightgbm as lgb

        params = {"objective": "regression", "num_leaves": 15, "learning_rate": 0.1,
                  "min_data_in_leaf": 50, "verbosity": -1, "num_threads": 1}
        single = lgb.train(params, lgb.Dataset(train[INPUTS].to_numpy(np.float32), train["y"],
                                               weight=train["w"]), 100)
        single_pred = single.predict(test[INPUTS].to_numpy(np.float32))
        estimator = LightGBMEstimator(n_estimators=100, params=params, scaling_config=TWO_LGB)

    booster = estimator.fit(train, INPUTS, "y", weight_col="w")
    predicted = estimator.predict(test)
    expected = weighted_rmse(test["y"], single_pred, test["w"])
    got = weighted_rmse(test["y"], predicted, test["w"])
    print(f"{framework} weighted rmse: single {expected:.5f}, distributed {got:.5f}")
    assert abs(got - expected) <= TOLERANCE, (got, expected)
    # The weights were used: the heavy population pulls the mean up (unweighted it is below 0).
    assert predicted.mean() == pytest.approx(single_pred.mean(), abs=0.02)
    assert predicted.mean() > 0.2 > 0.05 > train["y"].mean()
    total_weight = float(train["w"].sum())
    if framework == "xgboost":
        assert xgb_root_cover(booster) == pytest.approx(total_weight, rel=1e-5)
    else:
        assert lgb_root(booster)["internal_weight"] == pytest.approx(total_weight, rel=1e-5)


def _ranking_frame(queries: int, seed: int) -> pd.DataFrame:
    """Queries of 5-30 documents, sorted by query id, graded 0-3 by a noisy signal.

    Query sizes vary, so the cut between the two workers' shards falls inside a query.
    """
    rng = np.random.default_rng(seed)
    sizes = rng.integers(5, 31, size=queries)
    qid = np.repeat(np.arange(queries), sizes)
    x = rng.normal(size=(len(qid), 4)).round(1).astype(np.float32)
    score = x[:, 0] - 0.5 * x[:, 1] + 0.3 * x[:, 2] + rng.normal(scale=0.5, size=len(qid))
    relevance = np.clip(np.round(score + 1.0), 0, 3)
    frame = pd.DataFrame({f"f{i}": x[:, i] for i in range(4)})
    frame["qid"] = qid.astype(np.int64)
    frame["rel"] = relevance
    return frame


def mean_ndcg(frame: pd.DataFrame, predicted: np.ndarray, k: int = 10) -> float:
    from sklearn.metrics import ndcg_score

    scores = []
    for _, rows in frame.assign(p=predicted).groupby("qid"):
        if len(rows) > 1 and rows["rel"].max() > 0:
            scores.append(ndcg_score([rows["rel"].to_numpy()], [rows["p"].to_numpy()], k=k))
    return float(np.mean(scores))


@pytest.mark.parametrize("framework", ["xgboost", "lightgbm"])
def test_ranking_with_query_groups(framework: str) -> None:
    train, test = _ranking_frame(400, seed=31), _ranking_frame(150, seed=32)
    if framework == "xgboost":
        import xgboost as xgb

        params = {"objective": "rank:pairwise", "max_depth": 4, "eta": 0.2, "nthread": 1,
                  "eval_metric": "ndcg@10"}
        single = xgb.train(params, xgb.QuantileDMatrix(train[INPUTS], train["rel"],
                                                      qid=train["qid"]), 40)
        single_pred = single.predict(xgb.DMatrix(test[INPUTS]))
        estimator: XGBEstimator | LightGBMEstimator = XGBEstimator(
            n_estimators=40, params=params, scaling_config=TWO_XGB)
        metric = "ndcg@10"
    else:
        import lightgbm as lgb

        sizes = train.groupby("qid", sort=True).size().to_numpy()
        params = {"objective": "lambdarank", "num_leaves": 15, "learning_rate": 0.1,
                  "verbosity": -1, "num_threads": 1, "eval_at": [10]}
        single = lgb.train(params, lgb.Dataset(train[INPUTS].to_numpy(np.float32), train["rel"],
                                               group=sizes), 40)
        single_pred = single.predict(test[INPUTS].to_numpy(np.float32))
        estimator = LightGBMEstimator(n_estimators=40, params=params, scaling_config=TWO_LGB)
        metric = "ndcg@10"

    estimator.fit(train, INPUTS, "rel", eval_set=test, group_col="qid")
    predicted = estimator.predict(test)
    expected, got = mean_ndcg(test, single_pred), mean_ndcg(test, predicted)
    print(f"{framework} ndcg@10: single {expected:.5f}, distributed {got:.5f}")
    assert abs(got - expected) <= TOLERANCE, (got, expected)
    assert got > 0.8
    history = estimator.get_eval_results()["eval"][metric]
    assert len(history) == 40 and history[-1] > history[0]
