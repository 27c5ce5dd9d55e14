"""``neve demo``: a credit-risk table in a DuckDB file, three models trained on it.

The table is generated inside DuckDB with SQL (deterministic: every random
draw is a hash of the row number), split into ``TRAINING_DATA`` and
``EVAL_DATA`` (~10 %), and kept for the next run when it already holds the
asked-for row count. Then, on a private local Ray: ``XGBEstimator`` and
``LightGBMEstimator`` read the tables the seed's way
(``DataConnector.from_dataframe(session.table(...))``), and a PyTorch MLP trains
through ``PyTorchDistributor`` on a ``ShardedDataConnector``. Every model lands
under ``<stage>/model/<name>/``; the driver scores each on ``EVAL_DATA``.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from neve._internal import mlp
from neve.exceptions import ConfigError, RowsDroppedWarning, SourceError

#: bump when the generator changes, so an old warehouse is regenerated
GENERATOR_VERSION = 1
META_TABLE = "NEVE_DEMO_META"
FEATURES = ["age", "income", "credit_score", "debt_ratio", "num_accounts",
            "num_late_payments", "years_employed", "region"]
LABEL = "default_risk"
REGIONS = ("north", "south", "east", "west", "central")


def _uniform(k: int) -> str:
    """A deterministic uniform draw in (0, 1) for row ``i`` and stream ``k``."""
    return f"((hash(i * 64 + {k}) >> 11)::DOUBLE + 0.5) / 9007199254740992.0"


def _normal(k: int) -> str:
    """A standard normal draw (Box-Muller over streams ``k`` and ``k + 1``)."""
    return f"sqrt(-2 * ln({_uniform(k)})) * cos(2 * pi() * {_uniform(k + 1)})"


# Each CTE builds on the previous one, so the features correlate as real ones do.
GENERATE_SQL = f"""
CREATE OR REPLACE TEMP TABLE demo_rows AS
WITH base AS (
    SELECT range AS i,
           {_normal(1)} AS z_age, {_normal(3)} AS z_income, {_normal(5)} AS z_score,
           {_normal(7)} AS z_debt, {_uniform(9)} AS u_employed, {_uniform(10)} AS u_accounts,
           {_uniform(11)} AS u_late, {_uniform(12)} AS u_region, {_uniform(13)} AS u_label,
           {_uniform(14)} AS u_split
    FROM range($rows)
), people AS (
    SELECT *,
           least(greatest(round(41 + 12 * z_age), 18), 85)::INTEGER AS age,
           CASE WHEN u_region < 0.26 THEN 'north' WHEN u_region < 0.48 THEN 'south'
                WHEN u_region < 0.66 THEN 'east' WHEN u_region < 0.85 THEN 'west'
                ELSE 'central' END AS region
    FROM base
), work AS (
    SELECT *,
           round((age - 18) * u_employed * (0.35 + 0.55 * u_accounts), 1) AS years_employed,
           1 + least(floor(-ln(u_accounts) * 3.5), 29)::INTEGER AS num_accounts
    FROM people
), money AS (
    SELECT *,
           round(exp(10.55 + 0.45 * z_income + 0.012 * least(age - 18, 30)
                     + 0.015 * years_employed
                     + CASE region WHEN 'north' THEN 0.12 WHEN 'south' THEN -0.10
                                   WHEN 'west' THEN 0.05 ELSE 0 END), 2) AS income
    FROM work
), credit AS (
    SELECT *,
           least(greatest(round(660 + 55 * z_score + 28 * ln(income / 45000)
                                + 1.2 * least(years_employed, 25)), 300), 850)::INTEGER
               AS credit_score,
           round(least(greatest(0.32 + 0.14 * z_debt + 0.012 * num_accounts
                                - 0.08 * ln(income / 45000), 0), 2.5), 3) AS debt_ratio
    FROM money
), history AS (
    SELECT *,
           least(floor(-ln(u_late) * (0.25 + 2.2 * (credit_score < 600)::INTEGER
                                     + 0.6 * (debt_ratio > 0.5)::INTEGER)), 20)::INTEGER
               AS num_late_payments
    FROM credit
), risk AS (
    SELECT *,
           -2.1 - 0.010 * (credit_score - 660) + 2.6 * (debt_ratio - 0.32)
           - 0.40 * ln(income / 45000) + 0.30 * num_late_payments
           - 0.035 * least(years_employed, 15) + 0.45 * (age < 25)::INTEGER
           + 0.0006 * (age - 45) * (age - 45)
           + 1.1 * (debt_ratio > 0.55 AND credit_score < 610)::INTEGER
           + CASE region WHEN 'south' THEN 0.30 WHEN 'north' THEN -0.20
                         WHEN 'west' THEN 0.15 WHEN 'central' THEN -0.10 ELSE 0 END AS logit
    FROM history
)
SELECT 100000 + i AS customer_id, age, income, credit_score, debt_ratio, num_accounts,
       num_late_payments, years_employed, region,
       (u_label < 1 / (1 + exp(-logit)))::INTEGER AS {LABEL},
       u_split < 0.1 AS is_eval
