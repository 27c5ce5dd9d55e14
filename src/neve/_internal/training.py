"""Running a checked job: connect to Ray, fit, publish the model to its stage.

``neve train`` runs a :class:`~neve._internal.jobs.Job`; ``neve demo`` uses the
same pieces (``connect``, ``gbdt_estimator``, ``publish_booster``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from neve._internal.jobs import Job, check_columns, connector
from neve.exceptions import ConfigError, ResourcesUnavailableError, RowsDroppedWarning


@dataclass
class JobResult:
    """What a run produced: where the model went, its metrics, how long it took."""

    framework: str
    location: str
    files: list[str]
    metrics: dict[str, float]
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


def connect(say: Callable[[str], None], address: str | None = None) -> Any:
    """Connect to Ray (or start a private local instance), saying so; return its view."""
    import sys

    from neve._internal import settings
    from neve._internal.runtime import cluster

    ray = sys.modules.get("ray")
    started = time.monotonic()
    if ray is None or not ray.is_initialized():
        target = address or settings.ray_address()
        say(f"cluster   joining the Ray cluster at {target} ..." if target else
            "cluster   starting a private local Ray instance ...")
    cluster.ensure_ray(address)
    view = cluster.view()
    kind = "private local Ray" if cluster.started_here() else "Ray"
    say(f"cluster   {kind} ready in {time.monotonic() - started:.1f} s: {view.describe()}")
    return view


def run(job: Job, say: Callable[[str], None] = print, address: str | None = None) -> JobResult:
    """Train the job's model on the cluster (neve connects or starts one) and publish it."""
    from neve._internal import stages

    train = connector(job, job.source, _train_class(job), **_train_kwargs(job))
    check_columns(job, train, job.source)
    evaluation = None
    if job.eval is not None:
        evaluation = connector(job, job.eval, _train_class(job))
        check_columns(job, evaluation, job.eval)
    stage = stages.resolve(job.stage)
    stages.check_writable(stage)
    say(f"data      {job.source.describe()}"
        + (f"; eval: {job.eval.describe()}" if job.eval else ""))
    say(f"columns   {len(job.input_cols)} input{'s' if len(job.input_cols) != 1 else ''} "
        f"-> {job.label_col}")
    view = connect(say, address)
    started = time.monotonic()
    if job.is_gbdt:
        result = _run_gbdt(job, train, evaluation, stage, view, say)
    else:
        result = _run_pytorch(job, train, evaluation, stage, view, say)
    result.seconds = time.monotonic() - started
    return result


def _train_class(job: Job) -> Any:
    from neve.data import DataConnector, ShardedDataConnector

    return ShardedDataConnector if job.framework == "pytorch" else DataConnector


def _train_kwargs(job: Job) -> dict[str, Any]:
    # DDP needs the same number of steps on every rank: equal shards, exact batches.
    return {"equal": True} if job.framework == "pytorch" else {}


def gbdt_estimator(framework: str, *, n_estimators: int, objective: str | None,
                   params: Mapping[str, Any], scaling: Mapping[str, Any]) -> Any:
    """An XGBEstimator or LightGBMEstimator with the given settings."""
    # No objective in the job: the estimator's own default (Snowflake's).
    if framework == "xgboost":
        from neve.xgboost import XGBEstimator, XGBScalingConfig

        return XGBEstimator(n_estimators=n_estimators, params=dict(params),
                            objective=objective or XGBEstimator._default_objective,
                            scaling_config=XGBScalingConfig(**scaling))
    from neve.lightgbm import LightGBMEstimator, LightGBMScalingConfig

    return LightGBMEstimator(n_estimators=n_estimators, params=dict(params),
                             objective=objective or LightGBMEstimator._default_objective,
                             scaling_config=LightGBMScalingConfig(**scaling))


def last_metrics(evals: Mapping[str, Mapping[str, Sequence[float]]],
                 best: int | None = None) -> dict[str, float]:
    """``{"eval-auc": 0.81, ...}`` at the best (or last) round."""
    out: dict[str, float] = {}
    for data, log in evals.items():
        for name, values in log.items():
            if values:
                out[f"{data}-{name}"] = float(values[best if best is not None else -1])
    return out


def publish_booster(framework: str, booster: Any, stage: Any, name: str,
                    meta: Mapping[str, Any]) -> tuple[str, list[str]]:
    """Save a Booster and ``meta.json`` to ``<stage>/model/<name>/``, whole or not at all."""
    from neve._internal import stages

    model_file = "model.json" if framework == "xgboost" else "model.txt"
    with tempfile.TemporaryDirectory(prefix="neve-model-") as folder:
        booster.save_model(os.path.join(folder, model_file))
        with open(os.path.join(folder, "meta.json"), "w") as handle:
            json.dump({"framework": framework, "model_file": model_file, **meta}, handle,
                      indent=2, default=str)
        location = stages.publish(stage, name, stages.LocalFiles(folder))
    return location, [model_file, "meta.json"]


