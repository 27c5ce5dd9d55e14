"""Features, label, weight and group columns: checked on the driver, read as arrays on workers.

Numeric columns become float32 features (NULL -> NaN, which both frameworks
treat as missing). String and dictionary columns are categorical: the driver
collects their categories once, so every worker encodes them with the same codes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from neve._internal.data.batches import coalesce
from neve._internal.data.convert import is_categorical, is_numeric, numeric_array
from neve._internal.data.errors import check_columns
from neve._internal.data.fragments import Plan
from neve._internal.data.plans import plan_distinct
from neve._internal.data.sources import Source
from neve.exceptions import ColumnTypeError, ConfigError, NullLabelError

BATCH_ROWS = 262_144
MIN_BATCH_ROWS = 32_768
#: rows converted to float32 at a time: the one copy of the data a worker makes
MAX_BATCH_ROWS = 16_384
#: the most categories a categorical feature may have (xgboost and LightGBM slow down
#: long before; a free-text column should be dropped or encoded by the user)
MAX_CATEGORIES = 100_000


@dataclass(frozen=True)
class FeatureSpec:
    """Which columns play which part, and the categories of categorical features."""

    input_cols: tuple[str, ...]
    label_col: str
    weight_col: str | None = None
    group_col: str | None = None
    categories: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        extra = [c for c in (self.weight_col, self.group_col) if c]
        return list(dict.fromkeys([*self.input_cols, self.label_col, *extra]))

    @property
    def feature_types(self) -> list[str]:
        return ["c" if c in self.categories else "q" for c in self.input_cols]

    @property
    def categorical_indices(self) -> list[int]:
        return [i for i, c in enumerate(self.input_cols) if c in self.categories]


def build_spec(
    schema: pa.Schema,
    input_cols: Sequence[str] | str,
    label_col: str,
    weight_col: str | None,
    group_col: str | None,
    what: str,
) -> FeatureSpec:
    """Check every named column exists and has a usable type."""
    if isinstance(input_cols, str):
        input_cols = [input_cols]
    inputs = tuple(input_cols)
    if not inputs:
        raise ConfigError("input_cols must name at least one feature column, got none")
    if not isinstance(label_col, str) or not label_col:
        raise ConfigError(f"label_col must be a column name, got {label_col!r}")
    if label_col in inputs:
        raise ConfigError(f"label column {label_col!r} is also listed in input_cols; remove it")
    named = [*inputs, label_col, *(c for c in (weight_col, group_col) if c)]
    check_columns(schema, named, what)
    for name in named:
        dtype = schema.field(name).type
        if name in inputs and (is_numeric(dtype) or is_categorical(dtype)):
            continue
        if name not in inputs and is_numeric(dtype):
            continue
        raise ColumnTypeError(_type_advice(name, dtype, inputs, label_col, weight_col))
    return FeatureSpec(inputs, label_col, weight_col, group_col)


def _type_advice(name: str, dtype: pa.DataType, inputs: tuple[str, ...], label_col: str,
                 weight_col: str | None) -> str:
    """Why a column's type cannot play its role, and the fix for that role."""
    if name in inputs:
        return (f"feature column {name!r} has type {dtype}, which cannot be used; feature "
                "columns must hold numbers, booleans, decimals, dates, or strings (categorical): "
                "cast it in your query, or drop it from input_cols")
    role = "label" if name == label_col else "weight" if name == weight_col else "group"
    if role == "label" and is_categorical(dtype):
        return (f"label column {name!r} has type {dtype}; labels must be numbers: encode the "
                f"classes in your query, e.g. CASE WHEN {name} = 'yes' THEN 1 ELSE 0 END for "
                f"two classes, or DENSE_RANK() OVER (ORDER BY {name}) - 1 for 0..K-1 "
                "(with objective 'multi:softprob' / 'multiclass' and num_class=K)")
    return (f"{role} column {name!r} has type {dtype}, which cannot be used; {role} columns "
            f"must hold numbers: cast it in your query (CAST({name} AS DOUBLE))")


def with_categories(spec: FeatureSpec, source: Source, plan: Plan) -> FeatureSpec:
    """Collect the categories of the categorical features where the rows live: a
    ``SELECT DISTINCT`` in the database, or Ray tasks over the plan's fragments that
    each send back their distinct values - never the rows through the driver."""
    schema = source.schema()
    names = [c for c in spec.input_cols if is_categorical(schema.field(c).type)]
    if not names:
        return spec
    found: dict[str, list[Any]] = {}
    for name in names:
        values = source.distinct(name, MAX_CATEGORIES + 1)
        if values is not None:
            found[name] = values
    rest = [n for n in names if n not in found]
    if rest:
        found.update(plan_distinct(plan, rest, MAX_CATEGORIES + 1))
    for name, values in found.items():
        if len(values) > MAX_CATEGORIES:
            raise ColumnTypeError(
                f"feature column {name!r} holds more than {MAX_CATEGORIES:,} distinct strings, "
                "too many for a categorical feature; drop it from input_cols, or encode it "
                "as numbers in your query"
            )
    categories = {n: tuple(sorted(found[n], key=str)) for n in names}
    return FeatureSpec(spec.input_cols, spec.label_col, spec.weight_col, spec.group_col,
                       categories)


