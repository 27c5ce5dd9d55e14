"""The private PostgreSQL server from tests/_postgres.py really works."""

import os
import socket

import adbc_driver_postgresql.dbapi as adbc_pg

from _postgres import PostgresServer  # tests/ has no __init__: pytest puts it on sys.path


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_postgres_server_roundtrip_and_cleanup():
    with PostgresServer() as pg:
        port, tmpdir = pg.port, pg.tmpdir
        assert pg.uri == f"postgresql://neve@127.0.0.1:{port}/neve"
        assert _accepts(port)

        with adbc_pg.connect(pg.uri) as conn:
            with conn.cursor() as cur:
                cur.execute(
                    "CREATE TABLE items (id integer PRIMARY KEY, name text, price double precision)"
                )
                cur.executemany(
                    "INSERT INTO items VALUES ($1, $2, $3)",
                    [(1, "apple", 0.5), (2, "pear", 1.25), (3, "plum", 2.0)],
                )
            conn.commit()

            with conn.cursor() as cur:
                cur.execute("SELECT id, name, price FROM items ORDER BY id")
                table = cur.fetch_arrow_table()
                cur.execute("SELECT current_database(), current_user")
                assert cur.fetchone() == ("neve", "neve")

        assert table.column_names == ["id", "name", "price"]
        assert table.num_rows == 3
        assert table.to_pydict() == {
            "id": [1, 2, 3],
            "name": ["apple", "pear", "plum"],
            "price": [0.5, 1.25, 2.0],
        }

    # Server is gone and its directory removed.
    assert not _accepts(port)
    assert not os.path.exists(tmpdir)
    assert pg.proc is None
