"""The estimator both frameworks share: arguments kept as given, checked in ``fit``."""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from neve._internal.data.checks import has_rows
from neve._internal.data.errors import check_columns
from neve._internal.gbdt import runner
from neve._internal.gbdt.config import GBDTScalingConfig
from neve._internal.gbdt.features import BATCH_ROWS, FeatureSpec, feature_matrix
from neve._internal.runtime import group
from neve._internal.signatures import checked_keywords
from neve.exceptions import ConfigError, EmptyDatasetError, NeveError

if TYPE_CHECKING:
    from typing import TypeAlias

    from neve.data import DataConnector
    from neve.data._connector import FrameLike

    #: what ``fit`` and ``predict`` read: a DataConnector, or a frame ``from_dataframe`` takes
    DatasetLike: TypeAlias = DataConnector | FrameLike

#: the framework's Booster (``xgboost.Booster``, ``lightgbm.Booster``)
BoosterT = TypeVar("BoosterT")



def import_in_background(module: str) -> None:
    """Start importing ``module`` in a thread, unless it is imported already; whatever
    fails fails again, and is reported, where the module is imported next."""
    if module in sys.modules:
        return

    def load() -> None:
        with contextlib.suppress(Exception):
            importlib.import_module(module)

    threading.Thread(target=load, name="neve-import", daemon=True).start()


class NotFittedError(NeveError):
    """The estimator has no model yet."""


def hints(scaling: str) -> dict[str, str]:
    """Keywords that belong elsewhere than the estimator, and where they go."""
    out = {word: f"it belongs to the scaling config: scaling_config={scaling}({word}=...)"
           for word in ("num_workers", "num_cpu_per_worker", "use_gpu")}
    for word in ("max_depth", "learning_rate", "eta", "num_leaves", "eval_metric", "metric",
                 "nthread", "num_threads", "subsample", "random_state", "seed", "tree_method",
                 "max_bin", "min_child_weight", "reg_lambda", "reg_alpha", "verbosity"):
        out[word] = f"framework parameters go in params={{{word!r}: ...}}"
    return out


