"""LightGBM's Sequence over a shard: every row, any access pattern, one batch held."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pyarrow as pa

from neve._internal.data.fragments import Plan, TableFragment
from neve._internal.data.resolve import PlanSource
from neve._internal.gbdt.features import FeatureSpec
from neve._internal.gbdt.lgbm import ArrowRows, dataset, merged

ROWS = 10_007


def _source() -> PlanSource:
    table = pa.table({
        "a": np.arange(ROWS, dtype=np.float32),
        "b": -np.arange(ROWS, dtype=np.float32),
        "y": np.arange(ROWS, dtype=np.float64) % 3,
    })
    fragments = [TableFragment(table.slice(i, 1000)) for i in range(0, ROWS, 1000)]
    return PlanSource(Plan(fragments, table.schema).pieces(), table.schema, "test rows")


def test_rows_come_back_by_index_range_and_list() -> None:
    rows = ArrowRows(_source(), FeatureSpec(("a", "b"), "y"))
    assert len(rows) == ROWS
    assert np.array_equal(rows[:][:, 0], np.arange(ROWS))
    assert np.array_equal(rows[2500:7777][:, 1], -np.arange(2500, 7777))
    assert rows[9999][0] == 9999 and rows[5][1] == -5  # a backward jump starts over
    assert rows[ROWS - 1].dtype == np.float64
    assert np.array_equal(rows[[3, 2000, 10]][:, 0], [3, 2000, 10])
    assert len(rows._matrix) <= 1000  # one batch held, not the shard


def _dense(spec: FeatureSpec, params: dict) -> lgb.Dataset:
    table = pa.Table.from_batches(list(_source().stream(None)))
    matrix = np.column_stack([table.column(c).to_numpy() for c in spec.input_cols])
    return lgb.Dataset(matrix.astype(np.float32), label=table.column("y").to_numpy(),
                       params=params, free_raw_data=False)


def test_a_dataset_from_the_sequence_equals_one_from_the_matrix() -> None:
    spec = FeatureSpec(("a", "b"), "y")
    params = {"verbosity": -1, "max_bin": 63, "num_threads": 1}
    streamed = dataset(_source(), spec, params)
    boosters = [lgb.train({**params, "objective": "regression"}, d, 5)
                for d in (streamed, _dense(spec, params))]
    probe = np.column_stack([np.arange(0, ROWS, 97), -np.arange(0, ROWS, 97)]).astype(np.float32)
    np.testing.assert_allclose(boosters[0].predict(probe), boosters[1].predict(probe))


def test_continuing_from_init_scores_equals_lightgbms_init_model() -> None:
    """neve continues a model from its raw scores on the Sequence (no dense copy), then
    merges the trees: the same model as lgb.train(init_model=...) on a dense matrix."""
    spec = FeatureSpec(("a", "b"), "y")
    params = {"verbosity": -1, "max_bin": 63, "num_threads": 1, "objective": "regression"}
    first = lgb.train(params, _dense(spec, params), 4)
    native = lgb.train(params, _dense(spec, params), 6, init_model=first)
    streamed = lgb.train(params, dataset(_source(), spec, params, init_model=first), 6)
    ours = merged(streamed, first)
    assert ours.current_iteration() == native.current_iteration() == 10
    probe = np.column_stack([np.arange(0, ROWS, 97), -np.arange(0, ROWS, 97)]).astype(np.float32)
    np.testing.assert_allclose(ours.predict(probe), native.predict(probe), rtol=1e-6)
