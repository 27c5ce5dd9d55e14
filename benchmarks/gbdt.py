"""GBDT: XGBoost and LightGBM from a DuckDB file, native against neve against Ray Train.

For each framework, on the ``train`` table of a DuckDB file (``--rows`` x 28
float32 + label), with the same parameters everywhere:

* ``native`` - one process, ``nthread=2``: the table read into NumPy, then
  ``xgboost.QuantileDMatrix`` + ``xgboost.train`` (hist) or ``lightgbm.Dataset`` +
  ``lightgbm.train``: the baseline;
* ``data-parallel`` - the framework's own distributed fit, two ranks of one thread
  (xgboost's RabitTracker, LightGBM's machine list, on loopback), each reading its
  half of the table into NumPy, in processes of their own and in two plain Ray
  actors: references for what splitting a fit, and Ray's processes, cost;
* ``neve`` - ``XGBEstimator`` / ``LightGBMEstimator`` on 2 workers x 1 CPU over
  ``DataConnector.from_dataframe(session.table("train"))``: a first fit in new
  processes, a warm fit (a new connector, so it reads the table again), and a
  first fit in processes Ray keeps ready (as after neve's idle timeout); each
  ``--repeat`` times (5), interleaved with native, each against the native fit of its
  round (the median of those ratios counting);
* ``Ray Train`` - ``XGBoostTrainer`` / ``LightGBMTrainer`` (2 workers x 1 CPU) over
  ``ray.data.from_arrow`` of the same table, written as Ray's documentation
  shows (``materialize().to_pandas()`` in each worker).

Every time counts from the table in DuckDB to a Booster in the driver; Ray is
started before (not counted). Before that, a user's view: the xgboost fit as a
script, plain and neve, each in a new Python process from its launch to the
Booster in hand (neve's starts its private Ray), ``--script-repeat`` times (3).
Quality is the RMSE on the held-out ``test`` table.
Worker memory is sampled with psutil while each fit runs: ``private`` is RSS less
shared pages (Ray's object store is shared), and neve's memory ratio is
``(peak private - a fresh worker's peak on a tiny fit) / shard float32 bytes``.

Run: ``python benchmarks/gbdt.py`` (1M rows), ``--rows 50000 --rounds 20`` to try.
"""

from __future__ import annotations

import operator
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

try:
    from benchmarks import _common as common
except ImportError:  # run as a script: python benchmarks/gbdt.py
    import _common as common  # type: ignore[no-redef]

WORKERS = 2
TINY_ROWS = 4000


# -- parameters --------------------------------------------------------------------------------


XGB_PARAMS: dict[str, Any] = {"objective": "reg:squarederror", "tree_method": "hist",
                              "max_depth": 6, "eta": 0.1, "max_bin": 256, "eval_metric": "rmse"}
LGB_PARAMS: dict[str, Any] = {"objective": "regression", "num_leaves": 63, "learning_rate": 0.1,
                              "max_bin": 255, "metric": "rmse", "verbosity": -1}


# -- data --------------------------------------------------------------------------------------


def read_xy(session: Any, table: str) -> tuple[np.ndarray, np.ndarray]:
    """A table (or a query) as a C-ordered float32 feature matrix and a label vector."""
    relation = session.table(table) if table.isidentifier() else session.sql(table)
    arrow = relation.to_arrow_table()
    x = np.empty((arrow.num_rows, common.NUM_FEATURES), dtype=np.float32)
    for j, name in enumerate(common.FEATURES):
        x[:, j] = arrow.column(name).to_numpy()
    y = arrow.column(common.LABEL).to_numpy().astype(np.float32)
    return x, y


def rmse(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred, dtype=np.float64) - y) ** 2)))


# -- native ------------------------------------------------------------------------------------


class OwnMemory:
    """How much this process's private memory grows while a block runs (sampled)."""

    def __enter__(self) -> OwnMemory:
        import psutil

        info = psutil.Process().memory_info()
        self.before = info.rss - info.shared
        self._sampler = common.MemorySampler(interval_s=0.02)
        self._sampler.add([os.getpid()])
        self._sampler.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sampler.__exit__(*exc)
        peak = self._sampler.summary()["peak_private"]
        self.growth = None if peak is None else max(peak - self.before, 0)


def _own_rank(framework: str, rank: int, database: str, rows: int, rounds: int,
              collective: dict[str, Any], out: Any) -> None:
    """One rank of the framework's own data-parallel fit, in a process (or Ray actor) of
    its own: its part of the table read into NumPy, one thread; the seconds from the
    read to the model go to ``out``."""
    import duckdb

    from neve._internal.runtime.worker import preload

    # The framework without what its scikit-learn wrapper imports, as neve's workers
    # import it (counted where the actors' start is: a Ray user could do the same). The
    # names are neve's gbdt.runner.LEFT_OUT, not imported here: the runner's own imports
    # would count.
    preload(framework, ("sklearn", "pandas"))
    if framework == "xgboost":
        import xgboost as xgb
    else:
        import lightgbm as lgb
    start, end = rank * rows // WORKERS, (rank + 1) * rows // WORKERS
    session = duckdb.connect(database, read_only=True)
    t0 = time.perf_counter()
    x, y = read_xy(session, f"SELECT * FROM train LIMIT {end - start} OFFSET {start}")
    if framework == "xgboost":
        with xgb.collective.CommunicatorContext(**collective, dmlc_task_id=str(rank)):
            dtrain = xgb.QuantileDMatrix(x, label=y, max_bin=256, nthread=1,
                                         feature_names=common.FEATURES)
            booster = xgb.train({**XGB_PARAMS, "nthread": 1}, dtrain,
                                num_boost_round=rounds, evals=[(dtrain, "train")],
                                verbose_eval=False)
        model: Any = bytes(booster.save_raw("ubj"))
    else:
        params = {**LGB_PARAMS, "num_threads": 1, "tree_learner": "data",
                  "num_machines": WORKERS, "pre_partition": True,
                  "machines": collective["machines"],
                  "local_listen_port": collective["ports"][rank]}
        dtrain = lgb.Dataset(x, label=y, feature_name=common.FEATURES, params=params,
                             free_raw_data=True)
        booster = lgb.train(params, dtrain, num_boost_round=rounds, valid_sets=[dtrain],
                            valid_names=["train"])
        model = booster.model_to_string()
    seconds = time.perf_counter() - t0
    session.close()
    out.put((rank, seconds, model if rank == 0 else None))


