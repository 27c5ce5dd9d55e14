"""Job files for ``neve train``: a TOML file read into a checked :class:`Job`, then run.

::

    [source]                 # exactly one of duckdb / parquet / adbc
    duckdb = "warehouse.duckdb"
    table = "TRAINING_DATA"  # or sql = "SELECT ..."
    [eval]                   # optional, the same keys as [source]
    [columns]
    input = ["age", "income"]
    label = "default_risk"   # weight, group: optional
    [model]
    framework = "xgboost"    # or "lightgbm", "pytorch"
    [scaling]                # optional
    [output]
    stage = "stage"          # optional: neve's default stage

Relative paths are relative to the job file's folder. Every mistake is a
:class:`JobError` that names the dotted key and the line where it is (or would
be) found; the CLI prints it and exits with status 2. ``training.run`` runs a
checked job.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from neve._internal.suggest import close_match
from neve.exceptions import ConfigError, NeveError

FRAMEWORKS = ("xgboost", "lightgbm", "pytorch")
SOURCE_KINDS = ("duckdb", "parquet", "adbc")
_SECTIONS = {
    "source": ("duckdb", "parquet", "adbc", "table", "sql"),
    "eval": ("duckdb", "parquet", "adbc", "table", "sql"),
    "columns": ("input", "label", "weight", "group"),
    "model": None,  # depends on the framework
    "scaling": None,
    "output": ("stage",),
}
_MODEL_KEYS = {
    "gbdt": ("framework", "objective", "n_estimators", "params", "early_stopping_rounds",
             "verbose_eval"),
    "pytorch": ("framework", "objective", "epochs", "batch_size", "lr", "hidden", "seed"),
}
_SCALING_KEYS = {
    "gbdt": ("num_workers", "num_cpu_per_worker", "use_gpu"),
    "pytorch": ("num_nodes", "num_workers_per_node", "num_cpus", "num_gpus"),
}
_REQUIRED = ("source", "columns", "model")


class JobError(ConfigError):
    """A job file is wrong: the message names the file, line and dotted key."""

    def __init__(self, message: str, *, path: str = "", key: str = "",
                 line: int | None = None) -> None:
        self.path, self.key, self.line, self.detail = path, key, line, message
        where = f"{path}:{line}" if line else path
        super().__init__(": ".join(p for p in (where, key, message) if p))


# -- where each key is written ----------------------------------------------------------

_HEADER = re.compile(r"^\s*\[\[?([^\[\]]+)\]\]?\s*(?:#.*)?$")
_KEY_PART = r'(?:[A-Za-z0-9_-]+|"[^"\n]*"|\'[^\'\n]*\')'
_KEY = re.compile(rf"^\s*({_KEY_PART}(?:\s*\.\s*{_KEY_PART})*)\s*=(.*)$")


def _split_key(text: str) -> list[str]:
    parts = re.findall(_KEY_PART, text)
    return [p[1:-1] if p[:1] in "\"'" else p for p in parts]


def _bracket_depth(value: str) -> int:
    """How many ``[``/``{`` a value line leaves open (string contents ignored)."""
    value = re.sub(r'"(?:\\.|[^"\\])*"|\'[^\']*\'', "", value).split("#", 1)[0]
    return value.count("[") + value.count("{") - value.count("]") - value.count("}")


def key_lines(text: str) -> dict[str, int]:
    """``{"dotted.key": line}`` for every table header and key assignment in a TOML text."""
    return _scan(text)[0]


def _scan(text: str) -> tuple[dict[str, int], dict[int, str]]:
    """Where each key first appears, and which key (or table) each line belongs to."""
    lines: dict[str, int] = {}
    owner: dict[int, str] = {}
    prefix: list[str] = []
    current = ""
    depth = 0
    in_string: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        owner[number] = current
        if in_string:  # inside a multi-line string
            if raw.count(in_string) % 2 == 1:
                in_string, current = None, ".".join(prefix)
            continue
        if depth > 0:  # inside a multi-line array or table value
            depth += _bracket_depth(raw)
            if depth <= 0:
                depth, current = 0, ".".join(prefix)
            continue
        header = _HEADER.match(raw)
        if header:
            prefix = _split_key(header.group(1))
            current = owner[number] = ".".join(prefix)
            lines.setdefault(current, number)
            continue
        match = _KEY.match(raw)
        if not match:
            continue
        key = ".".join([*prefix, *_split_key(match.group(1))])
        current = owner[number] = key
        lines.setdefault(key, number)
        value = match.group(2)
        for quote in ('"""', "'''"):
            if value.count(quote) % 2 == 1:
                in_string = quote
        if in_string is None:
            depth = max(_bracket_depth(value), 0)
            bare = re.sub(r'"(?:\\.|[^"\\])*"|\'[^\']*\'', '""', value)
            for inner in re.finditer(r"([A-Za-z0-9_-]+)\s*=", bare):
                lines.setdefault(f"{key}.{inner.group(1)}", number)
        if in_string is None and depth == 0:
            current = ".".join(prefix)
    return lines, owner


# -- the checked job -----------------------------------------------------------------------


@dataclass(frozen=True)
class SourceSpec:
    """Where rows come from: a DuckDB file, Parquet files, or an ADBC database."""

    key: str  # "source" or "eval"
    kind: str
    target: str | tuple[str, ...]
    table: str | None = None
    sql: str | None = None

    def query(self) -> str:
        if self.sql is not None:
            return self.sql
        assert self.table is not None
        return "SELECT * FROM " + ".".join(
            '"' + part.replace('"', '""') + '"' for part in self.table.split(".")
        )

    def describe(self) -> str:
        what = f"table {self.table}" if self.table else "query"
        if self.kind == "duckdb":
            return f"DuckDB {what} in {self.target}"
        if self.kind == "adbc":
            return f"{str(self.target).split('://', 1)[0]} {what}"
        files = self.target if isinstance(self.target, tuple) else (self.target,)
        more = ", ..." if len(files) > 1 else ""
        return f"{len(files)} Parquet path{'s' if len(files) != 1 else ''} ({files[0]}{more})"


@dataclass(frozen=True)
class Job:
    """A checked job file."""

    path: str
    framework: str
    source: SourceSpec
    eval: SourceSpec | None
    input_cols: tuple[str, ...]
    label_col: str
    weight_col: str | None
    group_col: str | None
    model: Mapping[str, Any]
    scaling: Mapping[str, Any]
    stage: str | None
    lines: Mapping[str, int] = field(default_factory=dict, repr=False)

    def error(self, key: str, message: str) -> JobError:
        return JobError(message, path=self.path, key=key, line=_line_of(self.lines, key))

    @property
    def is_gbdt(self) -> bool:
        return self.framework != "pytorch"


def _line_of(lines: Mapping[str, int], key: str) -> int | None:
    parts = key.split(".")
    while parts:
        found = lines.get(".".join(parts))
        if found:
            return found
        parts.pop()
    return None


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


class _Reader:
    """Checks values of the parsed TOML, raising JobError with the key's line."""

    def __init__(self, path: str, text: str, data: dict[str, Any],
                 overridden: Sequence[str] = ()) -> None:
        self.path, self.data = path, data
        self.lines = key_lines(text)
        self.overridden = set(overridden)
        self.base = os.path.dirname(os.path.abspath(path))

    def error(self, key: str, message: str) -> JobError:
        if key in self.overridden:
            return JobError(message, path=f"{self.path} (--set)", key=key)
        return JobError(message, path=self.path, key=key, line=_line_of(self.lines, key))

    def where(self, key: str) -> str:
        """``line N`` (or ``--set``) for messages that point at a second key."""
        if key in self.overridden:
            return "--set"
        line = _line_of(self.lines, key)
        return f"line {line}" if line else "?"

    def section(self, name: str, allowed: Sequence[str] | None) -> dict[str, Any]:
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            raise self.error(name, f"must be a table ([{name}]), got {_kind(value)}")
        if allowed is not None:
            self.no_unknown(name, value, allowed)
        return value

    def no_unknown(self, name: str, table: Mapping[str, Any], allowed: Sequence[str],
                   note: str = "") -> None:
        for key in table:
            if key not in allowed:
                close = close_match(key, allowed)
                hint = f"did you mean {close!r}? " if close else ""
                raise self.error(f"{name}.{key}", f"unknown key{note}; {hint}"
                                 f"[{name}] takes {', '.join(allowed)}")

    def get(self, table: Mapping[str, Any], section: str, key: str, kind: type | tuple[type, ...],
            what: str, *, required: bool = False, default: Any = None,
            check: Callable[[Any], bool] | None = None) -> Any:
        dotted = f"{section}.{key}"
        if key not in table:
            if required:
                raise self.error(section, f"missing key {dotted} ({what})")
            return default
        value = table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        wrong_type = not isinstance(value, kinds) or (
            isinstance(value, bool) and bool not in kinds
        )
        if wrong_type or (check is not None and not check(value)):
            raise self.error(dotted, f"must be {what}, got {value!r} ({_kind(value)})")
        return value

    def resolve_path(self, path: str, key: str) -> str:
        """Relative to the job file's folder (to the current one for ``--set`` values)."""
        if "://" in path:
            return path
        base = os.getcwd() if key in self.overridden else self.base
        return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def _toml() -> Any:
    """``tomllib`` (Python 3.11+), else ``tomli``, the same parser for 3.10."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise ImportError("neve train on Python 3.10 needs tomli: pip install tomli") from None
    return tomllib


def _set_override(data: dict[str, Any], assignment: str) -> str:
    """Apply ``dotted.key=value`` (a TOML value, or else a plain string); return the key."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise JobError(f"--set takes dotted.key=value, got {assignment!r}")
    toml = _toml()
    try:
        value = toml.loads(f"v = {raw.strip()}")["v"]
    except toml.TOMLDecodeError:
        value = raw.strip()
    table = data
    *parents, last = key.split(".")
    for part in parents:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise JobError(f"--set {key}: {part!r} is not a table")
    table[last] = value
    return key


def load(path: str, overrides: Sequence[str] = ()) -> Job:
    """Read and check a job file (``overrides``: ``dotted.key=value`` strings)."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise JobError(f"cannot read the job file: {exc.strerror or exc}", path=path) from None
    text = raw.decode("utf-8", errors="replace")
    toml = _toml()
    try:
        data = toml.loads(text)
    except toml.TOMLDecodeError as exc:
        message = str(exc)
        where = re.search(r"\(at line (\d+), column (\d+)\)", message)
        line = int(where.group(1)) if where else None
        detail = re.sub(r"\s*\(at line \d+, column \d+\)", "", message)
        column = f" (column {where.group(2)})" if where else ""
        key = _key_at(text, line) if line else ""
        raise JobError(f"TOML syntax error: {detail}{column}", path=path, key=key,
                       line=line) from None
    overridden = [_set_override(data, item) for item in overrides]
    return _check(_Reader(path, text, data, overridden))


def _key_at(text: str, line: int) -> str:
    """The dotted key (or table) that a line of a TOML text belongs to, for messages."""
    return _scan(text)[1].get(line, "")


def _check(r: _Reader) -> Job:
    for name in r.data:
        if name not in _SECTIONS:
            close = close_match(name, _SECTIONS)
            hint = f"did you mean [{close}]? " if close else ""
            raise r.error(name, f"unknown section; {hint}a job file has "
                          + ", ".join(f"[{s}]" for s in _SECTIONS))
    for name in _REQUIRED:
        if name not in r.data:
            raise r.error(name, f"missing section [{name}]{_SECTION_HINT[name]}")

    model = r.section("model", None)
    framework = r.get(model, "model", "framework", str, "one of " + ", ".join(
        f'"{f}"' for f in FRAMEWORKS), required=True, check=lambda v: v in FRAMEWORKS)
    family = "pytorch" if framework == "pytorch" else "gbdt"
    r.no_unknown("model", model, _MODEL_KEYS[family], f" for framework {framework!r}")

    source = _source(r, "source")
    evaluation = _source(r, "eval") if "eval" in r.data else None

    columns = r.section("columns", _SECTIONS["columns"])
    names = r.get(columns, "columns", "input", (list, str),
                  "a non-empty array of column names", required=True,
                  check=lambda v: bool(v) and all(isinstance(c, str) and c for c in
                                                  ([v] if isinstance(v, str) else v)))
    inputs = (names,) if isinstance(names, str) else tuple(names)
    label = r.get(columns, "columns", "label", str, "a column name", required=True,
                  check=bool)
    weight = r.get(columns, "columns", "weight", str, "a column name", check=bool)
    group = r.get(columns, "columns", "group", str, "a column name", check=bool)
    if label in inputs:
        raise r.error("columns.input", f"lists the label column {label!r}; remove it")
    if framework == "pytorch":
        for key, value in (("weight", weight), ("group", group)):
            if value is not None:
                raise r.error(f"columns.{key}", "the built-in pytorch model takes no "
                              f"{key} column; remove it, or use xgboost or lightgbm")

    settings = _model_settings(r, model, framework, evaluation is not None)
    scaling = _scaling(r, family)
    output = r.section("output", _SECTIONS["output"])
    stage = r.get(output, "output", "stage", str, "a path, URL or DB.SCHEMA.STAGE", check=bool)
    if stage is not None and "://" not in stage and not _is_dotted(stage):
        stage = r.resolve_path(stage, "output.stage")
    return Job(path=r.path, framework=framework, source=source, eval=evaluation,
               input_cols=inputs, label_col=label, weight_col=weight, group_col=group,
               model=settings, scaling=scaling, stage=stage, lines=dict(r.lines))


_SECTION_HINT = {
    "source": ': where the rows come from, e.g. duckdb = "warehouse.duckdb" and '
              'table = "TRAINING_DATA"',
    "columns": ': input = ["col", ...] and label = "col"',
    "model": ': framework = "xgboost", "lightgbm" or "pytorch"',
}


def _is_dotted(stage: str) -> bool:
    from neve._internal.stages import _DOTTED

    return bool(_DOTTED.match(stage)) and not os.path.exists(stage)


def _source(r: _Reader, name: str) -> SourceSpec:
    table = r.section(name, _SECTIONS[name])
    given = [k for k in SOURCE_KINDS if k in table]
    if len(given) != 1:
        if not given:
            raise r.error(name, f"[{name}] needs one of {name}.duckdb (a DuckDB file), "
                          f"{name}.parquet (files) or {name}.adbc (a database URI)")
        lines = ", ".join(f"{name}.{k} ({r.where(f'{name}.{k}')})" for k in given)
        raise r.error(f"{name}.{given[1]}", f"give only one of {name}.duckdb, {name}.parquet, "
                      f"{name}.adbc; found {lines}")
    kind = given[0]
    sql = r.get(table, name, "sql", str, "a SQL query", check=lambda v: bool(v.strip()))
    relation = r.get(table, name, "table", str, "a table name", check=lambda v: bool(v.strip()))
    if kind == "parquet":
        for key in ("table", "sql"):
            if key in table:
                raise r.error(f"{name}.{key}", f"only for duckdb or adbc sources; {name}.parquet "
                              "reads whole files (use duckdb with sql = \"SELECT ... FROM "
                              "'files/*.parquet'\" to filter)")
        value = r.get(table, name, "parquet", (str, list), "a path, glob, or array of them",
                      check=lambda v: bool(v) and all(isinstance(p, str) and p for p in
                                                      ([v] if isinstance(v, str) else v)))
        return SourceSpec(name, kind, _parquet_paths(r, f"{name}.parquet", value))
    if (sql is None) == (relation is None):
        if sql is None:
            raise r.error(name, f"{name}.{kind} needs {name}.table (a table name) or "
                          f"{name}.sql (a query); neither is given")
        raise r.error(f"{name}.sql", f"give {name}.table or {name}.sql, not both "
                      f"({name}.table: {r.where(f'{name}.table')})")
    if kind == "duckdb":
        path = r.get(table, name, "duckdb", str, "the path of a DuckDB database file", check=bool)
        resolved = r.resolve_path(path, f"{name}.duckdb")
        if not os.path.exists(resolved):
            raise r.error(f"{name}.duckdb", f"no such DuckDB database file: {resolved}"
                          + (" (run `neve demo` to create the demo's warehouse)"
                             if os.path.basename(resolved) == "warehouse.duckdb" else ""))
        return SourceSpec(name, kind, resolved, relation, sql)
    from neve._internal.data.sql import ADBC_SCHEMES

    schemes = ", ".join(f"{k}://" for k in sorted(ADBC_SCHEMES))
    uri = r.get(table, name, "adbc", str, f"a database URI ({schemes}...)",
                check=lambda v: v.split("://", 1)[0].lower() in ADBC_SCHEMES and "://" in v)
    scheme, _, rest = uri.partition("://")
    if scheme.lower() == "sqlite" and rest and rest != ":memory:" and not os.path.isabs(rest):
        uri = f"{scheme}://{r.resolve_path(rest, f'{name}.adbc')}"
    return SourceSpec(name, kind, uri, relation, sql)


def _parquet_paths(r: _Reader, key: str, value: str | list[str]) -> tuple[str, ...]:
    out: list[str] = []
    for item in [value] if isinstance(value, str) else value:
        path = r.resolve_path(item, key)
        if "://" in path:
            out.append(path)
        elif glob.has_magic(path):
            found = sorted(glob.glob(path, recursive=True))
            if not found:
                raise r.error(key, f"{item!r} matches no files (looked for {path})")
            out.extend(found)
        elif not os.path.exists(path):
            raise r.error(key, f"no such file or folder: {path}")
        else:
            out.append(path)
    return tuple(out)


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _model_settings(r: _Reader, model: dict[str, Any], framework: str,
                    has_eval: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if framework == "pytorch":
        from neve._internal.mlp import OBJECTIVES, check_hidden

        out["objective"] = r.get(model, "model", "objective", str,
                                 'for pytorch "regression" or "binary"', default="regression",
                                 check=lambda v: v in OBJECTIVES)
        out["epochs"] = r.get(model, "model", "epochs", int, "an integer >= 1", default=2,
                              check=_positive_int)
        out["batch_size"] = r.get(model, "model", "batch_size", int, "an integer >= 1",
                                  default=1024, check=_positive_int)
        out["lr"] = float(r.get(model, "model", "lr", (float, int), "a number > 0",
                                default=1e-3, check=lambda v: v > 0))
        hidden = r.get(model, "model", "hidden", (int, list),
                       "a layer width or an array of them (e.g. [64, 32])", default=[64, 32],
                       check=lambda v: check_hidden(v) is not None)
        out["hidden"] = check_hidden(hidden)
        out["seed"] = r.get(model, "model", "seed", int, "an integer", default=0)
        return out
    out["objective"] = r.get(model, "model", "objective", str, "an objective name",
                             check=bool)
    out["n_estimators"] = r.get(model, "model", "n_estimators", int, "an integer >= 1",
                                default=100, check=_positive_int)
    out["params"] = dict(r.get(model, "model", "params", dict, "a table of parameters",
                               default={}))
    stop = r.get(model, "model", "early_stopping_rounds", int, "an integer >= 1",
                 check=_positive_int)
    if stop is not None and not has_eval:
        raise r.error("model.early_stopping_rounds", "needs an [eval] section to watch")
    out["early_stopping_rounds"] = stop
    out["verbose_eval"] = r.get(model, "model", "verbose_eval", (int, bool),
                                "true, false, or a number of rounds >= 1",
                                check=lambda v: isinstance(v, bool) or v >= 1)
    return out


def _scaling(r: _Reader, family: str) -> dict[str, Any]:
    table = r.section("scaling", None)
    r.no_unknown("scaling", table, _SCALING_KEYS[family],
                 " for " + ("pytorch" if family == "pytorch" else "xgboost and lightgbm"))
    out: dict[str, Any] = {}
    if family == "gbdt":
        for key in ("num_workers", "num_cpu_per_worker"):
            value = r.get(table, "scaling", key, int, "-1 (what the cluster has) or >= 1",
                          check=lambda v: v == -1 or v >= 1)
            if value is not None:
                out[key] = value
        use_gpu = r.get(table, "scaling", "use_gpu", bool, "true or false")
        if use_gpu is not None:
            out["use_gpu"] = use_gpu
        return out
    for key in ("num_nodes", "num_workers_per_node"):
        value = r.get(table, "scaling", key, int, "an integer >= 1", check=_positive_int)
        if value is not None:
            out[key] = value
    for key in ("num_cpus", "num_gpus"):
        value = r.get(table, "scaling", key, (int, float), "a number >= 0",
                      check=lambda v: v >= 0)
        if value is not None:
            out[key] = value
    return out


# -- checking a job against its data ----------------------------------------------------


def connector(job: Job, spec: SourceSpec, cls: Any = None, **kwargs: Any) -> Any:
    """A (Sharded)DataConnector over a job's source, its schema read (errors name the key)."""
    from neve.data import DataConnector

    cls = cls or DataConnector
    key = f"{spec.key}.{spec.kind}"
    try:
        if spec.kind == "parquet":
            dc = cls.from_sources(list(spec.target), format="parquet", **kwargs)
        else:
            key = f"{spec.key}.sql" if spec.sql is not None else f"{spec.key}.table"
            dc = cls.from_sql(spec.query(), session=spec.target, **kwargs)
        dc.schema  # noqa: B018 - read now, so a bad table or query fails here
    except ImportError as exc:
        raise job.error(f"{spec.key}.{spec.kind}", str(exc)) from None
    except NeveError as exc:
        message = str(exc)
        if spec.kind == "adbc" and "connecting to" in message:
            key = f"{spec.key}.adbc"
        raise job.error(key, message) from exc
    return dc


def check_columns(job: Job, dc: Any, spec: SourceSpec) -> None:
    """Every named column exists in the source, with a type the framework can use."""
    from neve._internal.data.convert import is_categorical, is_numeric

    schema = dc.schema
    named = [("columns.input", c) for c in job.input_cols] + [
        (f"columns.{k}", c) for k, c in (("label", job.label_col), ("weight", job.weight_col),
                                         ("group", job.group_col)) if c
    ]
    for key, column in named:
        if column not in schema.names:
            close = close_match(column, schema.names)
            hint = f"; did you mean {close!r}?" if close else ""
            raise job.error(key, f"column {column!r} is not in the {spec.key} data "
                            f"({spec.describe()}){hint} It has: {', '.join(schema.names)}")
        dtype = schema.field(column).type
        if is_numeric(dtype):
            continue
        if key == "columns.input" and is_categorical(dtype) and job.is_gbdt:
            continue
        needs = ("numbers (the built-in pytorch model: one-hot encode strings in SQL)"
                 if key == "columns.input" and not job.is_gbdt else "numbers")
        raise job.error(key, f"column {column!r} has type {dtype}; it must hold {needs}")
