"""Small Ray tasks that planning runs on the cluster (counting rows, finding categories),
and the bounded wait for them."""

from __future__ import annotations

from typing import Any

from neve._internal import settings
from neve.exceptions import SourceError


class LazyRemote:
    """``ray.remote`` applied on first use, so importing neve does not import Ray."""

    def __init__(self, fn: Any, **options: Any) -> None:
        self._fn = fn
        self._options = options or {"num_cpus": 0}
        self._remote: Any = None

    def remote(self, *args: Any) -> Any:
        if self._remote is None:
            import ray

            self._remote = ray.remote(**self._options)(self._fn)
        return self._remote.remote(*args)


def gather(refs: list[Any], what: str, causes: str) -> list[Any]:
    """The results of planning tasks, waited for at most ``NEVE_PLAN_TIMEOUT_S``."""
    import ray

    timeout = settings.PLAN_TIMEOUT_S.get()
    try:
        return list(ray.get(refs, timeout=timeout))
    except ray.exceptions.GetTimeoutError:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise SourceError(
            f"{what} took longer than {timeout:g} s (NEVE_PLAN_TIMEOUT_S={timeout:g}); "
            f"likely causes: {causes}"
        ) from None
