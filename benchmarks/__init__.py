"""neve's benchmarks: ingest, GBDT and PyTorch against their limits and Ray's own trainers.

Run one with ``python benchmarks/<name>.py --help``; run all of them and write
``BENCHMARKS.md`` with ``python benchmarks/run_all.py``.
"""