@checked_keywords(hints("a scaling config"))
class GBDTEstimator(Generic[BoosterT]):
    """Base of XGBEstimator and LightGBMEstimator (keyword-friendly, picklable)."""

    #: the module of the framework's Backend, imported by the workers ahead of a fit
    _backend_module: str
    _scaling_type: type[GBDTScalingConfig] = GBDTScalingConfig
    _default_objective: str

    def __init__(
        self,
        n_estimators: int = 100,
        objective: str | None = None,
        params: Mapping[str, Any] | None = None,
        scaling_config: GBDTScalingConfig | None = None,
        callbacks: Sequence[Any] | None = None,
    ) -> None:
        # ``objective=None`` means the framework's default (as in the subclasses' signatures).
        self.n_estimators = n_estimators
        self.objective = objective if objective is not None else self._default_objective
        self.params = params
        self.scaling_config = scaling_config
        self.callbacks = callbacks
        self._model: BoosterT | None = None
        self._evals_result: dict[str, dict[str, list[float]]] = {}
        self._spec: FeatureSpec | None = None
        self.best_iteration: int | None = None
        self._prestart()

    def _prestart(self) -> None:
        """On a running Ray, let this estimator's workers start before fit asks (the
        driver imports no framework for it: the workers do, in parallel)."""
        scaling = self.scaling_config
        if scaling is not None and not isinstance(scaling, GBDTScalingConfig):
            return  # fit says what is wrong
        group.prestart(lambda view: runner.layout_for(self._backend,
                                                      scaling or self._scaling_type(), view),
                       runner.worker_imports(self._backend_module))

    # -- framework hooks ----------------------------------------------------------------

    def _backend(self) -> runner.Backend:
        raise NotImplementedError

    def _load(self, model: Any) -> BoosterT:
        raise NotImplementedError

    def _round_keys(self) -> tuple[str, ...]:
        return ("num_boost_round", "n_estimators")

    def _predict_block(self, booster: Any, features: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Check the framework's parameters on the driver; return what the workers get."""
        return params

    def _annotate(self, booster: BoosterT) -> None:
        """Give the returned Booster what the framework's own ``train`` would have set."""

    # -- API --------------------------------------------------------------------------------

    def _train_params(self) -> tuple[dict[str, Any], int]:
        if self.params is not None and not isinstance(self.params, Mapping):
            raise ConfigError(f"params must be a dict, got {type(self.params).__name__}")
        params = {"objective": self.objective, **dict(self.params or {})}
        rounds = self.n_estimators
        for key in self._round_keys():
            if key in params:
                rounds = params.pop(key)
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ConfigError(f"n_estimators must be an integer >= 1, got {rounds!r}")
        return params, rounds

    def fit(
        self,
        dataset: DatasetLike,
        input_cols: Sequence[str] | str,
        label_col: str,
        eval_set: DatasetLike | None = None,
        verbose_eval: int | bool | None = None,
        *,
        weight_col: str | None = None,
        group_col: str | None = None,
        early_stopping_rounds: int | None = None,
        init_model: BoosterT | bytes | str | None = None,
        max_failures: int = 1,
        external_memory: bool | None = None,
        eval_train: bool | None = None,
        checkpoint_stage: str | os.PathLike[str] | None = None,
        resume_from: str | None = None,
    ) -> BoosterT:
        """Train on every worker of the cluster and return the framework's Booster.

        A lost worker (killed, out of memory, its node gone) restarts every worker
        from rank 0's latest checkpoint (taken every tenth of the rounds), or from the
        start, up to ``max_failures`` times (``0``: never). An exception raised by
        your code or the framework is never retried.
        ``checkpoint_stage`` also commits each checkpoint to
        ``<stage>/checkpoints/<request_id>/``; a fit whose driver died continues from
        there with the same call plus ``resume_from=<request_id>`` (or ``"latest"``).
        ``external_memory`` (XGBoost): each worker keeps its binned shard on local
        disk and streams it every round (``True``), in memory (``False``), or picks
        by the shard's size against the worker's share of its node's memory (``None``).
        ``eval_train``: whether the training set is evaluated every round, its metrics
        under ``get_eval_results()["train"]``. ``None`` (the default): yes, unless the fit
        keeps its shard on disk, where the copy of the predictions this takes (4 bytes
        per row) is memory a larger-than-memory fit cannot spare.
        """
        for name, value in (("external_memory", external_memory), ("eval_train", eval_train)):
            if value not in (None, True, False):
                raise ConfigError(f"{name} must be None (auto), True or False, got {value!r}")
        if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < 0:
            raise ConfigError(f"max_failures must be an integer >= 0, got {max_failures!r}")
        scaling = self.scaling_config if self.scaling_config is not None else self._scaling_type()
        if not isinstance(scaling, GBDTScalingConfig):
            raise ConfigError(
                f"scaling_config must be a {self._scaling_type.__name__}, "
                f"got {type(scaling).__name__}"
            )
        if early_stopping_rounds is not None and (
            isinstance(early_stopping_rounds, bool)
            or not isinstance(early_stopping_rounds, int)
            or early_stopping_rounds < 1
        ):
            raise ConfigError(
                "early_stopping_rounds must be None or an integer >= 1, "
                f"got {early_stopping_rounds!r}"
            )
        params, rounds = self._train_params()
        # The driver's framework import (a second or more: xgboost and LightGBM bring their
        # scikit-learn wrappers) runs while the data is checked and Ray starts; the
        # parameter check that needs it comes after Ray's start.
        import_in_background(self._backend_module)
        train = runner._as_connector(dataset, "dataset")
        evaluation = runner._as_connector(eval_set, "eval_set") if eval_set is not None else None
        # Before Ray starts (seconds), where one batch tells.
        for connector, what in ((train, "the training data"), (evaluation, "the eval set")):
            if connector is not None and has_rows(connector._source) is False:
                raise EmptyDatasetError(
                    f"{what} ({connector._source.description}) holds no rows; check the "
                    "table or query"
                )
        result = runner.fit(
            self._backend(),
            params=params,
            check_params=self._check_params,
            num_boost_round=rounds,
            scaling=scaling,
            dataset=train,
            input_cols=input_cols,
            label_col=label_col,
            eval_set=evaluation,
            weight_col=weight_col,
            group_col=group_col,
            early_stopping_rounds=early_stopping_rounds,
            verbose_eval=verbose_eval,
            callbacks=self.callbacks,
            init_model=self._model_payload(init_model),
            max_failures=max_failures,
            external_memory=external_memory,
            eval_train=eval_train,
            checkpoint_stage=checkpoint_stage,
            resume_from=resume_from,
        )
        model = self._load(result.model)
        self._model = model
        self._evals_result = result.evals_result
        self.best_iteration = result.best_iteration
        self._spec = result.spec
        self._annotate(model)
        return model

    def _model_payload(self, init_model: Any) -> Any:
        return init_model

    def get_booster(self) -> BoosterT:
        """The trained Booster of the framework."""
        if self._model is None:
            raise NotFittedError(f"{type(self).__name__} is not fitted yet: call fit() first")
        return self._model

    def get_eval_results(self) -> dict[str, dict[str, list[float]]]:
        """``{"train": {metric: [...]}, "eval": {...}}`` per boosting round."""
        self.get_booster()
        return copy.deepcopy(self._evals_result)

    def predict(self, dataset: DatasetLike) -> np.ndarray:
        """Predictions for every row, computed in this process (not distributed)."""
        booster = self.get_booster()
        spec = self._spec
        assert spec is not None
        connector = runner._as_connector(dataset, "dataset")
        check_columns(connector.schema, spec.input_cols, connector._source.description)
        parts = [
            self._predict_block(booster, feature_matrix(batch, spec))
            for batch in connector.iter_batches(BATCH_ROWS, columns=spec.input_cols)
        ]
        if not parts:
            return np.empty(0, dtype=np.float32)
        return np.concatenate(parts)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_estimators={self.n_estimators!r}, "
            f"objective={self.objective!r}, params={self.params!r}, "
            f"scaling_config={self.scaling_config!r})"
        )
