"""Map errors of DuckDB, ADBC, pyarrow and fsspec to neve's tree, and check columns."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import pyarrow as pa

from neve._internal.suggest import close_match
from neve.exceptions import ColumnNotFoundError, NeveError, SourceError

# Exceptions raised by the libraries we read through, by module prefix.
_LIBRARY_MODULES = ("duckdb", "_duckdb", "adbc_driver", "pyarrow", "fsspec", "s3fs", "gcsfs")


def _from_library(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    return module.startswith(_LIBRARY_MODULES) or isinstance(
        exc, (OSError, pa.ArrowException)
    )


@contextlib.contextmanager
def source_error(what: str) -> Iterator[None]:
    """Re-raise a reading library's error as :class:`SourceError` naming ``what``."""
    try:
        yield
    except NeveError:
        raise
    except FileNotFoundError as exc:
        raise SourceError(f"{what}: no such file or folder: {exc.filename or exc}") from exc
    except Exception as exc:
        if not _from_library(exc):
            raise
        message = str(exc).strip() or type(exc).__name__
        raise SourceError(f"{what} failed: {message}") from exc


def check_columns(schema: pa.Schema, wanted: Iterable[str], what: str = "source") -> None:
    """Raise :class:`ColumnNotFoundError` naming missing columns, the closest names and all."""
    names = schema.names
    missing = [c for c in wanted if c not in names]
    if not missing:
        return
    guesses: dict[str, str] = {}
    cases = []
    for column in missing:
        match = close_match(column, names)
        if match is None:
            continue
        if match.lower() == column.lower():
            cases.append(f"{column!r} -> {match!r}")
        else:
            guesses[column] = match
    if len(missing) == 1 and guesses:
        hint = f"; did you mean {next(iter(guesses.values()))!r}?"
    elif guesses:
        hint = "; did you mean " + ", ".join(f"{m!r} for {c!r}" for c, m in guesses.items()) + "?"
    else:
        hint = "."
    case = f" (column names are case-sensitive: {', '.join(cases)})" if cases else ""
    plural = "s" if len(missing) > 1 else ""
    raise ColumnNotFoundError(
        f"column{plural} {', '.join(map(repr, missing))} not found in the {what}{hint} "
        f"It has {_listing(names)}{case}"
    )


def _listing(names: Sequence[str], limit: int = 30) -> str:
    shown = ", ".join(map(repr, names[:limit]))
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return f"{len(names)} column{'s' if len(names) != 1 else ''}: {shown}{more}"
