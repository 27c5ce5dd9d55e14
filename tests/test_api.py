"""The public surface: pinned import paths, sorted __all__, the exception tree, configs."""

from __future__ import annotations

import dataclasses
import importlib
import pickle

import pytest

import neve.exceptions as exceptions
from neve._internal import settings

PUBLIC = {
    "neve.data": {"DataConnector", "ShardedDataConnector"},
    "neve.xgboost": {"XGBEstimator", "XGBScalingConfig"},
    "neve.lightgbm": {"LightGBMEstimator", "LightGBMScalingConfig"},
    "neve.pytorch": {"PyTorchDistributor", "PyTorchScalingConfig", "WorkerResourceConfig",
                     "get_context"},
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_pinned_names_are_exported_with_a_sorted_all(module: str) -> None:
    mod = importlib.import_module(module)
    assert PUBLIC[module] <= set(mod.__all__)
    assert list(mod.__all__) == sorted(mod.__all__)
    for name in mod.__all__:
        assert getattr(mod, name) is not None
        assert getattr(mod, name).__doc__, f"{module}.{name} has no docstring"


def test_exception_tree_is_drawn_and_rooted() -> None:
    assert list(exceptions.__all__) == sorted(exceptions.__all__)
    for name in exceptions.__all__:
        cls = getattr(exceptions, name)
        assert issubclass(cls, exceptions.NeveError)
        assert name in exceptions.__doc__, f"{name} missing from the tree in the docstring"
    assert issubclass(exceptions.ConfigError, ValueError)
    assert issubclass(exceptions.WorkerLostError, exceptions.WorkerError)


def test_worker_errors_keep_their_rank_across_pickling() -> None:
    error = exceptions.WorkerLostError("worker rank 3 died", rank=3)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is exceptions.WorkerLostError
    assert copy.rank == 3 and str(copy) == "worker rank 3 died"


def test_scaling_configs_are_frozen_and_validated_when_built() -> None:
    from neve.lightgbm import LightGBMScalingConfig
    from neve.xgboost import XGBScalingConfig

    config = XGBScalingConfig(num_workers=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_workers = 3  # type: ignore[misc]
    expected = r"`num_workers` must be -1 \(auto\) or >= 1, got 0"
    with pytest.raises(exceptions.ConfigError, match=expected):
        XGBScalingConfig(num_workers=0)
    with pytest.raises(exceptions.ConfigError, match="num_cpu_per_worker"):
        LightGBMScalingConfig(num_cpu_per_worker=-5)
    with pytest.raises(exceptions.ConfigError, match="use_gpu"):
        XGBScalingConfig(use_gpu="yes")  # type: ignore[arg-type]


def test_settings_name_the_variable_and_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEVE_PLACEMENT_TIMEOUT_S", "soon")
    with pytest.raises(exceptions.ConfigError, match=r"NEVE_PLACEMENT_TIMEOUT_S.*'soon'"):
        settings.PLACEMENT_TIMEOUT_S.get()
    monkeypatch.setenv("NEVE_PLACEMENT_TIMEOUT_S", "2.5")
    assert settings.PLACEMENT_TIMEOUT_S.get() == 2.5
    monkeypatch.delenv("NEVE_PLACEMENT_TIMEOUT_S")
    assert settings.PLACEMENT_TIMEOUT_S.get() == settings.PLACEMENT_TIMEOUT_S.default


def test_library_adds_only_a_null_handler() -> None:
    import logging

    handlers = logging.getLogger("neve").handlers
    assert handlers and all(isinstance(h, logging.NullHandler) for h in handlers)
