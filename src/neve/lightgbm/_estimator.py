"""LightGBMEstimator: every worker runs LightGBM's unchanged ``train`` on its network."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from neve._internal.gbdt.config import GBDTScalingConfig
from neve._internal.gbdt.estimator import GBDTEstimator, hints
from neve._internal.gbdt.runner import Backend
from neve._internal.signatures import checked_keywords

if TYPE_CHECKING:
    import lightgbm


@checked_keywords()
@dataclass(frozen=True, kw_only=True)
class LightGBMScalingConfig(GBDTScalingConfig):
    """Workers for LightGBMEstimator: ``num_workers``, ``num_cpu_per_worker``, ``use_gpu``.

    Example:
        >>> LightGBMScalingConfig(num_workers=2)
        LightGBMScalingConfig(num_workers=2, num_cpu_per_worker=-1, use_gpu=None)
    """


@checked_keywords(hints("LightGBMScalingConfig"))
class LightGBMEstimator(GBDTEstimator["lightgbm.Booster"]):
    """Distributed LightGBM with Snowflake's ``LightGBMEstimator`` API.

    ``fit`` returns a ``lightgbm.Booster``; every worker evaluates the whole eval
    set, so early stopping agrees on all workers. After early stopping the Booster's
    ``best_iteration`` (counted from 1, as LightGBM does) and ``best_score`` are set,
    as ``lightgbm.train`` sets them. Parameters LightGBM does not know are named
    once, on the driver (a ``ParameterWarning``).

    Example:
        >>> from neve.lightgbm import LightGBMEstimator
        >>> est = LightGBMEstimator(n_estimators=50, params={"num_leaves": 31})
        >>> est.objective
        'regression'
        >>> # booster = est.fit(connector, input_cols=["x1", "x2"], label_col="y")
    """

    _scaling_type = LightGBMScalingConfig
    _backend_module = "neve._internal.gbdt.lgbm"
    _default_objective = "regression"

    def __init__(
        self,
        n_estimators: int = 100,
        objective: str = "regression",
        params: Mapping[str, Any] | None = None,
        scaling_config: LightGBMScalingConfig | None = None,
        callbacks: Sequence[Callable[..., Any]] | None = None,
    ) -> None:
        super().__init__(n_estimators, objective, params, scaling_config, callbacks)

    def _backend(self) -> Backend:
        from neve._internal.gbdt.lgbm import LightGBMBackend

        return LightGBMBackend()

    def _load(self, model: Any) -> lightgbm.Booster:
        from neve._internal.gbdt.lgbm import load_booster

        return load_booster(model)

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        from neve._internal.gbdt.params import check_lightgbm

        return check_lightgbm(params)

    def _annotate(self, booster: lightgbm.Booster) -> None:
        # lightgbm.train sets these on the Booster it returns; a Booster loaded from the
        # model string that rank 0 sent back starts without them (best_iteration -1).
        if self.best_iteration is None:
            return
        booster.best_iteration = self.best_iteration
        best: dict[str, dict[str, float]] = {}
        for data, log in self._evals_result.items():
            for metric, values in log.items():
                if 0 < self.best_iteration <= len(values):
                    best.setdefault(data, {})[metric] = values[self.best_iteration - 1]
        booster.best_score = best  # type: ignore[assignment]

    def _round_keys(self) -> tuple[str, ...]:
        return ("num_boost_round", "n_estimators", "num_iterations", "num_iteration",
                "n_iter", "num_tree", "num_trees", "num_round", "num_rounds")

    def _model_payload(self, init_model: Any) -> Any:
        if init_model is None or isinstance(init_model, str):
            return init_model
        return init_model.model_to_string()

    def _predict_block(self, booster: Any, features: np.ndarray) -> np.ndarray:
        return np.asarray(booster.predict(features))
