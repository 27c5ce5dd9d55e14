"""LightGBMEstimator: every worker runs LightGBM's unchanged ``train`` on its network."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from neve._internal.gbdt.config import GBDTScalingConfig
from neve._internal.gbdt.estimator import GBDTEstimator
from neve._internal.gbdt.runner import Backend


@dataclass(frozen=True, kw_only=True)
class LightGBMScalingConfig(GBDTScalingConfig):
    """Workers for LightGBMEstimator: ``num_workers``, ``num_cpu_per_worker``, ``use_gpu``.

    Example:
        >>> LightGBMScalingConfig(num_workers=2)
        LightGBMScalingConfig(num_workers=2, num_cpu_per_worker=-1, use_gpu=None)
    """


class LightGBMEstimator(GBDTEstimator):
    """Distributed LightGBM with Snowflake's ``LightGBMEstimator`` API.

    ``fit`` returns a ``lightgbm.Booster``; every worker evaluates the whole eval
    set, so early stopping agrees on all workers.

    Example:
        >>> from neve.lightgbm import LightGBMEstimator
        >>> est = LightGBMEstimator(n_estimators=50, params={"num_leaves": 31})
        >>> # booster = est.fit(connector, input_cols=["x1", "x2"], label_col="y")
    """

    _scaling_type = LightGBMScalingConfig
    _default_objective = "regression"

    def _backend(self) -> Backend:
        from neve._internal.gbdt.lgbm import LightGBMBackend

        return LightGBMBackend()

    def _load(self, model: Any) -> Any:
        from neve._internal.gbdt.lgbm import load_booster

        return load_booster(model)

    def _round_keys(self) -> tuple[str, ...]:
        return ("num_boost_round", "n_estimators", "num_iterations", "num_iteration",
                "n_iter", "num_tree", "num_trees", "num_round", "num_rounds")

    def _model_payload(self, init_model: Any) -> Any:
        if init_model is None or isinstance(init_model, str):
            return init_model
        return init_model.model_to_string()

    def _predict_block(self, booster: Any, features: np.ndarray) -> np.ndarray:
        return np.asarray(booster.predict(features))