FROM risk
"""


@dataclass
class Warehouse:
    """The demo's tables and whether this run made them."""

    path: str
    train_rows: int
    eval_rows: int
    generated: bool
    seconds: float


def _existing_rows(con: Any) -> int | None:
    try:
        found = con.sql(f"SELECT rows, version FROM {META_TABLE}").fetchall()
    except Exception:  # no such table: not a demo warehouse (yet)
        return None
    if len(found) != 1 or found[0][1] != GENERATOR_VERSION:
        return None
    return int(found[0][0])


def _refuse_foreign_tables(con: Any, path: str) -> None:
    """Never replace tables the demo did not make."""
    names = {n for (n,) in con.sql(
        "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'").fetchall()}
    foreign = sorted(names & {"TRAINING_DATA", "EVAL_DATA"})
    if foreign:
        raise ConfigError(
            f"{path} already holds {' and '.join(foreign)}, not made by `neve demo`; pass "
            "another --warehouse (the demo replaces only its own tables)")


def prepare_warehouse(path: str, rows: int, parquet_dir: str | None = None) -> Warehouse:
    """Create (or reuse) TRAINING_DATA and EVAL_DATA with ``rows`` rows in all."""
    import duckdb

    started = time.monotonic()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    try:
        con = duckdb.connect(path)
    except duckdb.Error as exc:
        raise SourceError(f"cannot open the warehouse {path}: {exc}") from exc
    try:
        existing = _existing_rows(con)
        generated = existing != rows
        if existing is None:
            _refuse_foreign_tables(con, path)
        if generated:
            con.execute("SET preserve_insertion_order = true")
            con.execute(GENERATE_SQL.replace("$rows", str(int(rows))))
            con.execute("BEGIN")
            con.execute("CREATE OR REPLACE TABLE TRAINING_DATA AS "
                        "SELECT * EXCLUDE (is_eval) FROM demo_rows WHERE NOT is_eval")
            con.execute("CREATE OR REPLACE TABLE EVAL_DATA AS "
                        "SELECT * EXCLUDE (is_eval) FROM demo_rows WHERE is_eval")
            con.execute(f"CREATE OR REPLACE TABLE {META_TABLE} AS "
                        f"SELECT {int(rows)} AS rows, {GENERATOR_VERSION} AS version")
            con.execute("COMMIT")
            con.execute("DROP TABLE demo_rows")
        counts = {t: con.sql(f"SELECT count(*) FROM {t}").fetchall()[0][0]
                  for t in ("TRAINING_DATA", "EVAL_DATA")}
        if parquet_dir is not None:
            export_parquet(con, parquet_dir, rows, force=generated)
        con.execute("CHECKPOINT")
    finally:
        con.close()
    return Warehouse(path, counts["TRAINING_DATA"], counts["EVAL_DATA"], generated,
                     time.monotonic() - started)


def export_parquet(con: Any, folder: str, rows: int, *, force: bool) -> None:
    """The two tables as Parquet files (row groups of 128k rows) for the Parquet example."""
    marker = os.path.join(folder, f".rows-{rows}-v{GENERATOR_VERSION}")
    if not force and os.path.exists(marker):
        return
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if name.startswith(".rows-"):
            os.remove(os.path.join(folder, name))
    for table in ("TRAINING_DATA", "EVAL_DATA"):
        target = os.path.join(folder, f"{table.lower()}.parquet").replace("'", "''")
        con.execute(f"COPY {table} TO '{target}' (FORMAT parquet, ROW_GROUP_SIZE 131072)")
    open(marker, "w").close()


