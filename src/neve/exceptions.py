"""neve's exceptions: one tree, mapped from the libraries below at the boundary.

::

    NeveError
    ├── ConfigError                  a config or argument is invalid (also a ValueError)
    │   └── UnknownArgumentError     a keyword the function does not take (also a TypeError)
    ├── DataError                    the data cannot be used as asked
    │   ├── ColumnNotFoundError      a named column does not exist
    │   ├── ColumnTypeError          a column has a type the consumer cannot use
    │   ├── NullLabelError           the label column holds NULLs
    │   ├── EmptyDatasetError        the source (or a shard) holds no rows
    │   └── SourceError              the source failed: SQL error, missing file, ...
    ├── ClusterError                 the Ray cluster cannot run what was asked
    │   ├── ResourcesUnavailableError  the cluster lacks the CPUs/GPUs/nodes asked for
    │   └── WorkerStartTimeoutError    workers were placed but never became ready
    ├── WorkerError                  a worker raised or died; carries rank and traceback
    │   └── WorkerLostError          a worker process died (killed, out of memory, crashed)
    ├── StageError                   a stage cannot be resolved, written or published
    └── ContextError                 a per-worker API was called outside a run

Errors from DuckDB, pyarrow, ADBC, fsspec, Ray, xgboost and LightGBM are raised
``from`` the original, so ``__cause__`` keeps the library's own message. Two
exceptions to that rule, both to show the user one error instead of three: a
worker's failure (its message carries the remote traceback of the user's code;
``WorkerError.remote`` holds the remote exception) and a failure to join a Ray
cluster (its message carries Ray's own reason).

Warnings, on the driver, once, for what neve does that a user may not expect::

    NeveWarning (a UserWarning)
    ├── DataWarning                  the data is used in a way that may surprise
    │   ├── NullsAsNaNWarning        NULLs in numeric columns come out of to_torch_dataset as NaN
    │   ├── RowsDroppedWarning       equal=True drops rows so that every shard is the same size
    │   └── HighCardinalityWarning   a string feature with very many distinct values
    ├── ParameterWarning             a framework parameter the framework does not know
    └── MemoryWarning                a fit likely to need more memory than its workers have

Each message says what happened, how many rows or which names, and how to fix
it; silence one kind with ``warnings.filterwarnings("ignore", category=...)``.
"""

from __future__ import annotations

__all__ = [
    "ClusterError",
    "ColumnNotFoundError",
    "ColumnTypeError",
    "ConfigError",
    "ContextError",
    "DataError",
    "DataWarning",
    "EmptyDatasetError",
    "HighCardinalityWarning",
    "NeveError",
    "NeveWarning",
    "NullLabelError",
    "NullsAsNaNWarning",
    "ParameterWarning",
    "ResourcesUnavailableError",
    "RowsDroppedWarning",
    "SourceError",
    "StageError",
    "UnknownArgumentError",
    "WorkerError",
    "WorkerLostError",
    "WorkerStartTimeoutError",
]


class NeveError(Exception):
    """Base of every error neve raises on purpose."""


class ConfigError(NeveError, ValueError):
    """A configuration value or argument is invalid."""


class UnknownArgumentError(ConfigError, TypeError):
    """A function was called with a keyword it does not take (the message lists those it does)."""


class DataError(NeveError):
    """The data cannot be used as asked."""


class ColumnNotFoundError(DataError, KeyError):
    """A named column does not exist in the source."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ColumnTypeError(DataError, TypeError):
    """A column has a type that the consumer cannot use."""


class NullLabelError(DataError):
    """The label column holds NULL values."""


class EmptyDatasetError(DataError):
    """The source, or a worker's shard of it, holds no rows."""


class SourceError(DataError):
    """Reading the source failed (SQL error, missing file, unreachable database)."""


class ClusterError(NeveError):
    """The Ray cluster cannot run what was asked."""


class ResourcesUnavailableError(ClusterError):
    """The cluster lacks the CPUs, GPUs or nodes that the run asked for."""


class WorkerStartTimeoutError(ClusterError):
    """Workers were placed but did not become ready in time."""


class WorkerError(NeveError):
    """A worker raised or died; the message carries its rank and remote traceback.

    ``remote`` is the exception the worker raised, where it could be brought back
    (its traceback is the text in the message); it does not survive pickling.
    """

    def __init__(self, message: str, rank: int | None = None,
                 remote: BaseException | None = None) -> None:
        super().__init__(message)
        self.rank = rank
        self.remote = remote

    def __reduce__(self) -> tuple[type, tuple[str, int | None]]:
        return (type(self), (str(self.args[0]), self.rank))


class WorkerLostError(WorkerError):
    """A worker process died: killed, out of memory, or crashed in native code."""


class StageError(NeveError):
    """A stage cannot be resolved, written or published."""


class ContextError(NeveError, RuntimeError):
    """A per-worker API (``get_context``, ``get_shard``) was called outside a run."""


class NeveWarning(UserWarning):
    """Base of every warning neve gives: something done that the user may not expect."""


class DataWarning(NeveWarning):
    """The data is used in a way that may not be what the user meant."""


class NullsAsNaNWarning(DataWarning):
    """NULLs in numeric columns come out of ``to_torch_dataset`` as NaN (integers as float64)."""


class RowsDroppedWarning(DataWarning):
    """``equal=True`` drops rows so that every worker's shard has the same size."""


class HighCardinalityWarning(DataWarning):
    """A string feature has so many distinct values that it is more likely text or an id."""


class ParameterWarning(NeveWarning):
    """A framework parameter that the framework does not know, so it is ignored."""


class MemoryWarning(NeveWarning):
    """A fit is likely to need more memory than Ray gives its workers (say, what
    xgboost keeps per row even with external memory); it may be killed for memory."""
