"""The ``neve`` command: ``neve demo``, ``neve train <job.toml>``, ``neve cluster``.

Errors of neve's exception tree print as one line, ``neve: error: ...``, with exit
status 1 (2 for usage and job-file errors); ``NEVE_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import neve

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
_HINT = " (NEVE_DEBUG=1 shows the traceback)"

_DESCRIPTION = """\
Distributed XGBoost, LightGBM and PyTorch training on Ray, on the data where it lives
(Snowflake ML's distributed-training API, open and self-hosted).

Without RAY_ADDRESS (or NEVE_RAY_ADDRESS) neve starts a private local Ray instance
for the command and stops it when the command ends.
"""

_TRAIN_EPILOG = """\
a job file (TOML; relative paths are relative to the job file):

  [source]                       # exactly one of duckdb / parquet / adbc
  duckdb = "../warehouse.duckdb"
  table = "TRAINING_DATA"        # or sql = "SELECT ..."
  [eval]                         # optional, the same keys as [source]
  duckdb = "../warehouse.duckdb"
  table = "EVAL_DATA"
  [columns]
  input = ["age", "income", "credit_score"]
  label = "default_risk"         # weight, group: optional
  [model]
  framework = "xgboost"          # "xgboost", "lightgbm" or "pytorch"
  objective = "binary:logistic"
  n_estimators = 100
  params = { max_depth = 6, eval_metric = ["auc", "logloss"] }
  [scaling]                      # optional: what the cluster has
  num_workers = 2
  num_cpu_per_worker = 1
  [output]
  stage = "../stage"             # a path, URL or DB.SCHEMA.STAGE

pytorch jobs take epochs, batch_size, lr, hidden and objective ("regression" or
"binary") under [model], and num_nodes, num_workers_per_node, num_cpus, num_gpus
under [scaling]. See examples/ for one job per framework.
"""


class _Parser(argparse.ArgumentParser):
    """argparse that says ``neve: error:`` like the rest of the command."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="neve", description=_DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"neve {neve.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show neve's informational log messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    demo = commands.add_parser(
        "demo", help="generate a credit-risk warehouse and train all three frameworks on it",
        description="Create (or reuse) a DuckDB warehouse with a generated credit-risk table "
        "(TRAINING_DATA and EVAL_DATA, ~10% held out, plus Parquet copies), then train "
        "XGBoost, LightGBM and a PyTorch MLP on a local Ray and print their AUC on EVAL_DATA, "
        "their training times, and where each model was published.")
    demo.add_argument("--rows", type=_positive_int, default=1_000_000, metavar="N",
                      help="rows in all, training + eval (default: 1,000,000)")
    demo.add_argument("--warehouse", default="warehouse.duckdb", metavar="PATH",
                      help="the DuckDB file to create or reuse (default: ./warehouse.duckdb)")
    demo.add_argument("--stage", default="stage", metavar="PATH",
                      help="where models are published, under <stage>/model/<name>/ "
                      "(a path, URL or DB.SCHEMA.STAGE; default: ./stage)")
    demo.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                      help="training workers, one CPU each (default: 2, or 1 on a 1-CPU machine)")
    demo.add_argument("--rounds", type=_positive_int, default=100, metavar="N",
                      help="boosting rounds for XGBoost and LightGBM (default: 100)")
    demo.add_argument("--epochs", type=_positive_int, default=2, metavar="N",
                      help="epochs for the PyTorch MLP (default: 2)")

    train = commands.add_parser(
        "train", help="train the model a TOML job file describes",
        description="Train the model a TOML job file describes and publish it to its stage.",
        epilog=_TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("job", metavar="JOB.toml", help="the job file")
    train.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE",
                       help="override a job-file value, e.g. --set model.n_estimators=50 or "
                       "--set source.duckdb=/data/w.duckdb (repeatable)")
    train.add_argument("--check", action="store_true",
                       help="check the job file and its data, train nothing")
    train.add_argument("--address", metavar="ADDR",
                       help="join this Ray cluster (default: $NEVE_RAY_ADDRESS, $RAY_ADDRESS, "
                       "else a private local instance)")

    show = commands.add_parser(
        "cluster", help="show the Ray cluster neve would use",
        description="Show the Ray cluster neve would use: its address, nodes, CPUs and GPUs. "
        "With no address configured this starts (and stops) a private local instance, as "
        "every other command would.")
    show.add_argument("--address", metavar="ADDR",
                      help="join this Ray cluster (default: $NEVE_RAY_ADDRESS, $RAY_ADDRESS, "
                      "else a private local instance)")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _join(address: str | None) -> None:
    """Connect to Ray now: ``address``, else the configured one, else a private local one."""
    from neve._internal.runtime import cluster

    cluster.ensure_ray(address)


def _say(line: str = "") -> None:
    print(line, flush=True)


