"""Outputs in detail: torch shapes and loaders, epochs, shuffling, batch sizes, types."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from neve._internal.context import shard_context
from neve.data import DataConnector, ShardedDataConnector

ROWS = 5_003


@pytest.fixture(scope="module")
def parquet_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ids = np.arange(ROWS, dtype=np.int64)
    table = pa.table({"id": ids, "x": ids * 0.5, "name": [f"n{i}" for i in ids]})
    path = tmp_path_factory.mktemp("outputs") / "rows.parquet"
    pq.write_table(table, path, row_group_size=600)
    return path


@pytest.fixture(scope="module")
def duck() -> Any:
    con = duckdb.connect()
    con.execute(
        f"CREATE TABLE rows AS SELECT range::BIGINT AS id, range * 0.5 AS x, "
        f"'n' || range AS name FROM range({ROWS})"
    )
    yield con
    con.close()


@pytest.fixture(params=["parquet", "duckdb"])
def connector(request: pytest.FixtureRequest, parquet_path: Path, duck: Any) -> DataConnector:
    if request.param == "parquet":
        return DataConnector.from_sources(parquet_path)
    return DataConnector.from_dataframe(duck.table("rows"))


def ids_of(batches: Any) -> list[int]:
    return [i for batch in batches for i in batch["id"].reshape(-1).tolist()]


# -- the seed's loop ----------------------------------------------------------------


def test_seed_loop_shapes(warehouse: Path) -> None:
    """The seed's PyTorch example, as written, over a DuckDB session table."""
    input_cols = ["f0", "f1", "f2", "f3"]
    label_col = "y"
    session = duckdb.connect(str(warehouse))
    try:
        train = ShardedDataConnector.from_dataframe(session.table("TRAINING_DATA"))
        with shard_context(0, 2):
            torch_dataset = train.get_shard().to_torch_dataset(batch_size=1024)
            dataloader = DataLoader(torch_dataset)
            model = torch.nn.Linear(len(input_cols), 1)
            steps = 0
            for batch_dict in dataloader:
                assert batch_dict["f0"].shape == (1, 1024)
                features = torch.cat([batch_dict[col].T for col in input_cols], dim=1).float()
                labels = batch_dict[label_col].T.squeeze(0).float()
                assert features.shape == (1024, len(input_cols))
                assert labels.shape == (1024, 1)
                assert model(features).shape == (1024, 1)
                steps += 1
    finally:
        session.close()
    assert steps == 10_000 // 1024  # half of 20k rows; the short last batch dropped


def test_expand_dims_gives_trailing_axis(connector: DataConnector) -> None:
    batch = next(iter(connector.to_torch_dataset(batch_size=64, expand_dims=True)))
    assert batch["id"].shape == (64, 1)
    assert batch["x"].shape == (64, 1)
    assert isinstance(batch["name"], list) and len(batch["name"]) == 64
    loaded = next(iter(DataLoader(connector.to_torch_dataset(batch_size=64, expand_dims=True))))
    assert loaded["x"].shape == (1, 64, 1)
    plain = next(iter(connector.to_torch_dataset(batch_size=64)))
    assert plain["x"].shape == (64,)
    torch.testing.assert_close(batch["x"].squeeze(1), plain["x"])


def test_batch_size_none_yields_single_rows(connector: DataConnector) -> None:
    rows = list(connector.to_torch_dataset())
    assert len(rows) == ROWS
    first = rows[0]
    assert first["id"].shape == () and first["id"].item() == 0
    assert first["x"].item() == 0.0
    assert first["name"] == "n0" and isinstance(first["name"], str)
    assert [r["id"].item() for r in rows] == list(range(ROWS))
    # DataLoader-side batching collates them.
    batch = next(iter(DataLoader(connector.to_torch_dataset(), batch_size=32)))
    assert batch["id"].shape == (32,)
    assert batch["id"].tolist() == list(range(32))
    assert batch["name"] == [f"n{i}" for i in range(32)]


def test_re_iterable_for_several_epochs(connector: DataConnector) -> None:
    ds = connector.to_torch_dataset(batch_size=500, drop_last_batch=False)
    for _ in range(3):
        assert ids_of(ds) == list(range(ROWS))
    loader = DataLoader(ds, batch_size=None)
    for _ in range(2):
        assert ids_of(loader) == list(range(ROWS))


def test_drop_last_batch(connector: DataConnector) -> None:
    kept = list(connector.to_torch_dataset(batch_size=1_000))
    assert [len(b["id"]) for b in kept] == [1_000] * 5
    assert ids_of(kept) == list(range(5_000))
    every = list(connector.to_torch_dataset(batch_size=1_000, drop_last_batch=False))
    assert [len(b["id"]) for b in every] == [1_000] * 5 + [3]
    assert ids_of(every) == list(range(ROWS))
    arrow = list(connector.iter_batches(1_000, drop_last_batch=True))
    assert [b.num_rows for b in arrow] == [1_000] * 5


