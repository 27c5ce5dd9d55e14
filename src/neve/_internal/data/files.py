"""Parquet, CSV and Arrow IPC files and folders on any fsspec filesystem.

Parquet files split into one fragment per row group and IPC files into one per
record batch, read from their metadata on the driver (cheap): each worker then
reads its own row groups straight from storage. CSV has no row index, so CSV
files are streamed by the process that reads them; so are files on a filesystem
that lives inside this process (``memory://``), which no other process can open.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa

from neve._internal.data.errors import source_error
from neve._internal.data.fragments import (
    Fragment,
    IpcBatchFragment,
    ParquetRowGroupFragment,
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
        self.files: list[tuple[Any, str]] = []
        for item in items:
            url = os.fspath(item)
            with source_error(f"listing {url!r}"):
                fs, path = fsspec.core.url_to_fs(url)
                if fs.isdir(path):
                    found = sorted(
                        p for p in fs.find(path)
                        if _format_of(p) and not os.path.basename(p).startswith((".", "_"))
                    )
                    if not found:
                        raise SourceError(f"folder {url!r} holds no Parquet, CSV or Arrow files")
                    self.files.extend((fs, p) for p in found)
                elif fs.exists(path):
                    self.files.append((fs, path))
                else:
                    raise SourceError(f"no such file or folder: {url!r}")
        formats = {self.format or _format_of(p) for _, p in self.files}
        if None in formats:
            unknown = next(p for _, p in self.files if not _format_of(p))
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
        count = len(self.files)
        self.description = f"{count} {self.format} file{'s' if count != 1 else ''}"
        self._schema: pa.Schema | None = None

    def _open_parquet(self, fs: Any, path: str) -> Any:
        import pyarrow.parquet as pq

        return pq.ParquetFile(fs.open(path, "rb"))

    def _open_csv(self, fs: Any, path: str) -> Any:
        import pyarrow.csv as csv

        compression = "detect"
        stream = pa.input_stream(fs.open(path, "rb"), compression=compression)
        return csv.open_csv(stream, read_options=csv.ReadOptions(block_size=16 << 20))

    def schema(self) -> pa.Schema:
        if self._schema is None:
            fs, path = self.files[0]
            with source_error(f"reading {path!r}"):
                if self.format == "parquet":
                    self._schema = self._open_parquet(fs, path).schema_arrow
                elif self.format == "ipc":
                    with fs.open(path, "rb") as handle:
                        self._schema = pa.ipc.open_file(handle).schema
                else:
                    self._schema = self._open_csv(fs, path).schema
        return self._schema

    def fragments(self, columns: Sequence[str] | None) -> list[Fragment] | None:
        if any(_process_local(fs) for fs, _ in self.files):
            return None  # memory:// files: only this process can read them
        return self._file_fragments()

    def _file_fragments(self) -> list[Fragment] | None:
        """Row groups / record batches of every file (``None`` for CSV)."""
        if self.format == "csv":
            return None
        out: list[Fragment] = []
        for fs, path in self.files:
            with source_error(f"reading the metadata of {path!r}"):
                if self.format == "parquet":
                    meta = self._open_parquet(fs, path).metadata
                    out.extend(
                        ParquetRowGroupFragment(path, fs, i, meta.row_group(i).num_rows)
                        for i in range(meta.num_row_groups)
                        if meta.row_group(i).num_rows
                    )
                else:
                    with fs.open(path, "rb") as handle:
                        reader = pa.ipc.open_file(handle)
                        for i in range(reader.num_record_batches):
                            rows = reader.get_batch(i).num_rows
                            if rows:
                                out.append(IpcBatchFragment(path, fs, i, rows))
        return out

    def stream(self, columns: Sequence[str] | None) -> Iterator[pa.RecordBatch]:
        fragments = self._file_fragments()
        if fragments is not None:
            for fragment in fragments:
                with source_error(f"reading {getattr(fragment, 'path', self.description)!r}"):
                    yield from fragment.read(columns, 0, fragment.num_rows)
            return
        for fs, path in self.files:
            with source_error(f"reading {path!r}"):
                reader = self._open_csv(fs, path)
                for batch in reader:
                    if columns is not None:
                        batch = batch.select(list(columns))
                    yield from (
                        batch.slice(i, STREAM_BATCH_ROWS)
                        for i in range(0, batch.num_rows, STREAM_BATCH_ROWS)
                    )