def _run_gbdt(job: Job, train: Any, evaluation: Any, stage: Any, view: Any,
              say: Callable[[str], None]) -> JobResult:
    from neve._internal import stages

    settings = job.model
    try:
        estimator = gbdt_estimator(job.framework, n_estimators=settings["n_estimators"],
                                   objective=settings["objective"], params=settings["params"],
                                   scaling=job.scaling)
        layout = estimator.scaling_config.resolve(view)
        layout.check_feasible(view)
    except (ConfigError, ResourcesUnavailableError) as exc:
        raise job.error(_scaling_key(job), str(exc)) from exc
    rounds = settings["params"].get("num_boost_round", settings["n_estimators"])
    say(f"training  {job.framework} ({estimator.objective}, {rounds} rounds) on "
        f"{layout.describe()}")
    started = time.monotonic()
    booster = estimator.fit(train, list(job.input_cols), job.label_col, eval_set=evaluation,
                            verbose_eval=settings["verbose_eval"], weight_col=job.weight_col,
                            group_col=job.group_col,
                            early_stopping_rounds=settings["early_stopping_rounds"])
    seconds = time.monotonic() - started
    best = estimator.best_iteration
    if best is not None and job.framework == "lightgbm":
        best -= 1  # LightGBM counts its best iteration from 1, xgboost from 0
    metrics = last_metrics(estimator.get_eval_results(), best)
    say(f"trained   in {seconds:.1f} s" + (": " + _format(metrics) if metrics else ""))
    spec = estimator._spec
    meta = {
        "objective": estimator.objective, "inputs": list(job.input_cols), "label": job.label_col,
        "categories": {k: list(v) for k, v in (spec.categories if spec else {}).items()},
        "best_iteration": estimator.best_iteration, "metrics": metrics,
        "job": os.path.abspath(job.path),
    }
    location, files = publish_booster(job.framework, booster, stage,
                                      f"{job.framework}-{stages.new_request_id()}", meta)
    return JobResult(job.framework, location, files, metrics, seconds)


def _scaling_key(job: Job) -> str:
    """The [scaling] key to blame when the cluster cannot hold what the job asks."""
    for key in ("num_workers", "num_workers_per_node", "num_nodes", "num_cpu_per_worker",
                "num_cpus", "num_gpus", "use_gpu"):
        if key in job.scaling:
            return f"scaling.{key}"
    return "scaling"


def _run_pytorch(job: Job, train: Any, evaluation: Any, stage: Any, view: Any,
                 say: Callable[[str], None]) -> JobResult:
    from neve._internal import mlp
    from neve.pytorch import PyTorchDistributor, PyTorchScalingConfig, WorkerResourceConfig

    settings = job.model
    scaling = None
    if job.scaling:
        resources = {k: job.scaling[k] for k in ("num_cpus", "num_gpus") if k in job.scaling}
        scaling = PyTorchScalingConfig(
            num_nodes=job.scaling.get("num_nodes", 1),
            num_workers_per_node=job.scaling.get("num_workers_per_node", 1),
            resource_requirements_per_worker=WorkerResourceConfig(**resources),
        )
        try:
            scaling.layout().check_feasible(view)
        except ResourcesUnavailableError as exc:
            raise job.error(_scaling_key(job), str(exc)) from exc
    hyper = {"inputs": list(job.input_cols), "label": job.label_col, **settings}
    say(f"training  pytorch MLP {settings['hidden']} ({settings['objective']}, "
        f"{settings['epochs']} epoch{'s' if settings['epochs'] != 1 else ''}, batch "
        f"{settings['batch_size']}, lr {settings['lr']:g})"
        + (f" on {scaling.layout().describe()}" if scaling else ""))
    datasets = {"train": train}
    if evaluation is not None:
        datasets["eval"] = evaluation
    started = time.monotonic()
    with warnings.catch_warnings():
        # equal=True is neve's choice for DDP (see _train_kwargs): a job cannot change it.
        warnings.simplefilter("ignore", RowsDroppedWarning)
        result = PyTorchDistributor(mlp.train_func, scaling).run(
            dataset_map=datasets, hyper_params=hyper, artifact_stage_location=stage.url)
    seconds = time.monotonic() - started
    epochs = [m for m in result.metrics_history if "train_loss" in m]
    for entry in epochs:
        say(f"  epoch {entry['epoch']}: " + _format({k: v for k, v in entry.items()
                                                      if k != "epoch"}))
    metrics = {k: float(v) for k, v in (epochs[-1] if epochs else {}).items() if k != "epoch"}
    say(f"trained   in {seconds:.1f} s")
    return JobResult("pytorch", result.get_model_dir(), [mlp.MODEL_FILE, mlp.META_FILE],
                     metrics, seconds, epochs)


def _format(metrics: Mapping[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