def test_shuffle_changes_order_not_rows(connector: DataConnector) -> None:
    ds = connector.to_torch_dataset(batch_size=100, shuffle=True, drop_last_batch=False)
    first, second = ids_of(ds), ids_of(ds)
    assert sorted(first) == sorted(second) == list(range(ROWS))
    assert first != list(range(ROWS))
    assert first != second  # a new order each epoch
    # Strings travel with their rows through the shuffle.
    for batch in ds:
        assert batch["name"] == [f"n{i}" for i in batch["id"].tolist()]
        torch.testing.assert_close(batch["x"], batch["id"].double() * 0.5)
        break


def test_shuffle_seed_is_reproducible(connector: DataConnector) -> None:
    def epoch(seed: int) -> list[int]:
        return ids_of(connector.to_torch_dataset(batch_size=128, shuffle=True, seed=seed))

    assert epoch(3) == epoch(3)
    assert epoch(3) != epoch(4)


def test_seeded_shuffle_in_dataloader_workers_changes_every_epoch(
    connector: DataConnector,
) -> None:
    ds = connector.to_torch_dataset(batch_size=100, shuffle=True, seed=11,
                                    drop_last_batch=False)

    def epochs() -> list[list[int]]:
        torch.manual_seed(0)  # DataLoader draws its per-epoch worker seeds from torch
        loader = DataLoader(ds, batch_size=None, num_workers=2)
        return [ids_of(loader), ids_of(loader)]

    first, second = epochs()
    assert sorted(first) == sorted(second) == list(range(ROWS))
    assert first != second  # a new order in the second epoch
    assert epochs() == [first, second]  # and the same two orders again under the same seed


def test_columns_projection_keeps_order_and_case() -> None:
    frame = DataConnector.from_sql('SELECT 1 AS "Alpha", 2 AS beta, 3 AS "GAMMA"')
    batch = next(iter(frame.to_torch_dataset(batch_size=1, columns=["GAMMA", "Alpha"])))
    assert list(batch) == ["GAMMA", "Alpha"]
    assert batch["GAMMA"].tolist() == [3]
    assert frame.to_arrow(columns=["beta", "Alpha"]).column_names == ["beta", "Alpha"]
    assert [b.schema.names for b in frame.iter_batches(5, columns=["GAMMA"])] == [["GAMMA"]]


# -- DataLoader worker processes ------------------------------------------------------


class TagWorker(IterableDataset):  # type: ignore[type-arg]
    """A user's wrapper around to_torch_dataset that tags each batch with its loader process."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __iter__(self) -> Any:
        info = get_worker_info()
        for batch in self.inner:
            n = len(batch["id"]) if isinstance(batch["id"], list) else batch["id"].numel()
            batch["worker"] = torch.full((n,), info.id if info is not None else -1)
            yield batch


@pytest.mark.parametrize("shuffle", [False, True])
def test_dataloader_workers_split_the_rows(connector: DataConnector, shuffle: bool) -> None:
    ds = TagWorker(connector.to_torch_dataset(batch_size=128, shuffle=shuffle,
                                              drop_last_batch=False))
    seen: dict[int, list[int]] = {0: [], 1: []}
    for batch in DataLoader(ds, num_workers=2, batch_size=None):
        for worker, row in zip(batch["worker"].tolist(), batch["id"].tolist(), strict=True):
            seen[worker].append(row)
    everything = seen[0] + seen[1]
    assert sorted(everything) == list(range(ROWS))  # no duplicates, none missing
    # Each process reads its own half, not the whole source.
    assert not set(seen[0]) & set(seen[1])
    assert abs(len(seen[0]) - len(seen[1])) <= 1
    if not shuffle:
        assert seen[0] == list(range(len(seen[0])))
        assert seen[1] == list(range(len(seen[0]), ROWS))


def test_dataloader_workers_single_rows(connector: DataConnector) -> None:
    loader = DataLoader(connector.to_torch_dataset(), num_workers=2, batch_size=50)
    ids = ids_of(loader)
    assert sorted(ids) == list(range(ROWS))
    counts = Counter(ids)
    assert max(counts.values()) == 1


def test_dataloader_workers_over_sql_query(duck: Any) -> None:
    """A from_sql source (only this process can run it) still splits between loaders."""
    connector = DataConnector.from_sql("SELECT * FROM rows WHERE id % 2 = 0", session=duck)
    loader = DataLoader(connector.to_torch_dataset(batch_size=64, drop_last_batch=False),
                        num_workers=2, batch_size=None)
    for _ in range(2):  # and again for a second epoch
        assert sorted(ids_of(loader)) == list(range(0, ROWS, 2))


# -- types (REFERENCE section 2) -------------------------------------------------------

TYPES_SQL = """
SELECT
    range::BIGINT AS id,
    (range / 4)::DECIMAL(10, 2) AS price,
    (range * 3)::DECIMAL(12, 0) AS qty,
    CASE WHEN range % 3 = 0 THEN NULL ELSE range::DECIMAL(12, 0) END AS qty_or_null,
    CASE WHEN range % 4 = 0 THEN NULL ELSE range * 0.5 END::DOUBLE AS x_or_null,
    CASE WHEN range % 5 = 0 THEN NULL ELSE range::INTEGER END AS int_or_null,
    range::FLOAT AS f32,
    range % 2 = 0 AS flag,
    'text ' || range AS note,
    CASE WHEN range % 6 = 0 THEN NULL ELSE 'maybe' END AS note_or_null,
    ('b' || range)::BLOB AS raw,
    range::SMALLINT AS "MixedCase",
    range AS "UPPER"
