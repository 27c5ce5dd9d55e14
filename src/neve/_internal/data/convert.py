"""Arrow columns to NumPy arrays and torch tensors, with neve's type rules.

* integers, floats, booleans -> numeric arrays; NULL in a float column -> NaN
  (an integer or boolean column with NULLs becomes float64 with NaN);
* decimals -> float64, or int64 when their scale is 0; PostgreSQL NUMERIC, which
  the ADBC driver returns as decimal text without its scale, -> float64;
* dates and timestamps -> int64 (their Arrow storage: days or time units);
* strings, binary and dictionary columns -> Python values (a list per batch).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.types as pat


def _is_text_numeric(dtype: pa.DataType) -> bool:
    """PostgreSQL NUMERIC as ADBC reads it: an opaque extension type over decimal text."""
    opaque = getattr(pa, "OpaqueType", None)
    return (
        opaque is not None
        and isinstance(dtype, opaque)
        and dtype.type_name == "numeric"
        and pat.is_string(dtype.storage_type)
    )


def is_numeric(dtype: pa.DataType) -> bool:
    """Whether a column of this type becomes a numeric array."""
    return (
        _is_text_numeric(dtype)
        or pat.is_integer(dtype)
        or pat.is_floating(dtype)
        or pat.is_boolean(dtype)
        or pat.is_decimal(dtype)
        or pat.is_temporal(dtype)
        or pat.is_null(dtype)
    )


def is_categorical(dtype: pa.DataType) -> bool:
    """Whether GBDT frameworks should treat a column of this type as categorical."""
    return pat.is_string(dtype) or pat.is_large_string(dtype) or pat.is_dictionary(dtype)


def numeric_array(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A NumPy array for a numeric Arrow column, following the module's rules."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    dtype = column.type
    if _is_text_numeric(dtype):
        column = pc.cast(column.storage, pa.float64())
    elif pat.is_decimal(dtype):
        target = pa.int64() if dtype.scale == 0 and column.null_count == 0 else pa.float64()
        column = pc.cast(column, target)
    elif pat.is_temporal(dtype):
        storage = pa.int32() if pat.is_date32(dtype) or pat.is_time32(dtype) else pa.int64()
        target = pa.int64() if column.null_count == 0 else pa.float64()
        column = pc.cast(column.view(storage), target)
    elif pat.is_null(dtype):
        return np.full(len(column), np.nan)
    if column.null_count:
        if pat.is_floating(column.type):
            return column.fill_null(float("nan")).to_numpy(zero_copy_only=False)
        return pc.cast(column, pa.float64()).fill_null(float("nan")).to_numpy()
    if pat.is_boolean(column.type):
        return column.to_numpy(zero_copy_only=False)
    return _buffer_view(column)


def _buffer_view(column: pa.Array) -> np.ndarray:
    """A fixed-width column without NULLs as a read-only view of its data buffer: what
    ``to_numpy()`` returns, without the pandas import (0.15 s) Arrow's conversion makes
    on its first call, in every fresh worker."""
    dtype = np.dtype(column.type.to_pandas_dtype())
    if len(column) == 0:
        return np.empty(0, dtype)
    return np.frombuffer(column.buffers()[1], dtype, len(column), column.offset * dtype.itemsize)


def python_values(column: pa.Array | pa.ChunkedArray) -> list[Any]:
    """Strings, binary and dictionary columns as a list of Python values."""
    if pat.is_dictionary(column.type):
        column = pc.cast(column, column.type.value_type)
    return column.to_pylist()


def batch_to_numpy(batch: pa.RecordBatch) -> dict[str, Any]:
    """One batch as ``{column: ndarray or list}``."""
    out: dict[str, Any] = {}
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        out[name] = numeric_array(column) if is_numeric(column.type) else python_values(column)
    return out


def to_tensor(array: np.ndarray, expand_dims: bool) -> Any:
    """A torch tensor sharing ``array``'s memory where it can."""
    import torch

    if not array.flags.writeable:
        array = array.copy()
    tensor = torch.from_numpy(array)
    return tensor.unsqueeze(1) if expand_dims else tensor


def batch_to_torch(batch: pa.RecordBatch, *, expand_dims: bool = False) -> dict[str, Any]:
    """One batch as ``{column: tensor (batch,) or (batch, 1), or list of values}``."""
    return {
        name: to_tensor(value, expand_dims) if isinstance(value, np.ndarray) else value
        for name, value in batch_to_numpy(batch).items()
    }