# -- training ---------------------------------------------------------------------------------


@dataclass
class ModelRun:
    """One trained model: its scores on EVAL_DATA, its time, where it went."""

    name: str
    auc: float
    logloss: float
    fit_s: float
    location: str
    detail: str


def _gbdt(framework: str, train: Any, evaluation: Any, workers: int, stage: Any, rounds: int,
          say: Callable[[str], None]) -> ModelRun:
    from neve._internal import stages
    from neve._internal.training import gbdt_estimator, last_metrics, publish_booster

    if framework == "xgboost":
        objective = "binary:logistic"
        params = {"eval_metric": ["auc", "logloss"], "max_depth": 6, "eta": 0.1,
                  "tree_method": "hist", "max_cat_to_onehot": 8}
    else:
        objective = "binary"
        params = {"metric": ["auc", "binary_logloss"], "num_leaves": 63,
                  "learning_rate": 0.1, "min_data_in_leaf": 100}
    estimator = gbdt_estimator(framework, n_estimators=rounds, objective=objective,
                               params=params, scaling={"num_workers": workers})
    say(f"{framework:<9} training {rounds} rounds on {workers} worker"
        f"{'s' if workers != 1 else ''} ...")
    started = time.monotonic()
    booster = estimator.fit(train, FEATURES, LABEL, eval_set=evaluation)
    fit_s = time.monotonic() - started
    probabilities = estimator.predict(evaluation)
    label = _labels(evaluation)
    spec = estimator._spec
    metrics = last_metrics(estimator.get_eval_results())
    meta = {"objective": objective, "inputs": FEATURES, "label": LABEL,
            "categories": {k: list(v) for k, v in (spec.categories if spec else {}).items()},
            "metrics": metrics, "params": params, "rounds": rounds}
    location, _ = publish_booster(framework, booster, stage,
                                  f"credit-risk-{framework}-{stages.new_request_id()}", meta)
    auc = mlp.roc_auc(label, probabilities)
    say(f"{framework:<9} done in {fit_s:.1f} s: eval AUC {auc:.4f}")
    return ModelRun(framework, auc, mlp.log_loss(label, probabilities), fit_s, location,
                    f"{rounds} rounds")


def _labels(connector: Any) -> np.ndarray:
    return np.concatenate([
        b.column(LABEL).to_numpy(zero_copy_only=False)
        for b in connector.iter_batches(262_144, columns=[LABEL])
    ]).astype(np.float64)


def _torch_query(table: str) -> str:
    """The table with ``region`` one-hot encoded: the MLP takes numbers only."""
    onehot = ", ".join(f"(region = '{r}')::FLOAT AS region_{r}" for r in REGIONS)
    numeric = ", ".join(f for f in FEATURES if f != "region")
    return f"SELECT {numeric}, {onehot}, {LABEL} FROM {table}"


def torch_inputs() -> list[str]:
    return [f for f in FEATURES if f != "region"] + [f"region_{r}" for r in REGIONS]


