"""Parquet, CSV and Arrow IPC files and folders on any fsspec filesystem.

Files are found the way ``pyarrow.dataset`` sees a dataset: hidden files and
folders (``.x``, ``_SUCCESS``) are skipped, and hive partition folders
(``year=2024/``) become columns. Parquet files split into one fragment per row
group (their footers read in parallel) and IPC files into one per record batch:
each worker reads its own row groups straight from storage. A CSV file has no row
index, so it is one fragment of unknown size that a worker parses once into its
local cache. Files on a filesystem that lives inside this process (``memory://``),
which no other process can open, are streamed by the driver.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa

from neve._internal.data.batches import slice_stream
from neve._internal.data.errors import source_error
from neve._internal.data.fragments import (
    Fragment,
    IpcBatchFragment,
    ParquetRowGroupFragment,
    Plan,
    is_local_filesystem,
    with_constants,
)
from neve._internal.data.sources import STREAM_BATCH_ROWS, Source
from neve.exceptions import ConfigError, SourceError

FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".arrow": "ipc",
    ".ipc": "ipc",
    ".feather": "ipc",
}
#: a guess of bytes per CSV row, to balance CSV files between workers before parsing
CSV_BYTES_PER_ROW = 100
#: footers read at once when planning
FOOTER_THREADS = 16

# Filesystems whose files live in this process only: other processes cannot read them.
_PROCESS_LOCAL_PROTOCOLS = ("memory",)


def _process_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return any(p in _PROCESS_LOCAL_PROTOCOLS for p in protocol)


def _format_of(path: str) -> str | None:
    lowered = path.lower()
    for suffix in (".gz", ".zst", ".bz2"):
        if lowered.endswith(suffix):
            lowered = lowered[: -len(suffix)]
    return FORMATS.get(os.path.splitext(lowered)[1])


def _hidden(path: str, root: str) -> bool:
    """Whether a file under ``root`` is hidden: any part of its path below ``root``
    starts with ``.`` or ``_`` (as ``pyarrow.dataset`` and Spark skip them)."""
    relative = path[len(root):].strip("/") if path.startswith(root) else os.path.basename(path)
    return any(part.startswith((".", "_")) for part in relative.split("/"))


@dataclass
class CsvFragment(Fragment):
    """A whole CSV file: its row count is known only once it is parsed."""

    path: str
    filesystem: Any  # fsspec.AbstractFileSystem
    schema: pa.Schema  # the dataset's columns: the file's plus partition columns
    estimate: int
    partition: dict[str, Any] = field(default_factory=dict)
    num_rows: int | None = None
    cache_locally: ClassVar[bool] = True  # type: ignore[misc]  # parsed once per worker

    @property
    def estimated_rows(self) -> int:
        return self.estimate

    def read(
        self, columns: Sequence[str] | None, start: int = 0, stop: int | None = None
    ) -> Iterator[pa.RecordBatch]:
        import pyarrow.csv as csv

        wanted = list(columns) if columns is not None else self.schema.names
        in_file = [c for c in wanted if c not in self.partition]
        file_types = {f.name: f.type for f in self.schema if f.name not in self.partition}
        stream = pa.input_stream(self.filesystem.open(self.path, "rb"), compression="detect")
        reader = csv.open_csv(
            stream,
            read_options=csv.ReadOptions(block_size=16 << 20),
            convert_options=csv.ConvertOptions(column_types=file_types, include_columns=in_file),
        )
        with stream:
            for batch in slice_stream(reader, start, stop):
                yield with_constants(batch, self.partition, self.schema, wanted)

    def cache_key(self) -> str:
        return self.path


class FileSource(Source):
    """Files and folders of one format, local or on any fsspec filesystem."""

    def __init__(self, sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                 format: str | None = None) -> None:
        import fsspec

        items = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
        if not items:
            raise ConfigError("from_sources needs at least one path or URL, got none")
        if format is not None and format not in ("parquet", "csv", "ipc", "arrow", "feather"):
            raise ConfigError(
                f"format must be 'parquet', 'csv' or 'ipc', got {format!r}"
            )
        self.format = {"arrow": "ipc", "feather": "ipc"}.get(format or "", format)
        #: (filesystem, root folder or None for a file, [files])
        self.groups: list[tuple[Any, str | None, list[str]]] = []
        for item in items:
            url = os.fspath(item)
            with source_error(f"listing {url!r}"):
                fs, path = fsspec.core.url_to_fs(url)
                if fs.isdir(path):
                    found = sorted(p for p in fs.find(path)
                                   if _format_of(p) and not _hidden(p, path))
                    if not found:
                        raise SourceError(f"folder {url!r} holds no Parquet, CSV or Arrow files")
                    self.groups.append((fs, path, found))
                elif fs.exists(path):
                    self.groups.append((fs, None, [path]))
                else:
                    raise SourceError(f"no such file or folder: {url!r}")
        files = [p for _, _, paths in self.groups for p in paths]
        formats = {self.format or _format_of(p) for p in files}
        if None in formats:
            unknown = next(p for p in files if not _format_of(p))
            raise ConfigError(
                f"cannot tell the format of {unknown!r} from its name; pass "
                "format='parquet', 'csv' or 'ipc'"
            )
        if len(formats) > 1:
            raise ConfigError(
                f"from_sources reads one format at a time, got {sorted(str(f) for f in formats)}; "
                "make one connector per format"
            )
        self.format = formats.pop()
        count = len(files)
        self.description = f"{count} {self.format} file{'s' if count != 1 else ''}"
        self._datasets: list[Any] | None = None
        self._fragments: list[Fragment] | None = None

    @property
    def files(self) -> list[tuple[Any, str]]:
        return [(fs, p) for fs, _, paths in self.groups for p in paths]

    def _dataset_list(self) -> list[Any]:
        """One ``pyarrow.dataset`` per folder or file given (hive partitions discovered)."""
        import pyarrow.dataset as ds
        import pyarrow.fs as pafs

        if self._datasets is None:
            fmt = {"parquet": "parquet", "csv": "csv", "ipc": "ipc"}[self.format or "parquet"]
            out = []
            for fs, root, paths in self.groups:
                filesystem = pafs.LocalFileSystem() if is_local_filesystem(fs) else fs
                with source_error(f"reading {root or paths[0]!r}"):
                    out.append(ds.dataset(
                        paths, filesystem=filesystem, format=fmt,
                        partitioning="hive" if root is not None else None,
                        partition_base_dir=root,
                    ))
            self._datasets = out
        return self._datasets

    def schema(self) -> pa.Schema:
        datasets = self._dataset_list()
        with source_error(f"reading the schema of {self.description}"):
            if len(datasets) == 1:
                return datasets[0].schema
            return pa.unify_schemas([d.schema for d in datasets])

    def fragments(self, columns: Sequence[str] | None) -> list[Fragment] | None:
        if any(_process_local(fs) for fs, _, _ in self.groups):
            return None  # memory:// files: only this process can read them
        return self._file_fragments()

    def plan(self, columns: Sequence[str] | None, *, sized: bool = False) -> Plan | None:
        plan = super().plan(columns, sized=sized)
        if plan is None or self.format != "csv":
            return plan
        from neve._internal.data.plans import counted

        # A CSV file is parsed to count its rows (by Ray tasks, in parallel): then even
        # one big file splits evenly, and each worker parses only what covers its rows.
        return counted(plan)

    def _file_fragments(self) -> list[Fragment]:
        """Every file's row groups / record batches (footers read once, in parallel)."""
        if self._fragments is None:
            self._fragments = self._find_fragments()
        return self._fragments

    def _find_fragments(self) -> list[Fragment]:
        import pyarrow.dataset as ds

        if self.format == "ipc":
            return self._ipc_fragments()
        schema = self.schema()
        files = []
        for (fs, _, _), dataset in zip(self.groups, self._dataset_list(), strict=True):
            for fragment in dataset.get_fragments():
                partition = ds.get_partition_keys(fragment.partition_expression) or {}
                files.append((fs, fragment.path, partition))
        if self.format == "csv":
            return [CsvFragment(path, fs, schema, _csv_estimate(fs, path), partition)
                    for fs, path, partition in files]
        with ThreadPoolExecutor(min(FOOTER_THREADS, max(len(files), 1))) as pool:
            per_file = list(pool.map(lambda f: _row_groups(f[0], f[1], f[2], schema), files))
        return [fragment for group in per_file for fragment in group]

    def _ipc_fragments(self) -> list[Fragment]:
        out: list[Fragment] = []
        for fs, path in self.files:
            with source_error(f"reading the metadata of {path!r}"), fs.open(path, "rb") as handle:
                reader = pa.ipc.open_file(handle)
                for i in range(reader.num_record_batches):
                    rows = reader.get_batch(i).num_rows
                    if rows:
                        out.append(IpcBatchFragment(path, fs, i, rows))
        return out

    def stream(self, columns: Sequence[str] | None) -> Iterator[pa.RecordBatch]:
        if self.format != "csv":
            for fragment in self._file_fragments():
                with source_error(f"reading {getattr(fragment, 'path', self.description)!r}"):
                    yield from fragment.read(columns)
            return
        for fragment in self._file_fragments():
            with source_error(f"reading {getattr(fragment, 'path', self.description)!r}"):
                for batch in fragment.read(columns):
                    yield from (batch.slice(i, STREAM_BATCH_ROWS)
                                for i in range(0, batch.num_rows, STREAM_BATCH_ROWS))


def _row_groups(fs: Any, path: str, partition: dict[str, Any],
                schema: pa.Schema) -> list[Fragment]:
    """A Parquet file's row groups (reads its footer), as fragments."""
    import pyarrow.parquet as pq

    with source_error(f"reading the metadata of {path!r}"), fs.open(path, "rb") as handle:
        meta = pq.ParquetFile(handle).metadata
    return [ParquetRowGroupFragment(path, fs, i, meta.row_group(i).num_rows, schema, partition)
            for i in range(meta.num_row_groups) if meta.row_group(i).num_rows]


def _csv_estimate(fs: Any, path: str) -> int:
    try:
        size = int(fs.size(path) or 0)
    except Exception:
        size = 0
    return max(size // CSV_BYTES_PER_ROW, 1)
