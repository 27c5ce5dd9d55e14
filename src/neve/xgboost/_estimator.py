"""XGBEstimator: every worker runs xgboost's unchanged ``train`` inside its collective."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from neve._internal.gbdt.config import GBDTScalingConfig
from neve._internal.gbdt.estimator import GBDTEstimator
from neve._internal.gbdt.runner import Backend


@dataclass(frozen=True, kw_only=True)
class XGBScalingConfig(GBDTScalingConfig):
    """Workers for XGBEstimator: ``num_workers``, ``num_cpu_per_worker``, ``use_gpu``.

    Example:
        >>> XGBScalingConfig(num_workers=2, num_cpu_per_worker=1)
        XGBScalingConfig(num_workers=2, num_cpu_per_worker=1, use_gpu=None)
    """


class XGBEstimator(GBDTEstimator):
    """Distributed XGBoost with Snowflake's ``XGBEstimator`` API.

    ``fit`` returns an ``xgboost.Booster``; keys in ``params`` override
    ``n_estimators`` and ``objective``.

    Example:
        >>> from neve.xgboost import XGBEstimator
        >>> est = XGBEstimator(n_estimators=50, params={"max_depth": 4})
        >>> # booster = est.fit(connector, input_cols=["x1", "x2"], label_col="y", verbose_eval=10)
    """

    _scaling_type = XGBScalingConfig
    _default_objective = "reg:squarederror"

    def _backend(self) -> Backend:
        from neve._internal.gbdt.xgb import XGBoostBackend

        return XGBoostBackend()

    def _load(self, model: Any) -> Any:
        from neve._internal.gbdt.xgb import load_booster

        return load_booster(model)

    def _model_payload(self, init_model: Any) -> Any:
        if init_model is None or isinstance(init_model, (bytes, bytearray)):
            return init_model
        return bytes(init_model.save_raw("ubj"))

    def _predict_block(self, booster: Any, features: np.ndarray) -> np.ndarray:
        import xgboost as xgb

        matrix = xgb.DMatrix(features, feature_names=booster.feature_names,
                             feature_types=booster.feature_types,
                             enable_categorical=bool(self._spec and self._spec.categories))
        # After early stopping, predict with the best rounds, as xgboost's own estimators do.
        rounds = (0, self.best_iteration + 1) if self.best_iteration is not None else (0, 0)
        return np.asarray(booster.predict(matrix, iteration_range=rounds))
