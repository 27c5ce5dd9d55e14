"""The ``neve`` command: train from job files, precise job-file errors, the demo, cluster."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from neve import __version__
from neve._internal import demo, jobs, mlp
from neve.cli import main
from neve.exceptions import ConfigError

FEATURES = demo.FEATURES
ROWS = 4_000


@pytest.fixture(scope="module", autouse=True)
def _give_back_warm_workers() -> Iterator[None]:
    """In-process runs keep their workers warm between tests; later modules get them back."""
    yield
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        from neve._internal.runtime import group

        group.shutdown_idle()


@pytest.fixture(scope="module")
def credit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's generated credit-risk tables (a few thousand rows) in a DuckDB file,
    with Parquet copies next to it."""
    folder = tmp_path_factory.mktemp("credit")
    demo.prepare_warehouse(str(folder / "warehouse.duckdb"), ROWS, str(folder / "parquet"))
    return folder


def write_job(folder: Path, text: str, name: str = "job.toml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def published(out: str) -> Path:
    match = re.search(r"^model\s+(\S+)/ \(", out, re.M)
    assert match, out
    return Path(match.group(1))


GBDT_COLUMNS = f"""
[columns]
input = {json.dumps(FEATURES)}
label = "default_risk"
"""
TWO_WORKERS = """
[scaling]
num_workers = 2
num_cpu_per_worker = 1
"""


# -- training, in process on the session's Ray ---------------------------------------------


@pytest.mark.usefixtures("ray_session")
def test_train_xgboost_from_a_duckdb_table(credit: Path, tmp_path: Path, capsys) -> None:
    import xgboost as xgb

    job = write_job(tmp_path, f"""
        [source]
        duckdb = "{credit}/warehouse.duckdb"
        table = "TRAINING_DATA"
        [eval]
        duckdb = "{credit}/warehouse.duckdb"
        table = "EVAL_DATA"
        {GBDT_COLUMNS}
        [model]
        framework = "xgboost"
        objective = "binary:logistic"
        n_estimators = 20
        params = {{ max_depth = 4, eval_metric = ["logloss", "auc"] }}
        {TWO_WORKERS}
        [output]
        stage = "stage"
    """)
    code, out, err = run_cli(capsys, "train", str(job))
    assert code == 0, err
    assert "xgboost (binary:logistic, 20 rounds) on 2 workers" in out
    assert re.search(r"eval-auc 0\.[6-9]\d+", out), out
    model_dir = published(out)
    assert model_dir.parent == tmp_path / "stage" / "model"  # relative to the job file
    assert sorted(p.name for p in model_dir.iterdir()) == ["_NEVE_COMPLETE", "meta.json",
                                                           "model.json"]
    meta = json.loads((model_dir / "meta.json").read_text())
    assert meta["framework"] == "xgboost" and meta["inputs"] == FEATURES
    assert meta["categories"]["region"] == sorted(demo.REGIONS)  # the string column
    booster = xgb.Booster(model_file=str(model_dir / "model.json"))
    assert booster.num_boosted_rounds() == 20
    assert err == ""


@pytest.mark.usefixtures("ray_session")
def test_train_lightgbm_from_duckdb_sql_with_overrides(credit: Path, tmp_path: Path,
                                                       capsys) -> None:
    import lightgbm as lgb

    job = write_job(tmp_path, f"""
        [source]
        duckdb = "nowhere.duckdb"   # replaced with --set
        sql = "SELECT * FROM TRAINING_DATA WHERE customer_id % 2 = 0"
        {GBDT_COLUMNS}
        [model]
        framework = "lightgbm"
        objective = "binary"
        n_estimators = 100

        [model.params]
        num_leaves = 15
        metric = "auc"
        {TWO_WORKERS}
        [output]
        stage = "{tmp_path}/stage"
    """)
    code, out, err = run_cli(capsys, "train", str(job),
                             "--set", f"source.duckdb={credit}/warehouse.duckdb",
                             "--set", "model.n_estimators=15")
    assert code == 0, err
    assert "lightgbm (binary, 15 rounds)" in out
    model_dir = published(out)
    assert model_dir.name.startswith("lightgbm-")
    booster = lgb.Booster(model_file=str(model_dir / "model.txt"))
    assert booster.num_trees() == 15


@pytest.mark.usefixtures("ray_session")
def test_warnings_print_as_one_line_each(credit: Path, tmp_path: Path, capsys) -> None:
    job = write_job(tmp_path, f"""
        [source]
        duckdb = "{credit}/warehouse.duckdb"
        table = "TRAINING_DATA"
        {GBDT_COLUMNS}
        [model]
        framework = "lightgbm"
        objective = "binary"
        n_estimators = 3
        params = {{ num_leavs = 7 }}
        {TWO_WORKERS}
        [output]
        stage = "{tmp_path}/stage"
    """)
    code, _, err = run_cli(capsys, "train", str(job))
    assert code == 0, err
    assert err.splitlines() == [
        "neve: warning: LightGBM does not know the parameter 'num_leavs' (did you mean "
        "'num_leaves'?) and ignores it: fix the name in params (see "
        "https://lightgbm.readthedocs.io/en/stable/Parameters.html)"]


@pytest.mark.usefixtures("ray_session")
def test_train_from_parquet_glob(credit: Path, tmp_path: Path, capsys) -> None:
    job = write_job(tmp_path, f"""
        [source]
        parquet = "{credit}/parquet/train*.parquet"
        [eval]
        parquet = ["{credit}/parquet/eval_data.parquet"]
        {GBDT_COLUMNS}
        [model]
        framework = "xgboost"
        objective = "binary:logistic"
        n_estimators = 10
        params = {{ eval_metric = "auc" }}
        {TWO_WORKERS}
        [output]
        stage = "stage"
    """)
    code, out, err = run_cli(capsys, "train", str(job))
    assert code == 0, err
    assert "1 Parquet path" in out and "eval-auc" in out
    assert (published(out) / "model.json").exists()


@pytest.mark.usefixtures("ray_session")
def test_train_from_adbc_sqlite(credit: Path, tmp_path: Path, capsys) -> None:
    adbc_sqlite = pytest.importorskip("adbc_driver_sqlite.dbapi")
    import duckdb

    table = duckdb.connect(str(credit / "warehouse.duckdb"), read_only=True).sql(
        "SELECT age, income, credit_score, default_risk FROM TRAINING_DATA").to_arrow_table()
    with adbc_sqlite.connect(str(tmp_path / "credit.sqlite")) as con:
        with con.cursor() as cursor:
            cursor.adbc_ingest("loans", table)
        con.commit()
    job = write_job(tmp_path, """
        [source]
        adbc = "sqlite://credit.sqlite"    # relative to the job file
        table = "loans"
        [columns]
        input = ["age", "income", "credit_score"]
        label = "default_risk"
        [model]
        framework = "lightgbm"
        objective = "binary"
        n_estimators = 5
        [scaling]
        num_workers = 2
        num_cpu_per_worker = 1
        [output]
        stage = "stage"
    """)
    code, out, err = run_cli(capsys, "train", str(job))
    assert code == 0, err
    assert "sqlite table loans" in out
    assert (published(out) / "model.txt").exists()


@pytest.mark.usefixtures("ray_session")
def test_train_pytorch_mlp(credit: Path, tmp_path: Path, capsys) -> None:
    numeric = [f for f in FEATURES if f != "region"]
    query = f"SELECT {', '.join(numeric)}, default_risk FROM"
    job = write_job(tmp_path, f"""
        [source]
        duckdb = "{credit}/warehouse.duckdb"
        sql = "{query} TRAINING_DATA"
        [eval]
        duckdb = "{credit}/warehouse.duckdb"
        sql = "{query} EVAL_DATA"
        [columns]
        input = {json.dumps(numeric)}
        label = "default_risk"
        [model]
        framework = "pytorch"
        objective = "binary"
        epochs = 2
        batch_size = 256
        lr = 0.01
        hidden = [16]
        [scaling]
        num_nodes = 1
        num_workers_per_node = 2
        num_cpus = 1
        [output]
        stage = "stage"
    """)
    code, out, err = run_cli(capsys, "train", str(job))
    assert code == 0, err
    assert "pytorch MLP [16] (binary, 2 epochs, batch 256" in out
    assert re.search(r"epoch 2: train_loss \d\.\d+  eval_loss \d\.\d+  eval_auc 0\.\d+", out), out
    model_dir = published(out)
    assert sorted(p.name for p in model_dir.iterdir()) == ["_NEVE_COMPLETE", "model.json",
                                                           "model.pt"]
    model, meta = mlp.load(str(model_dir))
    assert meta["inputs"] == numeric and meta["objective"] == "binary"
    # Standardisation lives in the model: its means are the data's.
    assert 30 < float(model.mean[numeric.index("age")]) < 55


@pytest.mark.usefixtures("ray_session")
def test_more_workers_than_the_cluster_holds_blames_the_scaling_key(credit: Path,
                                                                   tmp_path: Path,
                                                                   capsys) -> None:
    job = write_job(tmp_path, GOOD.format(wh=credit / "warehouse.duckdb")
                    + "\n[scaling]\nnum_workers = 64\nnum_cpu_per_worker = 1\n")
    code, _, err = run_cli(capsys, "train", str(job))
    assert code == 2
    assert re.search(r"job\.toml:14: scaling\.num_workers: cannot place 64 workers .*64 CPUs "
                     r"needed, the cluster has 4", err), err


@pytest.mark.usefixtures("ray_session")
def test_cluster_in_process(capsys) -> None:
    code, out, err = run_cli(capsys, "cluster")
    assert code == 0, err
    assert "this process's Ray (already connected)" in out
    assert re.search(r"^total\s+4 CPUs, 0 GPUs", out, re.M), out
    assert re.search(r"^  127\.0\.0\.1\s+4\s+0\s+head$", out, re.M), out


# -- job-file errors: the key, the line, exit status 2 ---------------------------------------

GOOD = """\
[source]
duckdb = "{wh}"
table = "TRAINING_DATA"

[columns]
input = ["age", "income"]
label = "default_risk"

[model]
framework = "xgboost"
n_estimators = 10
"""


def _broken(good: str, case: str) -> str:
    if case == "missing section":
        return good.split("[model]")[0]
    if case == "unknown framework":
        return good.replace('"xgboost"', '"catboost"')
    if case == "duckdb and parquet":
        return good.replace('table = "TRAINING_DATA"', 'table = "TRAINING_DATA"\nparquet = "x"')
    if case == "missing table":
        return good.replace('table = "TRAINING_DATA"\n', "")
    if case == "no such table":
        return good.replace('"TRAINING_DATA"', '"TRAINING"')
    if case == "syntax error":
        return good.replace("n_estimators = 10", "n_estimators = = 10")
    if case == "unknown key":
        return good.replace("n_estimators", "n_estimator")
    if case == "wrong type":
        return good.replace("n_estimators = 10", 'n_estimators = "10"')
    if case == "no such column":
        return good.replace('"income"]', '"incme"]')
    if case == "pytorch key on xgboost":
        return good + "epochs = 3\n"
    raise AssertionError(case)


@pytest.mark.parametrize(("case", "expected"), [
    ("missing section", r"job\.toml: model: missing section \[model\]: framework = "),
    ("unknown framework", r"job\.toml:10: model\.framework: must be one of \"xgboost\", "
                          r"\"lightgbm\", \"pytorch\", got 'catboost'"),
    ("duckdb and parquet", r"job\.toml:4: source\.parquet: give only one of source\.duckdb, "
                           r"source\.parquet, source\.adbc; found source\.duckdb \(line 2\), "
                           r"source\.parquet \(line 4\)"),
    ("missing table", r"job\.toml:1: source: source\.duckdb needs source\.table \(a table "
                      r"name\) or source\.sql"),
    ("no such table", r"job\.toml:3: source\.table: .*TRAINING.* does not exist"),
    ("syntax error", r"job\.toml:11: model\.n_estimators: TOML syntax error: Invalid value "
                     r"\(column 16\)"),
    ("unknown key", r"job\.toml:11: model\.n_estimator: unknown key for framework 'xgboost'; "
                    r"did you mean 'n_estimators'\?"),
    ("wrong type", r"job\.toml:11: model\.n_estimators: must be an integer >= 1, got '10' "
                   r"\(a string\)"),
    ("no such column", r"job\.toml:6: columns\.input: column 'incme' is not in the source "
                       r"data .*; did you mean 'income'\?"),
    ("pytorch key on xgboost", r"job\.toml:12: model\.epochs: unknown key for framework "
                               r"'xgboost'; .*\[model\] takes framework, objective"),
])
def test_broken_job_files_name_the_key_and_line(credit: Path, tmp_path: Path, capsys,
                                                case: str, expected: str) -> None:
    good = GOOD.format(wh=credit / "warehouse.duckdb")
    job = write_job(tmp_path, _broken(good, case))
    code, out, err = run_cli(capsys, "train", str(job), "--check")
    assert code == 2, (out, err)
    assert err.startswith("neve: error: ") and err.count("\n") == 1, err
    assert re.search(expected, err), err
    assert "Traceback" not in err


def test_a_good_job_passes_check(credit: Path, tmp_path: Path, capsys) -> None:
    job = write_job(tmp_path, GOOD.format(wh=credit / "warehouse.duckdb"))
    code, out, err = run_cli(capsys, "train", str(job), "--check")
    assert (code, err) == (0, "")
    assert "columns and settings check out" in out


def test_set_overrides_are_reported_as_such(credit: Path, tmp_path: Path, capsys) -> None:
    job = write_job(tmp_path, GOOD.format(wh=credit / "warehouse.duckdb"))
    code, _, err = run_cli(capsys, "train", str(job), "--check", "--set", "model.n_estimators=0")
    assert code == 2
    assert "job.toml (--set): model.n_estimators: must be an integer >= 1, got 0" in err


def test_missing_job_file_and_usage_errors(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(capsys, "train", str(tmp_path / "nope.toml"))
    assert code == 2 and "nope.toml: cannot read the job file: No such file" in err
    code, _, err = run_cli(capsys, "train")
    assert code == 2 and "the following arguments are required: JOB.toml" in err
    code, _, err = run_cli(capsys)
    assert code == 2 and "neve: error:" in err
    code, _, err = run_cli(capsys, "demo", "--rows", "0")
    assert code == 2 and "expected a number >= 1" in err
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"neve {__version__}"
    for command in ([], ["demo"], ["train"], ["cluster"]):
        code, out, _ = run_cli(capsys, *command, "--help")
        assert code == 0 and out.startswith("usage: neve")
        assert "%%" not in out  # argparse prints descriptions as written
    code, out, _ = run_cli(capsys, "demo", "--help")
    assert "~10% held out" in " ".join(out.split())


def test_key_lines_follow_tables_dotted_keys_and_multiline_values() -> None:
    text = textwrap.dedent('''
        [source]
        sql = """
        x = 1
        """
        duckdb = "w"   # after a multi-line string
        [model]
        params = { max_depth = 6, eta = 0.1, note = "a = b" }
        hidden = [64,
                  32]
        "quoted key" = 1
        n.estimators = 3
        [model.params2]
        a = [1,
             2]
        b = 2
    ''')
    lines = jobs.key_lines(text)
    assert lines["source"] == 2 and lines["source.sql"] == 3 and lines["source.duckdb"] == 6
    assert "source.x" not in lines
    assert lines["model.params"] == 8 and lines["model.params.max_depth"] == 8
    assert lines["model.params.eta"] == 8 and "model.params.a" not in lines
    assert lines["model.hidden"] == 9 and "model.32" not in lines
    assert lines["model.quoted key"] == 11 and lines["model.n.estimators"] == 12
    assert lines["model.params2.a"] == 14 and lines["model.params2.b"] == 16
    jobs._toml().loads(text)  # the text is valid TOML


# -- the demo's pieces -------------------------------------------------------------------------


def test_roc_auc_matches_scikit_learn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    label = rng.integers(0, 2, 5_000)
    score = np.round(label * 0.3 + rng.normal(size=5_000), 1)  # many ties
    assert mlp.roc_auc(label, score) == pytest.approx(metrics.roc_auc_score(label, score))
    assert mlp.log_loss(label, 1 / (1 + np.exp(-score))) == pytest.approx(
        metrics.log_loss(label, 1 / (1 + np.exp(-score))))


def test_warehouse_is_reused_only_with_the_same_row_count(tmp_path: Path) -> None:
    path = str(tmp_path / "w.duckdb")
    first = demo.prepare_warehouse(path, 3_000)
    assert first.generated and first.train_rows + first.eval_rows == 3_000
    assert 200 < first.eval_rows < 400
    again = demo.prepare_warehouse(path, 3_000)
    assert not again.generated and again.train_rows == first.train_rows
    bigger = demo.prepare_warehouse(path, 5_000)
    assert bigger.generated and bigger.train_rows + bigger.eval_rows == 5_000
    import duckdb

    con = duckdb.connect(path, read_only=True)
    rate = con.sql("SELECT avg(default_risk) FROM TRAINING_DATA").fetchall()[0][0]
    regions = {r for (r,) in con.sql("SELECT DISTINCT region FROM EVAL_DATA").fetchall()}
    con.close()
    assert 0.05 < rate < 0.3 and regions == set(demo.REGIONS)
    other = tmp_path / "theirs.duckdb"
    con = duckdb.connect(str(other))
    con.execute("CREATE TABLE TRAINING_DATA AS SELECT 1 AS x")
    con.close()
    with pytest.raises(ConfigError, match="not made by `neve demo`"):
        demo.prepare_warehouse(str(other), 1_000)


# -- real processes: the console entry, the demo end to end ---------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "NEVE_"))}
    env.update(extra)
    return env


def test_console_script_and_module_entry(credit: Path, tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("neve")
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                          timeout=60, env=_env())
    assert (done.returncode, done.stdout.strip()) == (0, f"neve {__version__}")
    job = write_job(tmp_path, _broken(GOOD.format(wh=credit / "warehouse.duckdb"),
                                      "unknown framework"))
    done = subprocess.run([sys.executable, "-m", "neve.cli", "train", str(job)],
                          capture_output=True, text=True, timeout=60, env=_env())
    assert done.returncode == 2
    assert done.stderr.startswith(f"neve: error: {job}:10: model.framework:")
    assert "Traceback" not in done.stderr and done.stdout == ""
    done = subprocess.run([sys.executable, "-m", "neve.cli", "train", str(job)],
                          capture_output=True, text=True, timeout=60,
                          env=_env(NEVE_DEBUG="1"))
    assert done.returncode == 1 and "Traceback" in done.stderr  # NEVE_DEBUG shows it


@pytest.mark.slow
def test_cluster_in_a_fresh_process_starts_and_stops_a_private_ray() -> None:
    done = subprocess.run([sys.executable, "-m", "neve.cli", "cluster"], capture_output=True,
                          text=True, timeout=120, env=_env(NEVE_LOCAL_NUM_CPUS="1"))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    out = done.stdout
    assert "a private local instance (NEVE_LOCAL_NUM_CPUS=1), started for this command" in out
    assert re.search(r"^address\s+127\.0\.0\.1:\d+$", out, re.M), out
    assert re.search(r"^total\s+1 CPUs, 0 GPUs", out, re.M), out
    # An address nothing answers on fails at once (Ray alone would retry for minutes).
    done = subprocess.run([sys.executable, "-m", "neve.cli", "cluster", "--address",
                           "127.0.0.1:1"], capture_output=True, text=True, timeout=60, env=_env())
    assert done.returncode == 1
    assert done.stderr.startswith("neve: error: cannot reach the Ray cluster at 127.0.0.1:1")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_end_to_end(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "neve.cli", "demo", "--rows", "20000"],
        capture_output=True, text=True, timeout=280, cwd=tmp_path,
        env=_env(NEVE_LOCAL_NUM_CPUS="2"),
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no Ray logs, no progress bars when not a terminal
    out = done.stdout
    assert re.search(r"private local Ray ready in \d+\.\d s: 1 node \(127\.0\.0\.1: 2 CPUs\)", out)
    assert re.search(r"TRAINING_DATA \(1[78],\d{3} rows\) and EVAL_DATA \(\d,\d{3} rows\)", out)
    rows = {m.group(1): m for m in re.finditer(
        r"^(xgboost|lightgbm|pytorch)\s+(0\.\d{4})\s+(0\.\d{4})\s+(\d+\.\d)\s+\S+ \S+\s+(\S+)$",
        out, re.M)}
    assert set(rows) == {"xgboost", "lightgbm", "pytorch"}, out
    for name, files in (("xgboost", {"model.json", "meta.json"}),
                        ("lightgbm", {"model.txt", "meta.json"}),
                        ("pytorch", {"model.pt", "model.json"})):
        auc = float(rows[name].group(2))
        assert auc > (0.6 if name == "pytorch" else 0.7), (name, out)
        location = Path(rows[name].group(5))
        assert location.parent == tmp_path / "stage" / "model"
        assert {p.name for p in location.iterdir()} == {*files, "_NEVE_COMPLETE"}
    assert (tmp_path / "warehouse.duckdb").exists()
    assert (tmp_path / "warehouse_parquet" / "training_data.parquet").exists()
    assert re.search(r"^total \d+\.\d s \(warehouse", out, re.M)
