"""Run the benchmarks and write BENCHMARKS.md from their results.

Each benchmark runs as its own process (its own private local Ray, 2 CPUs unless
``NEVE_LOCAL_NUM_CPUS`` says otherwise) and hands its figures back as JSON, which
is kept in ``benchmarks/results/<name>.json`` with the machine, the versions and
the commit it ran from. ``BENCHMARKS.md`` is rendered from every result kept there,
each section naming its own commit and command. Never edit it by hand: run this.

Figures must come from a commit that exists: this refuses a tree with uncommitted
changes (``--allow-dirty`` runs anyway and says so, with the diff's hash, in every
section). Full sizes take a while on a 2-core machine (tens of minutes; ``scale``
more: it is left out unless named in ``--only``); ``--quick`` runs small sizes to
check that everything works (its figures mean little, and are not kept).
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

try:
    from benchmarks import _common as common
except ImportError:  # run as a script: python benchmarks/run_all.py
    import _common as common  # type: ignore[no-redef]

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ORDER = ("ingest", "gbdt", "torch", "artifacts", "scale", "scale-floor", "scale-35gb",
         "scale-50gb")
DEFAULT = ("ingest", "gbdt", "torch", "artifacts")
SCRIPTS = {"ingest": "ingest.py", "gbdt": "gbdt.py", "torch": "torch_bench.py",
           "artifacts": "artifacts.py", "scale": "scale.py", "scale-floor": "scale.py",
           "scale-35gb": "scale.py", "scale-50gb": "scale.py"}
#: xgboost alone against neve, 20M rows from Parquet: how far the memory is xgboost's own
SCALE_FLOOR = ["--runs", "parquet-xgboost,parquet-xgboost-external", "--floor",
               "--name", "scale-floor"]
#: the 50 GB run: 430M rows x 29 float32 on a 24 GiB machine, XGBoost with external memory,
#: neve's default layout on one node (one worker with both CPUs: one worker's fixed memory,
#: where what xgboost keeps per row left ~2 GiB below Ray's memory monitor's threshold)
FIFTY_GB = ["--rows", "430000000", "--runs", "parquet-xgboost-external", "--rounds", "5",
            "--layout", "1x2", "--name", "scale-50gb"]
#: larger than memory, and what xgboost keeps per row still fits: 300M rows (35 GB)
SCALE_35GB = ["--rows", "300000000", "--runs", "parquet-xgboost-external", "--rounds", "5",
              "--name", "scale-35gb"]
QUICK = {"ingest_rows": 100_000, "gbdt_rows": 50_000, "gbdt_rounds": 20, "torch_rows": 20_000}


def parse_args(argv: list[str] | None = None) -> Any:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"small sizes, to check the scripts ({QUICK})")
    parser.add_argument("--only", default=",".join(DEFAULT),
                        help=f"comma-separated benchmarks to run, from {', '.join(ORDER)} "
                        "(default: ingest,gbdt,torch,artifacts); the others keep their last "
                        "results")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="run with uncommitted changes (every section then says so)")
    parser.add_argument("--render-only", action="store_true",
                        help="run nothing: write BENCHMARKS.md from the kept results")
    parser.add_argument("--out", default=str(common.REPO / "BENCHMARKS.md"),
                        help="where to write the Markdown report (default: BENCHMARKS.md at the "
                        "repository root)")
    parser.add_argument("--ingest-rows", type=int, default=None,
                        help="rows for ingest.py (default 2,000,000)")
    parser.add_argument("--gbdt-rows", type=int, default=None,
                        help="rows for gbdt.py (default 1,000,000)")
    parser.add_argument("--gbdt-rounds", type=int, default=None,
                        help="boosting rounds for gbdt.py (default 100)")
    parser.add_argument("--torch-rows", type=int, default=None,
                        help="rows for torch_bench.py (default 200,000)")
    parser.add_argument("--no-ray-train", action="store_true",
                        help="leave Ray Train's trainers out of gbdt and torch")
    parser.add_argument("--snowflake-python", metavar="PYTHON", default=None,
                        help="interpreter with snowflake-ml-python + torch, for ingest.py")
    parser.add_argument("--timeout-s", type=float, default=3600.0,
                        help="longest one benchmark may run, in seconds (default: 3600)")
    return parser.parse_args(argv)


def commands(args: Any, json_dir: Path) -> dict[str, list[str]]:
    """The command line of each benchmark, with its own flags."""
    sizes = dict(QUICK) if args.quick else {}
    for key in QUICK:
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)

    def script(name: str, *flags: str) -> list[str]:
        return [sys.executable, str(HERE / SCRIPTS[name]), *flags,
                "--json", str(json_dir / f"{name}.json")]

    ingest = []
    if "ingest_rows" in sizes:
        ingest += ["--rows", str(sizes["ingest_rows"])]
    if args.snowflake_python:
        ingest += ["--snowflake-python", args.snowflake_python]
    gbdt = []
    if "gbdt_rows" in sizes:
        gbdt += ["--rows", str(sizes["gbdt_rows"])]
    if "gbdt_rounds" in sizes:
        gbdt += ["--rounds", str(sizes["gbdt_rounds"])]
    torch = ["--rows", str(sizes["torch_rows"])] if "torch_rows" in sizes else []
    if args.no_ray_train:
        gbdt.append("--no-ray-train")
        torch.append("--no-ray-train")
    return {"ingest": script("ingest", *ingest), "gbdt": script("gbdt", *gbdt),
            "torch": script("torch", *torch),
            "artifacts": script("artifacts", *(["--gb", "0.1"] if args.quick else [])),
            "scale": script("scale"),
            "scale-floor": script("scale-floor", *SCALE_FLOOR),
            "scale-35gb": script("scale-35gb", *SCALE_35GB),
            "scale-50gb": script("scale-50gb", *FIFTY_GB)}


def run(name: str, command: list[str], timeout_s: float) -> dict[str, Any]:
    """Run one benchmark, its output streamed through; keep the last lines for the report."""
    shown = " ".join(["python", common.rel(Path(command[1])), *command[2:]])
    common.log(f"== {name}: {shown}")
    tail: collections.deque[str] = collections.deque(maxlen=20)
    t0 = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1, cwd=common.REPO)
    assert process.stdout is not None
    watchdog = threading.Timer(timeout_s, process.kill)
    watchdog.daemon = True
    watchdog.start()
    try:
        for line in process.stdout:
            print(line, end="", flush=True)
            tail.append(line.rstrip("\n"))
        code = process.wait()
    finally:
        watchdog.cancel()
    timed_out = time.perf_counter() - t0 >= timeout_s
    seconds = time.perf_counter() - t0
    common.log(f"== {name}: exit {code} after {seconds:.0f} s")
    return {"exit_code": code, "seconds": seconds, "timed_out": timed_out, "tail": list(tail)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [] if args.render_only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(names) - set(ORDER)
    if unknown:
        raise SystemExit(f"--only: unknown {sorted(unknown)}; use {', '.join(ORDER)}")
    state = common.git_state()
    if names and state["dirty"] and not args.allow_dirty:
        raise SystemExit(
            "run_all: the working tree has uncommitted changes, so no commit would reproduce "
            "the figures. Commit them first, or pass --allow-dirty (every section then says "
            f"so, with the diff's hash). Commit: {state['commit']}")
    os.environ.setdefault("NEVE_LOCAL_NUM_CPUS", "2")
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="neve-bench-") as folder:
        json_dir = Path(folder)
        all_commands = commands(args, json_dir)
        for name in ORDER:
            if name not in names:
                continue
            runs[name] = run(name, all_commands[name], args.timeout_s)
            path = json_dir / f"{name}.json"
            if path.exists() and not args.quick:
                import json

                report = json.loads(path.read_text())
                report["run"] = {k: runs[name][k] for k in ("exit_code", "seconds", "timed_out")}
                RESULTS.mkdir(exist_ok=True)
                (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=1, default=str))
    if not args.quick:
        Path(args.out).write_text(render(kept_results()))
        common.log(f"wrote {args.out} from {common.rel(RESULTS)}/")
    failed = [n for n, r in runs.items() if r["exit_code"] != 0]
    if failed:
        common.log(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


def kept_results() -> dict[str, dict[str, Any]]:
    import json

    return {name: json.loads((RESULTS / f"{name}.json").read_text())
            for name in ORDER if (RESULTS / f"{name}.json").exists()}


# -- the report --------------------------------------------------------------------------------


def render(results: dict[str, dict[str, Any]]) -> str:
    out = [
        "# Benchmarks",
        "",
        "Written by `benchmarks/run_all.py` from the results kept in `benchmarks/results/`. "
        "Do not edit by hand. Each section names the commit it ran from and the command "
        "that reproduces it; the machine is noisy (2 shared cores), so read ratios as "
        "+-10 %.",
        "",
        "## Reproduce",
        "",
        "<!-- not run: benchmarks take tens of minutes -->",
        "```sh",
        "pip install -e '.[dev]'        # or: pip install -e '.[all,bench]'",
        "python benchmarks/run_all.py                      # ingest, gbdt, torch, artifacts",
        "python benchmarks/run_all.py --only scale         # 20M rows (about 20 minutes)",
        "python benchmarks/run_all.py --only scale-floor   # xgboost's own memory floor, 20M rows",
        "python benchmarks/run_all.py --only scale-35gb    # 35 GB, external memory (40 GB of"
        " free disk)",
        "python benchmarks/run_all.py --only scale-50gb    # 50 GB, external memory (50 minutes;"
        " 50 GB of free disk)",
        "```",
        "",
        "Each benchmark also runs on its own: `python benchmarks/ingest.py --help`, "
        "`gbdt.py`, `torch_bench.py`, `scale.py`. Data is generated under "
        "`benchmarks/_data/` and reused.",
        "",
    ]
    if results:
        info = max(results.values(), key=lambda r: r.get("finished", ""))["machine"]
        out += [
            "## Machine",
            "",
            common.markdown_table(["", ""], [
                ["CPU", f"{info['cpu_model']} ({info['logical_cores']} logical cores, "
                        f"{info['physical_cores']} physical)"],
                ["memory", f"{info['memory_gib']} GiB"],
                ["OS", info["os"]],
                ["Ray", "neve's private local instance, started before each measurement "
                        "(not counted)"],
                ["versions", ", ".join(f"{k} {v}" for k, v in info["versions"].items())],
            ]),
            "",
        ]
    targets = []
    for name, report in results.items():
        for target in report.get("targets", []):
            targets.append([name, *common.target_rows([target])[0]])
    if targets:
        out += ["## Targets", "", common.markdown_table(["benchmark", *common.TARGET_HEADERS],
                                                        targets), ""]
    for name, report in results.items():
        out += section(name, report)
    return "\n".join(out).rstrip() + "\n"


def section(name: str, report: dict[str, Any]) -> list[str]:
    run = report.get("run", {})
    out = [f"## {report['title']}", ""]
    commit = report.get("machine", {}).get("git_commit", "?")
    took = f"; {run['seconds']:.0f} s in all" if "seconds" in run else ""
    out += [f"Commit {commit}, {report.get('finished', '?')}: `{report['command']}`{took}", ""]
    if run.get("exit_code"):
        why = "timed out" if run.get("timed_out") else f"exited with code {run['exit_code']}"
        out += [f"`{SCRIPTS[name]}` {why}: the figures below may be partial.", ""]
    params = ", ".join(f"{k}={v}" for k, v in report["params"].items())
    out += [f"Parameters: {params}", ""]
    for table in report["tables"]:
        out += [f"**{table['title']}**", "", common.markdown_table(table["headers"],
                                                                   table["rows"]), ""]
        out += [f"- {note}" for note in table["notes"]]
        out.append("")
    out += [f"- {note}" for note in report.get("notes", [])]
    return out


if __name__ == "__main__":
    sys.exit(main())
