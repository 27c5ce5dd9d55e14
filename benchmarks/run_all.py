"""Run the ingest, GBDT and PyTorch benchmarks and write BENCHMARKS.md from their results.

Each benchmark runs as its own process (its own private local Ray, 2 CPUs unless
``NEVE_LOCAL_NUM_CPUS`` says otherwise) and hands its figures back as JSON; this
script writes them, the machine and the command to reproduce into
``BENCHMARKS.md`` at the repository root. Never edit that file by hand: run this.

Full sizes take a while on a 2-core machine (tens of minutes); ``--quick`` runs
small sizes to check that everything works (its figures mean little).
"""

from __future__ import annotations

import collections
import datetime
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
ORDER = ("ingest", "gbdt", "torch")
SCRIPTS = {"ingest": "ingest.py", "gbdt": "gbdt.py", "torch": "torch_bench.py"}
QUICK = {"ingest_rows": 100_000, "gbdt_rows": 50_000, "gbdt_rounds": 20, "torch_rows": 20_000}


def parse_args(argv: list[str] | None = None) -> Any:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"small sizes, to check the scripts ({QUICK})")
    parser.add_argument("--only", default=",".join(ORDER),
                        help="comma-separated benchmarks to run (default: ingest,gbdt,torch)")
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
            "torch": script("torch", *torch)}


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
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(names) - set(ORDER)
    if unknown:
        raise SystemExit(f"--only: unknown {sorted(unknown)}; use {', '.join(ORDER)}")
    os.environ.setdefault("NEVE_LOCAL_NUM_CPUS", "2")
    started = datetime.datetime.now(datetime.timezone.utc)
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="neve-bench-") as folder:
        json_dir = Path(folder)
        all_commands = commands(args, json_dir)
        for name in ORDER:
            if name not in names:
                continue
            runs[name] = run(name, all_commands[name], args.timeout_s)
            path = json_dir / f"{name}.json"
            if path.exists():
                import json

                runs[name]["report"] = json.loads(path.read_text())
    text = render(args, argv if argv is not None else sys.argv[1:], started, runs)
    Path(args.out).write_text(text)
    common.log(f"wrote {args.out}")
    failed = [n for n, r in runs.items() if r["exit_code"] != 0 or "report" not in r]
    if failed:
        common.log(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


# -- the report --------------------------------------------------------------------------------


def render(args: Any, argv: list[str], started: datetime.datetime,
           runs: dict[str, dict[str, Any]]) -> str:
    info = common.machine()
    versions = info["versions"]
    reproduce = " ".join(["python benchmarks/run_all.py", *argv]).strip()
    out = [
        "# Benchmarks",
        "",
        f"Written by `benchmarks/run_all.py` on {started:%Y-%m-%d %H:%M} UTC. Do not edit by "
        "hand: run the command below to produce it again.",
        "",
    ]
    if args.quick:
        out += ["> **Quick run** (`--quick`): small sizes that only check the scripts work; "
                "these figures say little about performance.", ""]
    out += [
        "## Reproduce",
        "",
        "```sh",
        "pip install -e '.[dev]'        # or: pip install -e '.[all,bench]'",
        reproduce,
        "```",
        "",
        "Each benchmark also runs on its own: `python benchmarks/ingest.py --help`, "
        "`gbdt.py`, `torch_bench.py`. Data is generated under `benchmarks/_data/` and "
        "reused.",
        "",
        "## Machine",
        "",
        common.markdown_table(["", ""], [
            ["CPU", f"{info['cpu_model']} ({info['logical_cores']} logical cores, "
                    f"{info['physical_cores']} physical)"],
            ["memory", f"{info['memory_gib']} GiB"],
            ["OS", info["os"]],
            ["Ray", "neve's private local instance, "
                    f"NEVE_LOCAL_NUM_CPUS={os.environ.get('NEVE_LOCAL_NUM_CPUS')}, started "
                    "before each measurement (not counted)"],
            ["versions", ", ".join(f"{k} {v}" for k, v in versions.items())],
            ["neve commit", info["git_commit"]],
        ]),
        "",
    ]
    targets = []
    for name, result in runs.items():
        for target in result.get("report", {}).get("targets", []):
            targets.append([name, *common.target_rows([target])[0]])
    if targets:
        out += ["## Targets", "", common.markdown_table(["benchmark", *common.TARGET_HEADERS],
                                                        targets), ""]
    for name, result in runs.items():
        out += section(name, result)
    return "\n".join(out).rstrip() + "\n"


def section(name: str, result: dict[str, Any]) -> list[str]:
    report = result.get("report")
    title = report["title"] if report else name
    out = [f"## {title}", ""]
    if report is None or result["exit_code"] != 0:
        why = "timed out" if result["timed_out"] else f"exited with code {result['exit_code']}"
        out += [f"`{SCRIPTS[name]}` {why} after {result['seconds']:.0f} s. Its last lines:",
                "", "```", *result["tail"], "```", ""]
        if report is None:
            return out
    params = ", ".join(f"{k}={v}" for k, v in report["params"].items())
    out += [f"`{report['command']}` ({params}; {result['seconds']:.0f} s in all)", ""]
    for table in report["tables"]:
        out += [f"**{table['title']}**", "", common.markdown_table(table["headers"],
                                                                   table["rows"]), ""]
        out += [f"- {note}" for note in table["notes"]]
        out.append("")
    out += [f"- {note}" for note in report.get("notes", [])]
    return out


if __name__ == "__main__":
    sys.exit(main())
