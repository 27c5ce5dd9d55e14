"""Framework parameters checked once, on the driver, before any worker starts.

A misspelled parameter is ignored by both frameworks: xgboost says so on every
rank (``Parameters: { "max_detph" } are not used``), LightGBM only at a verbosity
neve turns down. Here each framework's own list decides what it knows, and one
:class:`~neve.exceptions.ParameterWarning` names the unknown ones with the
closest known name.

* xgboost: a Booster configured on two rows reports the names it does not use,
  and its saved configuration lists the names it does (for "did you mean"). The
  workers get the parameters without the unused names, which xgboost ignores
  anyway: its Python Booster forces ``validate_parameters=True``, so that is the
  only way to keep every rank from repeating the warning;
* LightGBM: every parameter and alias, as ``LGBM_DumpParamAliases`` lists them.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from neve._internal.suggest import close_match
from neve._internal.warn import warn_user
from neve.exceptions import ParameterWarning

logger = logging.getLogger(__name__)

_NOT_USED = re.compile(r'Parameters: \{\s*(.*?)\s*\} are not used', re.S)
XGBOOST_DOCS = "https://xgboost.readthedocs.io/en/stable/parameter.html"
LIGHTGBM_DOCS = "https://lightgbm.readthedocs.io/en/stable/Parameters.html"


def check_xgboost(params: Mapping[str, Any]) -> dict[str, Any]:
    """Warn once about parameters xgboost does not use; return what the workers get."""
    unused, known = _xgboost_unused(params)
    if unused:
        _warn("xgboost", unused, known, XGBOOST_DOCS)
    return {name: value for name, value in params.items() if name not in unused}


def _xgboost_unused(params: Mapping[str, Any]) -> tuple[list[str], set[str]]:
    import numpy as np
    import xgboost as xgb

    # The driver's own device and threads are beside the point (and a GPU it lacks warns).
    probe = {k: v for k, v in params.items() if k not in ("device", "nthread", "n_jobs")}
    probe.update(nthread=1, validate_parameters=True)
    rows = xgb.DMatrix(np.zeros((2, 1), dtype=np.float32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            config = json.loads(xgb.Booster(probe, [rows]).save_config())
        except Exception as exc:  # a bad value: the workers report it, as before
            logger.debug("xgboost parameters not checked on the driver: %s", exc)
            return [], set()
    unused: list[str] = []
    for warning in caught:
        match = _NOT_USED.search(str(warning.message))
        if match:
            unused += [n.strip().strip('"') for n in match.group(1).split(",") if n.strip()]
    known = _config_keys(config) - set(unused)
    return [n for n in params if n in unused], known


def _config_keys(config: Any) -> set[str]:
    """Every parameter name in xgboost's saved configuration (keys with plain values)."""
    keys: set[str] = set()
    if isinstance(config, dict):
        for key, value in config.items():
            if isinstance(value, (str, int, float)):
                keys.add(key)
            keys |= _config_keys(value)
    elif isinstance(config, list):
        for value in config:
            keys |= _config_keys(value)
    return keys


def check_lightgbm(params: Mapping[str, Any]) -> dict[str, Any]:
    """Warn once about parameters LightGBM does not know; return what the workers get."""
    known = _lightgbm_names()
    if known:
        unknown = [n for n in params if n not in known]
        if unknown:
            _warn("LightGBM", unknown, known, LIGHTGBM_DOCS)
    return dict(params)


def _lightgbm_names() -> set[str]:
    """Every LightGBM parameter and alias (empty when this LightGBM cannot list them)."""
    try:
        from lightgbm.basic import _ConfigAliases

        aliases = _ConfigAliases._get_all_param_aliases()
    except Exception as exc:  # an older or newer LightGBM: do not guess
        logger.debug("LightGBM parameters not checked on the driver: %s", exc)
        return set()
    return set(aliases) | {alias for names in aliases.values() for alias in names}


def _warn(framework: str, unknown: list[str], known: Iterable[str], docs: str) -> None:
    names = list(known)
    parts = []
    for name in unknown:
        match = close_match(name, names)
        parts.append(f"{name!r} (did you mean {match!r}?)" if match else repr(name))
    plural = "s" if len(unknown) != 1 else ""
    warn_user(
        f"{framework} does not know the parameter{plural} {', '.join(parts)} and ignores "
        f"{'them' if plural else 'it'}: fix the name{plural} in params (see {docs})",
        ParameterWarning,
    )
