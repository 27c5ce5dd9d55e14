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


def test_exception_and_warning_trees_are_drawn_and_rooted() -> None:
    assert list(exceptions.__all__) == sorted(exceptions.__all__)
    for name in exceptions.__all__:
        cls = getattr(exceptions, name)
        assert issubclass(cls, (exceptions.NeveError, exceptions.NeveWarning)), name
        assert not issubclass(cls, exceptions.NeveError) or not issubclass(cls, Warning)
        assert name in exceptions.__doc__, f"{name} missing from the tree in the docstring"
    assert issubclass(exceptions.ConfigError, ValueError)
    assert issubclass(exceptions.WorkerLostError, exceptions.WorkerError)
    assert issubclass(exceptions.UnknownArgumentError, (exceptions.ConfigError, TypeError))
    assert issubclass(exceptions.NeveWarning, UserWarning)
    for name in ("NullsAsNaNWarning", "RowsDroppedWarning", "HighCardinalityWarning"):
        assert issubclass(getattr(exceptions, name), exceptions.DataWarning)
    assert issubclass(exceptions.ParameterWarning, exceptions.NeveWarning)


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


# -- signatures: typed, Snowflake's defaults, unknown keywords refused ----------------------

PUBLIC_CALLABLES = [
    ("neve.data", "DataConnector", ["from_dataframe", "from_sql", "from_sources",
                                    "from_ray_dataset", "to_pandas", "to_arrow",
                                    "iter_batches", "to_torch_dataset", "to_ray_dataset"]),
    ("neve.data", "ShardedDataConnector", ["from_dataframe", "from_sql", "from_sources",
                                           "from_ray_dataset", "get_shard"]),
    ("neve.xgboost", "XGBEstimator", ["__init__", "fit", "predict", "get_booster",
                                      "get_eval_results"]),
    ("neve.lightgbm", "LightGBMEstimator", ["__init__", "fit", "predict", "get_booster",
                                            "get_eval_results"]),
    ("neve.pytorch", "PyTorchDistributor", ["__init__", "run"]),
]


@pytest.mark.parametrize(("module", "name", "methods"), PUBLIC_CALLABLES,
                         ids=[c[1] for c in PUBLIC_CALLABLES])
def test_public_signatures_are_typed_without_catch_all_keywords(
    module: str, name: str, methods: list[str]
) -> None:
    import inspect

    cls = getattr(importlib.import_module(module), name)
    for method in methods:
        signature = inspect.signature(getattr(cls, method))
        where = f"{name}.{method}"
        assert signature.return_annotation is not inspect.Signature.empty, where
        for param in signature.parameters.values():
            if param.name in ("self", "cls"):
                continue
            assert param.kind is not param.VAR_KEYWORD, f"{where} takes **{param.name}"
            assert param.annotation is not inspect.Parameter.empty, f"{where}({param.name})"
            if param.name not in ("init_model",):  # a Booster, its bytes or its text
                assert param.annotation != "Any", f"{where}({param.name}: Any)"


def test_the_package_says_it_is_typed() -> None:
    from pathlib import Path

    import neve

    assert (Path(neve.__file__).parent / "py.typed").is_file()


def test_estimator_defaults_are_snowflakes() -> None:
    import inspect

    from neve.lightgbm import LightGBMEstimator
    from neve.xgboost import XGBEstimator

    for cls, objective in ((XGBEstimator, "reg:squarederror"), (LightGBMEstimator, "regression")):
        assert inspect.signature(cls).parameters["objective"].default == objective
        assert cls().objective == objective
        assert cls(objective="binary:logistic").objective == "binary:logistic"


def test_sharded_constructors_take_equal_by_name() -> None:
    import inspect

    from neve.data import DataConnector, ShardedDataConnector

    for name in ("from_dataframe", "from_sql", "from_sources", "from_ray_dataset"):
        param = inspect.signature(getattr(ShardedDataConnector, name)).parameters["equal"]
        assert (param.kind, param.default) == (param.KEYWORD_ONLY, False)
        assert "equal" not in inspect.signature(getattr(DataConnector, name)).parameters


@pytest.mark.parametrize(("call", "expected"), [
    # What the user saw accepted (issue 10): every keyword was swallowed.
    (lambda: _data().DataConnector.from_dataframe(_frame(), equal=True, shuffle="yes"),
     r"DataConnector\.from_dataframe\(\) got an unknown keyword argument 'equal' "
     r"\(and 'shuffle'\); equal= belongs to ShardedDataConnector.* It takes: df$"),
    (lambda: _data().DataConnector.from_dataframe(_frame()).to_torch_dataset(shufle=True),
     r"to_torch_dataset\(\) got an unknown keyword argument 'shufle'; did you mean "
     r"'shuffle'\? It takes: batch_size, shuffle, "),
    (lambda: _data().ShardedDataConnector.from_sql("SELECT 1 AS x", equl=True),
     r"ShardedDataConnector\.from_sql\(\) .* 'equl'; did you mean 'equal'\? "
     r"It takes: query, session, equal, partition_column$"),
    (lambda: importlib.import_module("neve.xgboost").XGBEstimator(max_depth=3),
     r"XGBEstimator\(\) .* 'max_depth'; framework parameters go in params="),
    (lambda: importlib.import_module("neve.lightgbm").LightGBMEstimator(num_workers=2),
     r"LightGBMEstimator\(\) .* 'num_workers'; it belongs to the scaling config: "
     r"scaling_config=LightGBMScalingConfig\(num_workers=\.\.\.\)"),
    (lambda: importlib.import_module("neve.lightgbm").LightGBMEstimator().fit(
        None, ["x"], "y", early_stoping_rounds=5),
     r"LightGBMEstimator\.fit\(\) .* did you mean 'early_stopping_rounds'\?"),
    (lambda: importlib.import_module("neve.xgboost").XGBScalingConfig(num_worker=2),
     r"XGBScalingConfig\(\) .* did you mean 'num_workers'\? "
     r"It takes: num_workers, num_cpu_per_worker, use_gpu$"),
    (lambda: importlib.import_module("neve.pytorch").WorkerResourceConfig(num_cpu=1),
     r"WorkerResourceConfig\(\) .* did you mean 'num_cpus'\?"),
    (lambda: importlib.import_module("neve.pytorch").PyTorchDistributor(print).run(
        datasets={}),
     r"PyTorchDistributor\.run\(\) .* 'datasets'; It takes: dataset_map, hyper_params, "
     r"artifact_stage_location, max_failures, resume_from$|did you mean 'dataset_map'"),
], ids=["from_dataframe", "to_torch_dataset", "sharded_from_sql", "estimator_param",
        "estimator_scaling", "fit", "scaling_config", "worker_resources", "run"])
def test_unknown_keywords_are_refused_with_what_is_accepted(call, expected: str) -> None:
    with pytest.raises(exceptions.UnknownArgumentError, match=expected) as info:
        call()
    assert isinstance(info.value, TypeError) and isinstance(info.value, exceptions.ConfigError)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_a_type_error_inside_a_method_is_not_mistaken_for_a_keyword() -> None:
    from neve.data import DataConnector

    with pytest.raises(TypeError, match="not iterable") as info:  # raised inside the method
        DataConnector.from_dataframe(_frame()).iter_batches(batch_size=4, columns=3)
    assert not isinstance(info.value, exceptions.UnknownArgumentError)


def _data():  # type: ignore[no-untyped-def]
    return importlib.import_module("neve.data")


def _frame():  # type: ignore[no-untyped-def]
    import pyarrow as pa

    return pa.table({"x": [1.0, 2.0, 3.0]})