class _OwnRank:
    """A Ray actor that runs :func:`_own_rank` (and holds what it puts)."""

    def put(self, value: Any) -> None:
        self.value = value

    def run(self, *args: Any) -> tuple[int, Any]:
        _own_rank(*args, self)
        return os.getpid(), self.value


def native_distributed(framework: str, args: Any, database: str,
                       test: tuple[np.ndarray, np.ndarray], in_ray: bool) -> dict[str, Any]:
    """The framework's own data-parallel fit: two processes of one thread, xgboost's
    RabitTracker or LightGBM's machine list on loopback; in processes of their own, or
    (``in_ray``) in two Ray actors of one CPU. Its time runs from the reads to the last
    rank's model: process start and imports are not counted. In Ray, ``started_s`` also
    counts from the actors' creation, in new processes, to the model in this process.
    Either way the processes are gone before it returns."""
    import multiprocessing
    import socket

    common.release_neve_workers()  # their CPUs are these processes' now
    if framework == "xgboost":
        from xgboost.tracker import RabitTracker

        tracker = RabitTracker(n_workers=WORKERS, host_ip="127.0.0.1", sortby="task")
        tracker.start()
        collective: dict[str, Any] = dict(tracker.worker_args())
    else:
        ports = []
        for _ in range(WORKERS):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                ports.append(probe.getsockname()[1])
        collective = {"ports": ports,
                      "machines": ",".join(f"127.0.0.1:{port}" for port in ports)}
    if in_ray:
        import ray

        t0 = time.perf_counter()
        actors = [ray.remote(num_cpus=1)(_OwnRank).remote() for _ in range(WORKERS)]
        try:
            done = ray.get([actor.run.remote(framework, rank, database, args.rows,
                                             args.rounds, collective)
                            for rank, actor in enumerate(actors)], timeout=600)
            started_s = time.perf_counter() - t0
        finally:
            for actor in actors:
                ray.kill(actor)
        common.wait_exited([pid for pid, _ in done])
        ranks = [rank for _, rank in done]
    else:
        context = multiprocessing.get_context("spawn")
        out = context.Queue()
        processes = [context.Process(target=_own_rank, args=(
            framework, rank, database, args.rows, args.rounds, collective, out))
            for rank in range(WORKERS)]
        for process in processes:
            process.start()
        try:
            ranks = [out.get(timeout=600) for _ in processes]
        finally:
            for process in processes:
                process.join(timeout=30)
                if process.is_alive():
                    process.kill()
    model = next(m for _, _, m in ranks if m is not None)
    if framework == "xgboost":
        import xgboost as xgb

        booster: Any = xgb.Booster(model_file=bytearray(model))
    else:
        import lightgbm as lgb

        booster = lgb.Booster(model_str=model)
    out = {"fit_s": max(s for _, s, _ in ranks),
           "rmse": rmse(predict(framework, booster, test[0]), test[1])}
    if in_ray:
        out["started_s"] = started_s
    return out