# -- commands -------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from neve._internal import demo

    _say(f"neve demo: credit-risk default prediction on {args.rows:,} rows")
    demo.run(rows=args.rows, warehouse=args.warehouse, stage=args.stage, workers=args.workers,
             rounds=args.rounds, epochs=args.epochs, say=_say)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from neve._internal import jobs

    job = jobs.load(args.job, args.overrides)
    _say(f"neve train: {args.job} ({job.framework})")
    if args.check:
        train = jobs.connector(job, job.source)
        jobs.check_columns(job, train, job.source)
        if job.eval is not None:
            jobs.check_columns(job, jobs.connector(job, job.eval), job.eval)
        _say(f"ok        {job.source.describe()}: columns and settings check out")
        return 0
    from neve._internal import training

    result = training.run(job, say=_say, address=args.address)
    _say(f"model     {result.location}/ ({', '.join(result.files)})")
    return 0


def _cmd_cluster(args: argparse.Namespace) -> int:
    from neve._internal import settings
    from neve._internal.runtime import cluster

    configured = args.address or settings.ray_address()
    was_running = _ray_running()
    started = time.monotonic()
    _join(args.address)  # before Ray's first import: neve sets Ray's environment first
    view = cluster.view()
    import ray

    seconds = time.monotonic() - started
    if was_running:
        how = "this process's Ray (already connected)"
    elif cluster.started_here():
        cpus = settings.local_num_cpus()
        limit = f"NEVE_LOCAL_NUM_CPUS={cpus}" if cpus else "all of this machine's CPUs"
        how = (f"a private local instance ({limit}), started for this command in "
               f"{seconds:.1f} s and stopped when it ends; every neve command starts its "
               "own unless RAY_ADDRESS or NEVE_RAY_ADDRESS names a cluster")
    else:
        how = f"the cluster at {configured} (joined in {seconds:.1f} s)"
    free = ray.available_resources()
    _say(f"ray       {how}")
    _say(f"address   {view.address}")
    _say(f"version   Ray {ray.__version__}")
    _say(f"nodes     {len(view.nodes)}")
    width = max([len(n.address) for n in view.nodes] + [4])
    _say(f"  {'node'.ljust(width)}  {'CPUs':>5}  {'GPUs':>5}  role")
    for node in view.nodes:
        _say(f"  {node.address.ljust(width)}  {node.cpus:>5g}  {node.gpus:>5g}  "
             f"{'head' if node.is_head else 'worker'}")
    _say(f"total     {view.total_cpus:g} CPUs, {view.total_gpus:g} GPUs "
         f"({free.get('CPU', 0):g} CPUs, {free.get('GPU', 0):g} GPUs free now)")
    return 0


_COMMANDS = {"demo": _cmd_demo, "train": _cmd_train, "cluster": _cmd_cluster}


# -- entry point ------------------------------------------------------------------------------


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """neve's warnings on stderr as ``neve: warning: ...``, one line each, like its errors."""
    from neve.exceptions import NeveWarning

    shown = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if isinstance(category, type) and issubclass(category, NeveWarning):
            print(f"neve: warning: {' '.join(str(message).split())}", file=sys.stderr)
        else:
            shown(message, category, *args, **kwargs)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


@contextlib.contextmanager
def _logging(verbose: bool) -> Iterator[None]:
    """neve's log messages on stderr as ``neve: ...`` while the command runs (then as before)."""
    logger = logging.getLogger("neve")
    saved = (logger.level, logger.propagate)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("neve: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _stop_ray() -> None:
    """Give back what this command started: warm workers, then the private Ray."""
    from neve._internal.runtime import group

    group.shutdown_idle()
    import ray

    ray.shutdown()


def _one_line(error: BaseException) -> str:
    """An error's message on one line, without remote or native stack traces
    (``NEVE_DEBUG=1`` shows them)."""
    text = str(error).strip() or type(error).__name__
    hidden = False
    for marker in ("\n\nRemote traceback:", "Stack trace:"):
        head, sep, _ = text.partition(marker)
        if sep:
            text, hidden = head, True
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return text + (_HINT if hidden else "")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``neve`` command; return its exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    debug = os.environ.get("NEVE_DEBUG", "") not in ("", "0")
    ray_before = _ray_running()
    from neve._internal.jobs import JobError
    from neve.exceptions import NeveError

    try:
        with _logging(args.verbose), _warnings_as_lines():
            return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("neve: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except JobError as exc:
        if debug:
            raise
        print(f"neve: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except (NeveError, ImportError) as exc:
        if debug:
            raise
        print(f"neve: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:
        if debug:
            raise
        message = _one_line(exc)
        if not message.endswith(_HINT):
            message += _HINT
        print(f"neve: error: unexpected {type(exc).__name__}: {message}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        sys.stdout.flush()
        if not ray_before and _ray_running():
            _stop_ray()


if __name__ == "__main__":
    sys.exit(main())