@dataclass
class Arrays:
    """One batch as the arrays a GBDT framework takes."""

    features: np.ndarray  # (rows, features) float32, C order
    label: np.ndarray
    weight: np.ndarray | None
    group: np.ndarray | None


def _encode(column: pa.Array, categories: tuple[Any, ...]) -> np.ndarray:
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    codes = pc.index_in(column, value_set=pa.array(categories, type=column.type))
    return pc.cast(codes, pa.float32()).fill_null(float("nan")).to_numpy()


def feature_matrix(batch: pa.RecordBatch, spec: FeatureSpec) -> np.ndarray:
    """The input columns of one batch as a (rows, features) float32 matrix."""
    features = np.empty((batch.num_rows, len(spec.input_cols)), dtype=np.float32)
    for j, name in enumerate(spec.input_cols):
        column = batch.column(name)
        if name in spec.categories:
            features[:, j] = _encode(column, spec.categories[name])
        else:
            features[:, j] = numeric_array(column)
    return features


def _check_label(column: pa.Array, spec: FeatureSpec, what: str) -> None:
    if column.null_count:
        raise NullLabelError(
            f"label column {spec.label_col!r} holds {column.null_count} NULL value(s) in "
            f"{what}; filter them out (WHERE {spec.label_col} IS NOT NULL) or fill them"
        )


def to_arrays(batch: pa.RecordBatch, spec: FeatureSpec, what: str) -> Arrays:
    """Convert one batch; NULL labels are an error, NULL features are missing values."""
    features = feature_matrix(batch, spec)
    label_column = batch.column(spec.label_col)
    _check_label(label_column, spec, what)
    label = numeric_array(label_column).astype(np.float32, copy=False)
    weight = (
        numeric_array(batch.column(spec.weight_col)).astype(np.float32, copy=False)
        if spec.weight_col else None
    )
    group = (
        numeric_array(batch.column(spec.group_col)).astype(np.int64, copy=False)
        if spec.group_col else None
    )
    return Arrays(features, label, weight, group)


def iter_arrays(source: Source, spec: FeatureSpec, what: str,
                max_rows: int = MAX_BATCH_ROWS) -> Iterator[Arrays]:
    """The source's rows as batches of arrays of at most ``max_rows`` (small source
    batches merged)."""
    # Batches go as the source cut them: re-cutting to one size would copy every row.
    for batch in coalesce(source.stream(spec.columns), min(MIN_BATCH_ROWS, max_rows)):
        for start in range(0, batch.num_rows, max_rows):  # zero-copy slices
            yield to_arrays(batch.slice(start, max_rows), spec, what)


def empty_arrays(spec: FeatureSpec) -> Arrays:
    """No rows, in the shapes of :func:`to_arrays` (a worker whose shard is empty)."""
    return Arrays(np.empty((0, len(spec.input_cols)), np.float32), np.empty(0, np.float32),
                  np.empty(0, np.float32) if spec.weight_col else None,
                  np.empty(0, np.int64) if spec.group_col else None)


def targets(source: Source, spec: FeatureSpec, what: str, num_rows: int) -> Arrays:
    """Label, weight and group of every row (features left empty): one projected pass."""
    columns = [c for c in (spec.label_col, spec.weight_col, spec.group_col) if c]
    label = np.empty(num_rows, dtype=np.float32)
    weight = np.empty(num_rows, dtype=np.float32) if spec.weight_col else None
    group = np.empty(num_rows, dtype=np.int64) if spec.group_col else None
    offset = 0
    for batch in source.stream(columns):
        end = offset + batch.num_rows
        label_column = batch.column(spec.label_col)
        _check_label(label_column, spec, what)
        label[offset:end] = numeric_array(label_column)
        if weight is not None:
            weight[offset:end] = numeric_array(batch.column(spec.weight_col))
        if group is not None:
            group[offset:end] = numeric_array(batch.column(spec.group_col))
        offset = end
    if offset != num_rows:
        raise RuntimeError(f"expected {num_rows} rows from {what}, read {offset}")
    return Arrays(np.empty((num_rows, 0), dtype=np.float32), label, weight, group)


def group_sizes(qid: np.ndarray) -> np.ndarray:
    """Sizes of runs of equal query ids (rows of one query must be contiguous)."""
    if len(qid) == 0:
        return np.zeros(0, dtype=np.int64)
    change = np.flatnonzero(np.diff(qid)) + 1
    bounds = np.concatenate([[0], change, [len(qid)]])
    return np.diff(bounds)