def native(framework: str, args: Any, session: Any,
           test: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """A native fit, with the growth of this process's private memory while it runs."""
    fit = native_xgboost if framework == "xgboost" else native_lightgbm
    with OwnMemory() as memory:
        out = fit(args, session, test)
    out["memory_growth"] = memory.growth
    out["memory_ratio"] = common.ratio(memory.growth, args.rows * common.ROW_BYTES)
    return out


def native_xgboost(args: Any, session: Any, test: tuple[np.ndarray, np.ndarray]) -> dict:
    import xgboost as xgb

    t0 = time.perf_counter()
    x, y = read_xy(session, "train")
    t1 = time.perf_counter()
    dtrain = xgb.QuantileDMatrix(x, label=y, max_bin=256, nthread=2,
                                 feature_names=common.FEATURES)
    t2 = time.perf_counter()
    booster = xgb.train({**XGB_PARAMS, "nthread": 2}, dtrain, num_boost_round=args.rounds,
                        evals=[(dtrain, "train")], verbose_eval=False)
    t3 = time.perf_counter()
    pred = booster.predict(xgb.DMatrix(test[0], feature_names=common.FEATURES))
    return {"fit_s": t3 - t0, "read_s": t1 - t0, "matrix_s": t2 - t1, "train_s": t3 - t2,
            "rmse": rmse(pred, test[1])}


def native_lightgbm(args: Any, session: Any, test: tuple[np.ndarray, np.ndarray]) -> dict:
    import lightgbm as lgb

    t0 = time.perf_counter()
    x, y = read_xy(session, "train")
    t1 = time.perf_counter()
    params = {**LGB_PARAMS, "num_threads": 2}
    dtrain = lgb.Dataset(x, label=y, feature_name=common.FEATURES, params=params,
                         free_raw_data=True).construct()
    t2 = time.perf_counter()
    booster = lgb.train(params, dtrain, num_boost_round=args.rounds, valid_sets=[dtrain],
                        valid_names=["train"])
    t3 = time.perf_counter()
    return {"fit_s": t3 - t0, "read_s": t1 - t0, "matrix_s": t2 - t1, "train_s": t3 - t2,
            "rmse": rmse(booster.predict(test[0]), test[1])}


# -- neve --------------------------------------------------------------------------------------


class NeveFits:
    """neve fits with the worker processes' memory sampled while they run."""

    def __init__(self, framework: str, args: Any, database: str) -> None:
        self.framework = framework
        self.args = args
        self.database = database
        self._sampler: common.MemorySampler | None = None
        common.capture_neve_worker_pids(self._on_pids)

    def _on_pids(self, pids: list[int]) -> None:
        if self._sampler is not None:
            self._sampler.add(pids)

    def estimator(self) -> Any:
        if self.framework == "xgboost":
            from neve.xgboost import XGBEstimator, XGBScalingConfig

            return XGBEstimator(n_estimators=self.args.rounds, params=XGB_PARAMS,
                                scaling_config=XGBScalingConfig(num_workers=WORKERS,
                                                                num_cpu_per_worker=1))
        from neve.lightgbm import LightGBMEstimator, LightGBMScalingConfig

        return LightGBMEstimator(n_estimators=self.args.rounds, params=LGB_PARAMS,
                                 scaling_config=LightGBMScalingConfig(num_workers=WORKERS,
                                                                      num_cpu_per_worker=1))

    def fit(self, query: str | None = None) -> tuple[Any, float, dict[str, Any]]:
        """One fit on ``train`` (or on ``query``): booster, seconds, worker memory."""
        import duckdb

        from neve.data import DataConnector

        session = duckdb.connect(self.database, read_only=True)
        try:
            relation = session.table("train") if query is None else session.sql(query)
            with common.MemorySampler() as sampler:
                self._sampler = sampler
                t0 = time.perf_counter()
                # Made inside the timed span: workers it starts in the background count.
                estimator = self.estimator()
                booster = estimator.fit(DataConnector.from_dataframe(relation),
                                        input_cols=common.FEATURES, label_col=common.LABEL)
                seconds = time.perf_counter() - t0
                self._sampler = None
        finally:
            session.close()
        return booster, seconds, sampler.summary()


def predict(framework: str, booster: Any, x: np.ndarray) -> np.ndarray:
    if framework == "xgboost":
        import xgboost as xgb

        return booster.predict(xgb.DMatrix(x, feature_names=common.FEATURES))
    return booster.predict(x)


#: neve's fits of one repeat, in order: whether the warm workers were given back before
#: with a process kept ready for each (None: not given back), and what the fit is called
NEVE_FITS = (
    ("cold", False, "first fit, new workers in new processes"),
    ("warm", None, "warm fit"),
    ("first", True, "first fit, new workers in processes Ray keeps ready"),
)


def neve_once(fits: NeveFits, framework: str,
              test: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """A first fit in new processes (no warm workers, no process kept ready), a warm fit,
    and a first fit after the warm workers were given back as neve's idle timeout does
    (Ray keeps a process ready per worker, its framework imported; their own processes
    gone)."""
    out: dict[str, Any] = {}
    for key, keep_ready, what in NEVE_FITS:
        if keep_ready is not None:
            common.release_neve_workers(keep_ready=keep_ready)
        common.log(f"neve {framework}: {what} ...")
        booster, seconds, memory = fits.fit()
        out[key] = {"fit_s": seconds, "rmse": rmse(predict(framework, booster, test[0]), test[1]),
                    "memory": memory}
        common.log(f"neve {framework}: {what}: {seconds:.2f} s, RMSE {out[key]['rmse']:.4f}, "
                   f"peak private {common.fmt_mb(memory['peak_private'])} MiB/worker")
    return out


def neve_baseline(fits: NeveFits, framework: str, args: Any,
                  first_memory: dict[str, Any]) -> dict[str, Any]:
    """What a fresh worker holds fitting a few rows, and the first fit's memory beyond it
    per shard float32 byte."""
    common.release_neve_workers()
    common.log(f"neve {framework}: baseline memory: a fresh group fits {TINY_ROWS} rows ...")
    _, _, baseline = fits.fit(f"SELECT * FROM train LIMIT {TINY_ROWS}")
    common.release_neve_workers()
    shard_bytes = args.rows / WORKERS * common.ROW_BYTES
    peak, base = first_memory["peak_private"], baseline["peak_private"]
    ratio = None if peak is None or base is None else (peak - base) / shard_bytes
    common.log(f"neve {framework}: baseline {common.fmt_mb(base)} MiB/worker; "
               f"(peak - baseline) / shard float32 bytes = {common.fmt_x(ratio)}")
    return {"baseline": {"memory": baseline}, "shard_float32_bytes": shard_bytes,
            "memory_ratio": ratio}


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The first run's figures (its memory, its breakdown), with the median fit time of
    all and each one's time."""
    times = [r["fit_s"] for r in runs]
    return {**runs[0], "fit_s": float(np.median(times)), "all_s": times}


def run_pair(framework: str, args: Any, session: Any, database: str,
             test: tuple[np.ndarray, np.ndarray]
             ) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]:
    """Native, the framework's own data-parallel fit and neve (a first and a warm fit),
    ``--repeat`` times, interleaved: drift on a noisy machine hits all alike."""
    fits = NeveFits(framework, args, database)
    natives: list[dict[str, Any]] = []
    owns: list[dict[str, Any]] = []
    owns_in_ray: list[dict[str, Any]] = []
    owns_started: list[dict[str, Any]] = []
    neves: list[dict[str, Any]] = []
    failed: dict[str, Any] | None = None
    for i in range(args.repeat):
        common.log(f"native {framework} (nthread=2), {i + 1} of {args.repeat} ...")
        fit = native(framework, args, session, test)
        common.log(f"native {framework}: {fit['fit_s']:.2f} s (read {fit['read_s']:.2f} + "
                   f"matrix {fit['matrix_s']:.2f} + train {fit['train_s']:.2f}), RMSE "
                   f"{fit['rmse']:.4f}, memory +{common.fmt_mb(fit['memory_growth'])} MiB")
        natives.append(fit)
        own = native_distributed(framework, args, database, test, in_ray=False)
        common.log(f"{framework} data-parallel, 2 processes x 1 thread, no Ray: "
                   f"{own['fit_s']:.2f} s, RMSE {own['rmse']:.4f}")
        owns.append(own)
        own = native_distributed(framework, args, database, test, in_ray=True)
        common.log(f"{framework} data-parallel, 2 Ray actors x 1 CPU, no neve: "
                   f"{own['fit_s']:.2f} s ({own['started_s']:.2f} s from the actors' start), "
                   f"RMSE {own['rmse']:.4f}")
        owns_in_ray.append(own)
        owns_started.append({**own, "fit_s": own["started_s"]})
        if failed is None:
            try:
                neves.append(neve_once(fits, framework, test))
            except Exception as exc:  # report it in the table and go on
                common.log(f"neve {framework}: failed: {type(exc).__name__}: {exc}")
                common.release_neve_workers()
                failed = {"status": "failed", "reason": common.one_line(exc)}
    references = {"own": median_of(owns), "own_in_ray": median_of(owns_in_ray),
                  "own_in_ray_started": median_of(owns_started)}
    if failed is not None:
        return median_of(natives), references, failed
    neve: dict[str, Any] = {"status": "ok", **{key: median_of([n[key] for n in neves])
                                               for key, _, _ in NEVE_FITS}}
    neve.update(neve_baseline(fits, framework, args, neve["first"]["memory"]))
    return median_of(natives), references, neve


def ray_group_start(repeat: int) -> list[float]:
    """What Ray alone takes to start a group like neve's 2 x 1: a placement group, and an
    actor in each bundle, in a new process, to its first answer (nothing imported)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    class Bare:
        def pid(self) -> int:
            return os.getpid()

    bare = ray.remote(num_cpus=1)(Bare)
    times = []
    for _ in range(repeat):
        common.release_neve_workers()
        t0 = time.perf_counter()
        pg = placement_group([{"CPU": 1}] * WORKERS, strategy="PACK")
        ray.get(pg.ready())
        actors = [bare.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=i)).remote()
            for i in range(WORKERS)]
        ray.get([actor.pid.remote() for actor in actors])
        times.append(time.perf_counter() - t0)
        for actor in actors:
            ray.kill(actor)
        remove_placement_group(pg)
    common.wait_cpus_free()
    common.log(f"Ray alone: a placement group of {WORKERS} x 1 CPU and its actors answer in "
               f"{', '.join(f'{t:.2f}' for t in times)} s")
    return times


# -- Ray Train ---------------------------------------------------------------------------------
# The training functions run in Ray Train's workers: they reference nothing of this
# folder (its modules are not importable there).


def _report_at_end(save: Any, filename: str) -> None:
    """Report once, at the end, with rank 0's model as the checkpoint (Ray Train's
    ``ray.train.report`` from every worker): a report per round would cost one pass of
    Ray Train v2's controller loop each (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s)."""
    import os
    import tempfile

    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            save(os.path.join(folder, filename))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report({}, checkpoint=checkpoint)


