"""Public methods that refuse keywords they do not take, and say which they do.

Python's own ``TypeError: f() got an unexpected keyword argument 'x'`` names
neither the keywords the function takes nor the one the user probably meant.
:func:`checked_keywords` wraps a class's public methods (and ``__init__``) so
that such a call raises :class:`~neve.exceptions.UnknownArgumentError` with both.
The wrapper costs nothing on a good call: it only looks at a ``TypeError``
raised by the call itself (no frame of the method ran).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from neve._internal.suggest import close_match
from neve.exceptions import UnknownArgumentError

_T = TypeVar("_T", bound=type)


def checked_keywords(
    hints: Mapping[str, str] | None = None,
) -> Callable[[_T], _T]:
    """Class decorator: unknown keywords to public methods raise UnknownArgumentError.

    ``hints`` maps a keyword that belongs elsewhere to where it belongs
    (``{"equal": "ShardedDataConnector takes equal=..."}``).
    """

    def decorate(cls: _T) -> _T:
        for name, attr in list(vars(cls).items()):
            if name.startswith("_") and name != "__init__":
                continue
            if isinstance(attr, classmethod):
                setattr(cls, name, classmethod(_wrap(attr.__func__, cls, hints or {})))
            elif isinstance(attr, staticmethod):
                setattr(cls, name, staticmethod(_wrap(attr.__func__, cls, hints or {})))
            elif inspect.isfunction(attr):
                setattr(cls, name, _wrap(attr, cls, hints or {}))
        return cls

    return decorate


def _wrap(fn: Callable[..., Any], owner: type, hints: Mapping[str, str]) -> Callable[..., Any]:
    if getattr(fn, "__neve_checked__", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TypeError as exc:
            # Raised by the call itself (before the method's first line), not inside it.
            if kwargs and exc.__traceback__ is not None and exc.__traceback__.tb_next is None:
                error = unknown_keyword_error(fn, _caller_class(args, owner), kwargs, hints)
                if error is not None:
                    raise error from None
            raise

    wrapper.__neve_checked__ = True  # type: ignore[attr-defined]
    return wrapper


def _caller_class(args: tuple[Any, ...], owner: type) -> type:
    """The class the method was called on (a subclass, say), for the message."""
    if args:
        first = args[0]
        if isinstance(first, type) and issubclass(first, owner):
            return first
        if isinstance(first, owner):
            return type(first)
    return owner


def unknown_keyword_error(
    fn: Callable[..., Any], owner: type, kwargs: Mapping[str, Any],
    hints: Mapping[str, str] | None = None,
) -> UnknownArgumentError | None:
    """The error for the first keyword ``fn`` does not take, or ``None`` if it takes them all."""
    signature = inspect.signature(fn)
    params = signature.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    accepted = [n for n, p in params.items()
                if n not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY)]
    unknown = [k for k in kwargs if k not in accepted]
    if not unknown:
        return None
    word = unknown[0]
    name = fn.__name__
    where = f"{owner.__name__}()" if name == "__init__" else f"{owner.__name__}.{name}()"
    match = close_match(word, accepted)
    advice = (hints or {}).get(word)
    if advice is None and match is not None:
        advice = f"did you mean {match!r}?"
    takes = ", ".join(accepted) if accepted else "no keyword arguments"
    more = f" (and {', '.join(map(repr, unknown[1:]))})" if len(unknown) > 1 else ""
    message = f"{where} got an unknown keyword argument {word!r}{more}"
    if advice:
        message += f"; {advice}"
    if not message.endswith(("?", ".")):
        message += "."
    return UnknownArgumentError(f"{message} It takes: {takes}")
