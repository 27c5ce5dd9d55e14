"""Data connectors: rows from DuckDB, files, SQL databases and frames, as Arrow.

Example:
    >>> import duckdb
    >>> from neve.data import DataConnector
    >>> session = duckdb.connect()
    >>> DataConnector.from_dataframe(session.sql("SELECT 1 AS a")).to_pandas()["a"].tolist()
    [1]
"""

from neve.data._connector import DataConnector, ShardedDataConnector

__all__ = ["DataConnector", "ShardedDataConnector"]