def ray_train_xgboost_fn(config: dict[str, Any]) -> None:
    import os

    import ray.train
    import xgboost
    from ray.train.xgboost import RayTrainReportCallback

    open(os.path.join(config["pid_dir"], f"pid-{os.getpid()}"), "w").close()
    shard = ray.train.get_dataset_shard("train")
    frame = shard.materialize().to_pandas()
    x, y = frame.drop(columns=[config["label"]]), frame[config["label"]]
    dtrain = xgboost.DMatrix(x, label=y)
    booster = xgboost.train(config["params"], dtrain, num_boost_round=config["rounds"],
                            evals=[(dtrain, "train")], verbose_eval=False)
    _report_at_end(booster.save_model, RayTrainReportCallback.CHECKPOINT_NAME)


def ray_train_lightgbm_fn(config: dict[str, Any]) -> None:
    import os

    import lightgbm
    import ray.train
    from ray.train.lightgbm import (
        RayTrainReportCallback,
        get_network_params,
        normalize_pandas_for_lightgbm,
    )

    open(os.path.join(config["pid_dir"], f"pid-{os.getpid()}"), "w").close()
    shard = ray.train.get_dataset_shard("train")
    frame = normalize_pandas_for_lightgbm(shard.materialize().to_pandas())
    x, y = frame.drop(columns=[config["label"]]), frame[config["label"]]
    params = {**config["params"], "tree_learner": "data_parallel", "pre_partition": True,
              **get_network_params()}
    dtrain = lightgbm.Dataset(x, label=y)
    booster = lightgbm.train(params, dtrain, num_boost_round=config["rounds"],
                             valid_sets=[dtrain], valid_names=["train"])
    _report_at_end(booster.save_model, RayTrainReportCallback.CHECKPOINT_NAME)


