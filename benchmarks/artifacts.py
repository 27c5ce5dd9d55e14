"""Artifacts: a big model directory from rank 0 to a stage, and the driver's memory.

A ``PyTorchDistributor`` run whose rank 0 writes ``--gb`` GiB into its model
directory; the driver streams it to a local stage in chunks. Measured: the run's
wall time, the publish rate, and how far the driver's private memory (RSS less
shared pages: Ray's object store is shared memory) grows above its level before
the run. The model is removed afterwards.

Run: ``python benchmarks/artifacts.py`` (2 GiB), ``--gb 0.25`` to try.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

try:
    from benchmarks import _common as common
except ImportError:  # run as a script: python benchmarks/artifacts.py
    import _common as common  # type: ignore[no-redef]


def private_bytes() -> int:
    import psutil

    info = psutil.Process().memory_info()
    return int(info.rss - info.shared)


def write_model(size: int) -> Any:
    """A train_func whose rank 0 writes ``size`` bytes of random weights."""

    def train_func() -> None:
        import os

        from neve.pytorch import get_context

        ctx = get_context()
        if ctx.get_rank() == 0:
            block = os.urandom(1 << 20)
            with open(os.path.join(ctx.get_model_dir(), "weights.bin"), "wb") as handle:
                for _ in range(size >> 20):
                    handle.write(block)

    return train_func


def parse_args(argv: list[str] | None = None) -> Any:
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=2.0, help="GiB in rank 0's model directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from neve.pytorch import PyTorchDistributor, PyTorchScalingConfig, WorkerResourceConfig

    args = parse_args(argv)
    size = int(args.gb * 2**30) >> 20 << 20
    common.start_ray()
    scaling = PyTorchScalingConfig(num_nodes=1, num_workers_per_node=2,
                                   resource_requirements_per_worker=WorkerResourceConfig(
                                       num_cpus=1))
    stage = tempfile.mkdtemp(prefix="neve-bench-stage-", dir=common.DATA_DIR.parent)
    peak = [private_bytes()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak.append(private_bytes())

    before = private_bytes()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        t0 = time.perf_counter()
        result = PyTorchDistributor(write_model(size), scaling).run(artifact_stage_location=stage)
        seconds = time.perf_counter() - t0
        written = os.path.getsize(os.path.join(result.get_model_dir(), "weights.bin"))
    finally:
        stop.set()
        sampler.join()
        shutil.rmtree(stage, ignore_errors=True)
    growth = max(peak) - before
    common.log(f"{written / 2**30:.2f} GiB published in {seconds:.1f} s; the driver's private "
               f"memory grew by {growth / 2**20:.0f} MiB at most")
    report = common.Report("artifacts", "A big model directory from rank 0 to a stage",
                           {"gib": args.gb, "workers": "2 x 1 CPU"})
    report.table(
        "Publishing rank 0's model directory through the driver",
        ["model GiB", "run s", "MiB/s", "driver memory growth MiB"],
        [[f"{written / 2**30:.2f}", common.fmt_s(seconds), f"{written / 2**20 / seconds:.0f}",
          f"{growth / 2**20:.0f}"]],
        notes=["run s includes rank 0 writing the file; the driver streams it to a local stage "
               "in 8 MiB chunks", "driver memory = private bytes (RSS less shared pages), "
               "sampled every 20 ms, above its level before the run"],
    )
    report.target("driver memory growth for the model directory", "< 300 MiB",
                  growth / 2**20, growth < 300 << 20, unit="MiB")
    report.results = {"bytes": written, "seconds": seconds, "driver_growth": growth}
    report.print()
    report.write_json(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