def _pytorch(session: Any, workers: int, stage: Any, epochs: int,
             say: Callable[[str], None]) -> ModelRun:
    from neve.data import DataConnector, ShardedDataConnector
    from neve.pytorch import PyTorchDistributor, PyTorchScalingConfig, WorkerResourceConfig

    # Equal shards: DDP needs the same number of steps on every rank.
    train = ShardedDataConnector.from_sql(_torch_query("TRAINING_DATA"), session=session,
                                          equal=True)
    evaluation = DataConnector.from_sql(_torch_query("EVAL_DATA"), session=session)
    scaling = PyTorchScalingConfig(
        num_nodes=1, num_workers_per_node=workers,
        resource_requirements_per_worker=WorkerResourceConfig(num_cpus=1))
    hyper = {"inputs": torch_inputs(), "label": LABEL, "objective": "binary",
             "epochs": epochs, "batch_size": 1024, "lr": 3e-3, "hidden": [64, 32], "seed": 0}
    say(f"{'pytorch':<9} training an MLP {hyper['hidden']}, {epochs} epoch"
        f"{'s' if epochs != 1 else ''}, DDP over gloo on {workers} worker"
        f"{'s' if workers != 1 else ''} ...")
    started = time.monotonic()
    with warnings.catch_warnings():
        # equal=True is the demo's choice (DDP), not the user's: the rows it drops (fewer
        # than the workers) are no news to them.
        warnings.simplefilter("ignore", RowsDroppedWarning)
        result = PyTorchDistributor(mlp.train_func, scaling).run(
            dataset_map={"train": train}, hyper_params=hyper, artifact_stage_location=stage.url)
    fit_s = time.monotonic() - started
    # Score EVAL_DATA in the driver with the published model, as a user would.
    model, meta = mlp.load(result.get_model_dir())
    logits, label = mlp.predict(model, evaluation, meta["inputs"], label=LABEL)
    probabilities = mlp.probability(logits)
    auc = mlp.roc_auc(label, probabilities)
    say(f"{'pytorch':<9} done in {fit_s:.1f} s: eval AUC {auc:.4f}")
    return ModelRun("pytorch", auc, mlp.log_loss(label, probabilities), fit_s,
                    result.get_model_dir(), f"{epochs} epochs")


def run(*, rows: int, warehouse: str, stage: str, workers: int | None,
        rounds: int = 100, epochs: int = 2, say: Callable[[str], None] = print) -> list[ModelRun]:
    """The whole demo; prints each phase and the final table through ``say``."""
    import duckdb

    from neve._internal import stages
    from neve._internal.training import connect
    from neve.data import DataConnector

    if rows < 100:
        raise ConfigError(f"--rows must be at least 100, got {rows}")
    total_start = time.monotonic()
    target = stages.resolve(stage)
    stages.check_writable(target)
    parquet_dir = os.path.splitext(os.path.abspath(warehouse))[0] + "_parquet"
    say(f"warehouse {warehouse}: {'checking' if os.path.exists(warehouse) else 'creating'} "
        f"{rows:,} rows ...")
    wh = prepare_warehouse(warehouse, rows, parquet_dir)
    say(f"warehouse {'generated' if wh.generated else 'reused'} TRAINING_DATA "
        f"({wh.train_rows:,} rows) and EVAL_DATA ({wh.eval_rows:,} rows) in {wh.seconds:.1f} s; "
        f"Parquet copies in {parquet_dir}")

    started = time.monotonic()
    view = connect(say)
    ray_s = time.monotonic() - started
    if workers is None:
        workers = max(1, min(2, int(view.total_cpus)))

    runs: list[ModelRun] = []
    session = duckdb.connect(warehouse, read_only=True)
    try:
        # The seed's way: a session, its tables, connectors over them (read into Ray's
        # object store once, for both GBDT frameworks).
        train = DataConnector.from_dataframe(session.table("TRAINING_DATA"))
        evaluation = DataConnector.from_dataframe(session.table("EVAL_DATA"))
        for framework in ("xgboost", "lightgbm"):
            runs.append(_gbdt(framework, train, evaluation, workers, target, rounds, say))
        runs.append(_pytorch(session, workers, target, epochs, say))
    finally:
        session.close()
    say("")
    for line in table(runs):
        say(line)
    say(f"\ntotal {time.monotonic() - total_start:.1f} s (warehouse {wh.seconds:.1f} s, "
        f"ray {ray_s:.1f} s, "
        + ", ".join(f"{r.name} {r.fit_s:.1f} s" for r in runs) + ")")
    return runs


def table(runs: list[ModelRun]) -> list[str]:
    """The final table: one row per model, scored on EVAL_DATA."""
    header = ("model", "eval AUC", "eval logloss", "train s", "trained", "published to")
    rows = [(r.name, f"{r.auc:.4f}", f"{r.logloss:.4f}", f"{r.fit_s:.1f}", r.detail, r.location)
            for r in runs]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    right = {1, 2, 3}

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in
            enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(header), line(tuple("-" * w for w in widths)), *(line(r) for r in rows)]