def run_ray_train(framework: str, args: Any, database: str,
                  test: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    try:
        import duckdb
        import ray.data
        from ray.train import LoggingConfig, RunConfig, ScalingConfig

        if framework == "xgboost":
            from ray.train.xgboost import RayTrainReportCallback
            from ray.train.xgboost import XGBoostTrainer as Trainer

            params, fn = {**XGB_PARAMS, "nthread": 1}, ray_train_xgboost_fn
        else:
            from ray.train.lightgbm import LightGBMTrainer as Trainer
            from ray.train.lightgbm import RayTrainReportCallback

            params, fn = {**LGB_PARAMS, "num_threads": 1}, ray_train_lightgbm_fn
    except ImportError as exc:
        return {"status": "skipped", "reason": f"Ray Train not importable ({exc})"}
    common.release_neve_workers()
    storage = common.DATA_DIR / "ray_results"
    name = f"{framework}-{uuid.uuid4().hex[:8]}"
    pid_dir = tempfile.mkdtemp(prefix="neve-bench-pids-")
    log_path = common.DATA_DIR / "logs" / f"ray_train_{framework}.log"
    common.log(f"Ray Train {framework}: fit ... (its log lines go to {common.rel(log_path)})")
    try:
        with common.output_to(log_path), common.MemorySampler(pid_dir=pid_dir) as sampler:
            t0 = time.perf_counter()
            session = duckdb.connect(database, read_only=True)
            try:
                table = session.table("train").to_arrow_table()
            finally:
                session.close()
            trainer = Trainer(
                fn,
                train_loop_config={"params": params, "rounds": args.rounds,
                                   "label": common.LABEL, "pid_dir": pid_dir},
                datasets={"train": ray.data.from_arrow(table)},
                scaling_config=ScalingConfig(num_workers=WORKERS,
                                             resources_per_worker={"CPU": 1}),
                run_config=RunConfig(name=name, storage_path=str(storage),
                                     logging_config=LoggingConfig(log_level="WARNING")),
            )
            del table
            result = trainer.fit()
            booster = RayTrainReportCallback.get_model(result.checkpoint)
            seconds = time.perf_counter() - t0
            common.wait_cpus_free()  # its helper actors keep talking for a moment
            time.sleep(2.0)
    except Exception as exc:  # report and go on with the other measurements
        common.log(f"Ray Train {framework}: failed: {type(exc).__name__}: {exc}")
        return {"status": "failed", "reason": common.one_line(exc)}
    finally:
        shutil.rmtree(pid_dir, ignore_errors=True)
        shutil.rmtree(storage / name, ignore_errors=True)
    out = {"status": "ok", "fit_s": seconds,
           "rmse": rmse(predict(framework, booster, test[0]), test[1]),
           "memory": sampler.summary()}
    common.log(f"Ray Train {framework}: {seconds:.2f} s, RMSE {out['rmse']:.4f}, peak private "
               f"{common.fmt_mb(out['memory']['peak_private'])} MiB/worker")
    return out


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> Any:
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="training rows")
    parser.add_argument("--rounds", type=int, default=100, help="boosting rounds")
    parser.add_argument("--frameworks", default="xgboost,lightgbm",
                        help="comma-separated: xgboost, lightgbm")
    parser.add_argument("--repeat", type=common.at_least_one, default=5,
                        help="fits of the 1M-row case per contender (native, the references, "
                        "neve's two kinds of first fit and its warm fit; the median counts)")
    parser.add_argument("--script-repeat", type=int, default=3,
                        help="xgboost fits as a user's script in a new process, plain and neve, "
                        "each (0: skip)")
    parser.add_argument("--small-repeat", type=int, default=5,
                        help="fits of the small multi-class case per contender (0: skip it)")
    parser.add_argument("--no-ray-train", action="store_true",
                        help="leave Ray Train's trainers out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    unknown = set(frameworks) - {"xgboost", "lightgbm"}
    if unknown:
        raise SystemExit(f"--frameworks: unknown {sorted(unknown)}; use xgboost, lightgbm")
    common.log(f"GBDT benchmark: {args.rows:,} rows x {common.NUM_FEATURES} float32, "
               f"{args.rounds} rounds, {', '.join(frameworks)}")
    import duckdb

    for framework in frameworks:  # imported before any timing (native pays no import)
        __import__(framework)
    database = str(common.duckdb_file(args.rows))
    session = duckdb.connect(database, read_only=True)
    test = read_xy(session, "test")
    scripts = run_scripts(args, database) if args.script_repeat and "xgboost" in frameworks \
        else None
    ray_start_s = common.start_ray()

    results: dict[str, Any] = {"ray_start_s": ray_start_s}
    if scripts:
        results["scripts"] = scripts
    if args.small_repeat:  # before Ray Train's fits, whose actors stay (and use some CPU)
        results["small"] = run_small(args.small_repeat)
    for framework in frameworks:
        native_fit, references, neve = run_pair(framework, args, session, database, test)
        ray_train = (run_ray_train(framework, args, database, test) if not args.no_ray_train
                     else {"status": "skipped", "reason": "--no-ray-train"})
        results[framework] = {"native": native_fit, **references, "neve": neve,
                              "ray_train": ray_train}
    results["ray_group_start_s"] = ray_group_start(args.repeat)
    session.close()

    report = build_report(args, frameworks, results)
    report.print()
    report.write_json(args.json)
    return 0


# -- a fresh script: what a user's first run feels -------------------------------------------------

#: the same xgboost fit as a user's script writes it, in a new Python process; it prints the
#: wall-clock time when the model is in hand. Both evaluate the training set every round
#: (neve's default), as the 1M-row fits above do
SCRIPTS = {
    "native": """
import time, duckdb, numpy as np, xgboost as xgb
table = duckdb.connect({database!r}, read_only=True).table("train").to_arrow_table()
x = np.column_stack([table.column(c).to_numpy() for c in {features!r}])
dtrain = xgb.QuantileDMatrix(x, label=table.column({label!r}).to_numpy(), nthread=2)
booster = xgb.train({{**{params!r}, "nthread": 2}}, dtrain, num_boost_round={rounds},
                    evals=[(dtrain, "train")], verbose_eval=False)
print("MODEL", time.time(), flush=True)
""",
    "neve": """
import time, duckdb
from neve.data import DataConnector
from neve.xgboost import XGBEstimator, XGBScalingConfig
session = duckdb.connect({database!r}, read_only=True)
booster = XGBEstimator(n_estimators={rounds}, params={params!r},
                       scaling_config=XGBScalingConfig(num_workers=2, num_cpu_per_worker=1)
                       ).fit(DataConnector.from_dataframe(session.table("train")),
                             input_cols={features!r}, label_col={label!r})
print("MODEL", time.time(), flush=True)
""",
}


def run_scripts(args: Any, database: str) -> dict[str, Any]:
    """Plain xgboost and neve, each as a user's script in a new Python process, from its
    launch to the model in hand (neve's includes starting its private Ray and the workers),
    ``--script-repeat`` times, interleaved; run before this benchmark starts its own Ray."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "NEVE_LOCAL_NUM_CPUS"}
    env["NEVE_PROGRESS"] = "0"
    times: dict[str, list[float]] = {"native": [], "neve": []}
    for i in range(args.script_repeat):
        for who, template in SCRIPTS.items():
            code = template.format(database=database, features=common.FEATURES,
                                   label=common.LABEL, params=XGB_PARAMS, rounds=args.rounds)
            common.log(f"a fresh {who} script, {i + 1} of {args.script_repeat} ...")
            launched = time.time()
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  env=env, timeout=600)
            marks = [line.split()[1] for line in done.stdout.splitlines()
                     if line.startswith("MODEL ")]
            if done.returncode != 0 or not marks:
                raise RuntimeError(f"the {who} script failed: {done.stderr[-2000:]}")
            times[who].append(float(marks[0]) - launched)
            common.log(f"a fresh {who} script: model in hand {times[who][-1]:.2f} s after launch")
    return {who: {"all_s": t, "median_s": float(np.median(t))} for who, t in times.items()}


# -- a small fit: what a fit costs beyond training -----------------------------------------------

#: 56k rows x 77 features from a DuckDB aggregate, 15 classes, 100 rounds of multi:softmax
SMALL_GROUPS = 56_000
SMALL_FEATURES = [f"a{i}" for i in range(77)]
SMALL_PARAMS: dict[str, Any] = {"objective": "multi:softmax", "num_class": 15, "max_depth": 4,
                                "eta": 0.3, "tree_method": "hist", "max_bin": 256}


def small_session() -> tuple[Any, str]:
    """An in-memory DuckDB with a base table, and the aggregate query the fit reads."""
    import duckdb

    con = duckdb.connect()
    columns = ", ".join(f"random() AS v{i}" for i in range(11))
    con.execute(f"CREATE TABLE base AS SELECT (range % {SMALL_GROUPS}) AS k, {columns} "
                f"FROM range({SMALL_GROUPS * 10})")
    aggs = [f"{fn}(v{i}) AS a{7 * i + j}"
            for i in range(11) for j, fn in enumerate(("avg", "min", "max", "stddev", "sum",
                                                       "median", "var_pop"))]
    query = (f"SELECT {', '.join(aggs)}, (k % 15)::INTEGER AS cls FROM base GROUP BY k "
             "ORDER BY k")
    return con, query


def run_small(repeat: int) -> dict[str, Any]:
    """Native ``xgboost.train`` against neve's warm fit, on the same small aggregate, in two
    like-for-like pairs: neither evaluates the training set (what a fit costs beyond
    training), and both do (neve's default, which fills ``get_eval_results()["train"]``)."""
    import xgboost as xgb

    from neve.data import DataConnector
    from neve.xgboost import XGBEstimator, XGBScalingConfig

    con, query = small_session()
    common.release_neve_workers()
    scaling = XGBScalingConfig(num_workers=1, num_cpu_per_worker=2)

    def native_once(eval_train: bool) -> float:
        t0 = time.perf_counter()
        table = con.sql(query).to_arrow_table()
        x = np.column_stack([table.column(c).to_numpy() for c in SMALL_FEATURES])
        matrix = xgb.QuantileDMatrix(x.astype(np.float32),
                                     label=table.column("cls").to_numpy(), nthread=2)
        xgb.train({**SMALL_PARAMS, "nthread": 2}, matrix, num_boost_round=100,
                  evals=[(matrix, "train")] if eval_train else [], verbose_eval=False)
        return time.perf_counter() - t0

    def neve_once(eval_train: bool) -> float:
        t0 = time.perf_counter()
        XGBEstimator(n_estimators=100, params=SMALL_PARAMS, scaling_config=scaling).fit(
            DataConnector.from_sql(query, session=con), SMALL_FEATURES, "cls",
            eval_train=eval_train)
        return time.perf_counter() - t0

    common.log("small multi-class fit: neve's first fit starts the workers ...")
    out: dict[str, Any] = {"first_s": neve_once(False)}
    for eval_train in (False, True):
        key = "eval" if eval_train else "plain"
        times: dict[str, list[float]] = {"native": [], "neve": []}
        for _ in range(repeat):  # interleaved: drift on a noisy machine hits both alike
            times["native"].append(native_once(eval_train))
            times["neve"].append(neve_once(eval_train))
        common.log(f"small multi-class fit ({key}): native {sorted(times['native'])}, "
                   f"neve warm {sorted(times['neve'])}")
        out[key] = {who: {"all_s": t, "median_s": float(np.median(t))}
                    for who, t in times.items()}
    common.release_neve_workers()
    con.close()
    return out


def all_s(fit: dict[str, Any]) -> str:
    return ", ".join(f"{x:.2f}" for x in fit.get("all_s", [fit["fit_s"]]))


def paired_extra(times: list[float], bases: list[float],
                 combine: Callable[[float, float], float] = operator.sub) -> float:
    """The median, over the rounds, of a time less (or ``combine``d with) the native time
    of its round: on a machine that drifts during a run, each against its neighbour in
    time."""
    return float(np.median([combine(t, b) for t, b in zip(times, bases, strict=True)]))


def paired_ratio(fit: dict[str, Any], native: dict[str, Any]) -> float | None:
    """:func:`paired_extra` as a ratio of a fit's times to native's (a single fit, as Ray
    Train's: against native's median)."""
    times, bases = fit.get("all_s", []), native.get("all_s", [])
    if len(times) < 2 or len(times) != len(bases):
        return common.ratio(fit["fit_s"], native["fit_s"])
    return paired_extra(times, bases, operator.truediv)


def build_report(args: Any, frameworks: list[str], results: dict[str, Any]) -> common.Report:
    report = common.Report("gbdt", "XGBoost and LightGBM from a DuckDB file",
                           {"rows": args.rows, "features": common.NUM_FEATURES,
                            "rounds": args.rounds, "repeat": args.repeat,
                            "workers": f"{WORKERS} x 1 CPU",
                            "ray_cpus": os.environ.get("NEVE_LOCAL_NUM_CPUS")})
    shard_bytes = args.rows / WORKERS * common.ROW_BYTES
    rows = []
    names = {"xgboost": ("xgboost.train", "XGBEstimator", "XGBoostTrainer"),
             "lightgbm": ("lightgbm.train", "LightGBMEstimator", "LightGBMTrainer")}
    for framework in frameworks:
        r = results[framework]
        native, neve, ray_train = r["native"], r["neve"], r["ray_train"]
        base = native["fit_s"]
        native_name, neve_name, ray_name = names[framework]

        def mem(m: dict[str, Any] | None) -> list[str]:
            if not m or m.get("peak_rss") is None:
                return ["-", "-"]
            return [common.fmt_mb(m["peak_rss"]), common.fmt_mb(m["peak_private"])]

        rows.append([f"{native_name} native (nthread=2)", common.fmt_s(base), all_s(native),
                     "1.00x", "1.00x",
                     f"{native['rmse']:.4f}", "-",
                     f"+{common.fmt_mb(native['memory_growth'])}",
                     common.fmt_x(native["memory_ratio"])])
        for key, where in (("own", "2 processes x 1 thread, no Ray"),
                           ("own_in_ray", "2 Ray actors x 1 CPU, no neve"),
                           ("own_in_ray_started", "2 Ray actors x 1 CPU, no neve, "
                                                  "from the actors' start")):
            own = r.get(key)
            if own:
                rows.append([f"{native_name} data-parallel, {where} (reference)",
                             common.fmt_s(own["fit_s"]), all_s(own),
                             common.fmt_x(paired_ratio(own, native)),
                             common.fmt_x(common.ratio(own["fit_s"], base)),
                             f"{own['rmse']:.4f}", "-", "-", "-"])
        for key, _, what in NEVE_FITS:
            if neve["status"] != "ok":
                rows.append([f"neve {neve_name} 2x1, {what}", "-", "-", "-", "-", "-", "-", "-",
                             f"failed: {neve['reason']}"])
                continue
            fit = neve[key]
            rows.append([f"neve {neve_name} 2x1, {what}", common.fmt_s(fit["fit_s"]),
                         all_s(fit), common.fmt_x(paired_ratio(fit, native)),
                         common.fmt_x(common.ratio(fit["fit_s"], base)),
                         f"{fit['rmse']:.4f}",
                         *mem(fit["memory"]),
                         common.fmt_x(neve["memory_ratio"]) if key == "first" else "-"])
        if ray_train.get("status") == "ok":
            rows.append([f"Ray Train {ray_name} 2x1", common.fmt_s(ray_train["fit_s"]),
                         all_s(ray_train),
                         common.fmt_x(paired_ratio(ray_train, native)),
                         common.fmt_x(common.ratio(ray_train["fit_s"], base)),
                         f"{ray_train['rmse']:.4f}", *mem(ray_train["memory"]), "-"])
        else:
            rows.append([f"Ray Train {ray_name} 2x1", "-", "-", "-", "-", "-", "-", "-",
                         f"{ray_train['status']}: {ray_train['reason']}"])
        if neve["status"] != "ok":
            continue
        for key, _, what in NEVE_FITS:
            reached = paired_ratio(neve[key], native)
            report.target(f"neve {framework} {what} vs native", "<= 1.10x", reached,
                          None if reached is None else reached <= 1.10)
        report.target(f"neve {framework} worker memory / shard float32 bytes", "<= 0.60x",
                      neve["memory_ratio"],
                      None if neve["memory_ratio"] is None else neve["memory_ratio"] <= 0.6)
    report.table(
        "Fit time (DuckDB table -> Booster in the driver), quality, worker memory",
        ["contender", "fit s", "all s", "vs native", "medians' ratio", "test RMSE",
         "peak RSS MiB", "peak private MiB", "mem / shard"],
        rows,
        notes=[
            f"fit s: the median of {args.repeat} fits each (Ray Train: one), native and neve "
            "interleaved (all s in their order); memory and RMSE: the first of each",
            "vs native: the median over the rounds of each fit's time over the native fit's "
            "of its round, as the machine drifts during a run (Ray Train's one fit: over "
            "native's median); medians' ratio: fit s over native's fit s",
            "a first fit starts new worker actors after the warm ones were given back "
            "(their processes gone): in processes Ray keeps ready (neve asks for one per "
            "worker where its idle timeout gives a group back; they import the framework "
            "as they start, and the fit starts once they are up and quiet, as after the "
            "idle timeout), or in new processes (nothing kept ready: Python's and Ray's "
            "start and the framework's import in each worker counted too)",
            "data-parallel (references, not limits): the framework's own distributed fit in "
            f"{WORKERS} processes of one thread (xgboost's RabitTracker, LightGBM's machine "
            "list, on loopback), each reading its half of the table into NumPy; from the "
            "reads to the last model, process start and imports not counted (as in a warm "
            "fit). In processes of their own, it is what splitting one fit over two workers "
            "costs on this machine, whoever runs them; in Ray actors, what running them in "
            "Ray's worker processes adds. They run unpinned, as Ray runs processes; neve's "
            "workers, whose group takes every CPU here, train pinned to one CPU each "
            "(NEVE_PIN_WORKERS)",
            "from the actors' start: the same Ray actors' run timed in the benchmark's process "
            "from their creation (no placement group; new processes: Python's and Ray's start, "
            "the framework imported without scikit-learn and pandas, as neve's workers do) to "
            "the model: a first fit on Ray without neve",
            "a first fit's cost beyond a warm one is mostly Ray's: alone, a placement group "
            f"of {WORKERS} x 1 CPU and an actor in each bundle (each in a new process, "
            "nothing imported) answer in "
            f"{float(np.median(results['ray_group_start_s'])):.2f} s (median of "
            f"{len(results['ray_group_start_s'])})",
            f"Ray started before the fits ({results['ray_start_s']:.1f} s, not counted); "
            "native reads the table into NumPy inside its time",
            "peak MiB: the largest worker; private = RSS less shared pages (Ray's object "
            "store is shared memory)",
            f"mem / shard = (peak private - peak private of a fresh worker fitting {TINY_ROWS} "
            f"rows) / shard float32 bytes ({shard_bytes / 2**20:.0f} MiB: "
            f"{args.rows // WORKERS:,} rows x 29 x 4 B)",
            "native: +MiB = growth of the benchmark process's private memory during the fit "
            "(its NumPy copy of the table included); mem / shard = that / float32 bytes of "
            "all rows (its shard is the whole table)",
            "Ray Train workers follow Ray's documented pattern: "
            "get_dataset_shard().materialize().to_pandas(), then DMatrix / lightgbm.Dataset; "
            "they report once, at the end, with rank 0's model (ray.train.report). Untuned, "
            "with RayTrainReportCallback() reporting every round, Ray Train v2's controller "
            "took ~2 s per round (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): 15.9x / 11.8x native "
            "at 1M rows and 100 rounds (commit 17f5946, an earlier BENCHMARKS.md)",
        ],
    )
    scripts = results.get("scripts")
    if scripts:
        native, neve = scripts["native"], scripts["neve"]
        report.table(
            "A fresh script: xgboost from the DuckDB file, launch to model",
            ["contender", "median s", "all s", "vs native"],
            [["plain xgboost script (nthread=2)", common.fmt_s(native["median_s"]),
              ", ".join(f"{x:.2f}" for x in native["all_s"]), "+0.00 s"],
             ["neve script (XGBEstimator 2x1; starts its private Ray and workers)",
              common.fmt_s(neve["median_s"]), ", ".join(f"{x:.2f}" for x in neve["all_s"]),
              f"{paired_extra(neve['all_s'], native['all_s']):+.2f} s"]],
            notes=[f"median of {len(native['all_s'])} each, interleaved, before this "
                   "benchmark's own Ray starts; each a new Python process, timed from its "
                   "launch to the Booster in hand (imports, the read, Ray's start and "
                   f"{args.rounds} rounds; not the exit)",
                   "vs native: the median over the rounds of each neve script's time less "
                   "the plain script's of its round"],
        )
    small = results.get("small")
    if small:
        rows = []
        for key, what in (("plain", "no evaluation"), ("eval", "the training set evaluated")):
            native, neve = small[key]["native"], small[key]["neve"]
            rows += [[f"xgboost.train native (nthread=2), the query read into NumPy; {what}",
                      common.fmt_s(native["median_s"]),
                      ", ".join(f"{x:.2f}" for x in native["all_s"]), "+0.00 s"],
                     [f"neve XGBEstimator 1x2, warm fit; {what}", common.fmt_s(neve["median_s"]),
                      ", ".join(f"{x:.2f}" for x in neve["all_s"]),
                      f"{paired_extra(neve['all_s'], native['all_s']):+.2f} s"]]
        report.table(
            f"A small fit: {SMALL_GROUPS:,} rows x {len(SMALL_FEATURES)} features from a DuckDB "
            "aggregate, 15 classes, 100 rounds",
            ["contender", "median s", "all s", "vs native"], rows,
            notes=[f"median of {len(small['plain']['neve']['all_s'])} fits each, native and "
                   "neve interleaved (all s in their order); vs native: the median over the "
                   "rounds of neve's time less native's of its round; neve's first fit "
                   f"(fresh workers) took {small['first_s']:.2f} s",
                   "run before the 1M-row fits and Ray Train's: Ray Train's actors (its "
                   "controller, Ray Data's coordinators) stay after its fits, using 0.3 s of "
                   "CPU every 10 s between them",
                   "no evaluation: fit(..., eval_train=False) against xgboost.train without "
                   "evals, what a fit costs beyond training; the training set evaluated: "
                   "neve's default (its metrics in get_eval_results()['train']) against "
                   "evals=[(dtrain, 'train')]"],
        )
        for key, what in (("plain", ""), ("eval", ", training set evaluated")):
            extra = paired_extra(small[key]["neve"]["all_s"], small[key]["native"]["all_s"])
            report.target(f"neve small multi-class warm fit - native{what}", "<= +0.30 s",
                          extra, extra <= 0.3, unit="s")
    report.results = results
    return report


if __name__ == "__main__":
    sys.exit(main())