FROM range(12)
"""


def _types_connector() -> DataConnector:
    return DataConnector.from_sql(TYPES_SQL)


def test_types_in_torch_batches() -> None:
    batch = next(iter(_types_connector().to_torch_dataset(batch_size=12)))
    n = np.arange(12)
    assert list(batch) == ["id", "price", "qty", "qty_or_null", "x_or_null", "int_or_null",
                           "f32", "flag", "note", "note_or_null", "raw", "MixedCase", "UPPER"]

    def check(name: str, dtype: torch.dtype, values: Any) -> None:
        assert batch[name].dtype == dtype, name
        np.testing.assert_array_equal(batch[name].numpy(), values, err_msg=name)

    check("id", torch.int64, n)
    check("price", torch.float64, n / 4)  # decimal(10, 2) -> float64
    check("qty", torch.int64, n * 3)  # decimal(12, 0) -> int64
    check("qty_or_null", torch.float64, np.where(n % 3 == 0, np.nan, n))
    check("x_or_null", torch.float64, np.where(n % 4 == 0, np.nan, n * 0.5))
    check("int_or_null", torch.float64, np.where(n % 5 == 0, np.nan, n))
    check("f32", torch.float32, n)
    check("flag", torch.bool, n % 2 == 0)
    check("MixedCase", torch.int16, n)
    check("UPPER", torch.int64, n)
    assert batch["note"] == [f"text {i}" for i in n]
    assert batch["note_or_null"] == [None if i % 6 == 0 else "maybe" for i in n]
    assert batch["raw"] == [f"b{i}".encode() for i in n]


def test_types_in_single_rows() -> None:
    rows = list(_types_connector().to_torch_dataset())
    assert len(rows) == 12
    row = rows[3]
    assert row["note"] == "text 3" and isinstance(row["note"], str)
    assert row["raw"] == b"b3"
    assert row["price"].dtype == torch.float64 and row["price"].item() == 0.75
    assert row["qty"].dtype == torch.int64 and row["qty"].item() == 9
    assert np.isnan(row["qty_or_null"].item())
    assert row["flag"].dtype == torch.bool and not row["flag"].item()
    assert rows[0]["note_or_null"] is None


def test_dictionary_column_passes_through_as_values() -> None:
    table = pa.table({
        "id": [0, 1, 2],
        "color": pa.array(["red", "blue", "red"]).dictionary_encode(),
    })
    batch = next(iter(DataConnector.from_dataframe(table).to_torch_dataset(batch_size=3)))
    assert batch["color"] == ["red", "blue", "red"]


def test_postgres_numeric_is_float64(postgres_uri: str) -> None:
    """PostgreSQL NUMERIC reaches torch as float64 (ADBC hands it over as decimal text)."""
    import adbc_driver_postgresql.dbapi as pg

    with pg.connect(postgres_uri) as conn:
        with conn.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS prices")
            cur.execute('CREATE TABLE prices (id int, price numeric(10, 2), "Qty" numeric, '
                        "flag boolean, note text, x double precision)")
            cur.execute("INSERT INTO prices VALUES (1, 1.25, 7, true, 'a', NULL), "
                        "(2, NULL, -3, false, 'b', 2.5), (3, 10.5, 0, NULL, NULL, 1)")
        conn.commit()
    connector = DataConnector.from_sql("SELECT * FROM prices ORDER BY id", session=postgres_uri)
    assert connector.columns == ["id", "price", "Qty", "flag", "note", "x"]
    batch = next(iter(connector.to_torch_dataset(batch_size=3)))
    assert batch["price"].dtype == torch.float64
    np.testing.assert_array_equal(batch["price"].numpy(), [1.25, np.nan, 10.5])
    np.testing.assert_array_equal(batch["Qty"].numpy(), [7.0, -3.0, 0.0])
    np.testing.assert_array_equal(batch["x"].numpy(), [np.nan, 2.5, 1.0])
    np.testing.assert_array_equal(batch["flag"].numpy(), [1.0, 0.0, np.nan])  # NULL bool
    assert batch["note"] == ["a", "b", None]
    # to_arrow stays what the driver reports.
    assert connector.to_arrow().column("price").to_pylist() == ["1.25", None, "10.50"]


def test_duckdb_streams_in_process_and_spills_only_for_loader_processes(duck: Any) -> None:
    ds = DataConnector.from_dataframe(duck.table("rows")).to_torch_dataset(
        batch_size=500, drop_last_batch=False
    )
    assert sorted(ids_of(ds)) == list(range(ROWS))
    assert ds.plan is None  # read straight from DuckDB: nothing written to disk
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    assert sorted(ids_of(loader)) == list(range(ROWS))
    assert ds.plan is not None  # spilled once, just before the loader forked
    assert sorted(ids_of(ds)) == list(range(ROWS))  # and read from the spill since
