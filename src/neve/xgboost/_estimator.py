"""XGBEstimator: every worker runs xgboost's unchanged ``train`` inside its collective."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from neve._internal.gbdt.config import GBDTScalingConfig
from neve._internal.gbdt.estimator import GBDTEstimator, hints
from neve._internal.gbdt.runner import Backend
from neve._internal.signatures import checked_keywords

if TYPE_CHECKING:
    import xgboost


@checked_keywords()
@dataclass(frozen=True, kw_only=True)
class XGBScalingConfig(GBDTScalingConfig):
    """Workers for XGBEstimator: ``num_workers``, ``num_cpu_per_worker``, ``use_gpu``.

    Example:
        >>> XGBScalingConfig(num_workers=2, num_cpu_per_worker=1)
        XGBScalingConfig(num_workers=2, num_cpu_per_worker=1, use_gpu=None)
    """


@checked_keywords(hints("XGBScalingConfig"))
class XGBEstimator(GBDTEstimator["xgboost.Booster"]):
    """Distributed XGBoost with Snowflake's ``XGBEstimator`` API.

    ``fit`` returns an ``xgboost.Booster``; keys in ``params`` override
    ``n_estimators`` and ``objective``. Parameters xgboost does not use are named
    once, on the driver (a ``ParameterWarning``), not once per worker.

    Example:
        >>> from neve.xgboost import XGBEstimator
        >>> est = XGBEstimator(n_estimators=50, params={"max_depth": 4})
        >>> est.objective
        'reg:squarederror'
        >>> # booster = est.fit(connector, input_cols=["x1", "x2"], label_col="y", verbose_eval=10)
    """

    _scaling_type = XGBScalingConfig
    _backend_module = "neve._internal.gbdt.xgb"
    _default_objective = "reg:squarederror"

    def __init__(
        self,
        n_estimators: int = 100,
        objective: str = "reg:squarederror",
        params: Mapping[str, Any] | None = None,
        scaling_config: XGBScalingConfig | None = None,
        callbacks: Sequence[xgboost.callback.TrainingCallback] | None = None,
    ) -> None:
        super().__init__(n_estimators, objective, params, scaling_config, callbacks)

    def _backend(self) -> Backend:
        from neve._internal.gbdt.xgb import XGBoostBackend

        return XGBoostBackend()

    def _load(self, model: Any) -> xgboost.Booster:
        from neve._internal.gbdt.xgb import load_booster

        return load_booster(model)

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        from neve._internal.gbdt.params import check_xgboost

        return check_xgboost(params)

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
