"""The checks every config section is parsed with: one rule set for ``router.config`` and
``router.governance.config``.

Each function takes the key of the value it checks (``models[0].workers``) and raises
``ConfigError(key, problem)`` naming it, e.g. ``config key 'models[0].workers[1]': not an
http(s) URL: 'ftp://x'``. A mapping's keys are joined with ``.`` (``join``); at the root
the key is the name alone.

The rules:

- an absent key and an explicit ``null`` both take the default;
- unknown keys are errors that list the valid ones (``only``);
- types are exact: ``true`` is not a number, ``1`` is a float where a float is asked for;
- numbers are checked only where the caller says so, key by key (``positive=True``,
  ``non_negative=True``); nothing is positive by default.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any
from urllib.parse import urlparse

from kvroute.router.errors import ConfigError
from kvroute.router.secrets import Local

Kind = type | tuple[type, ...]


def join(key: str, name: str | int) -> str:
    """The key of ``name`` inside ``key``: ``key.name``, ``key[3]`` for an index, or just
    ``name`` at the root (``key == ""``)."""
    if isinstance(name, int):
        return f"{key}[{name}]"
    return f"{key}.{name}" if key else name


def mapping(value: Any, key: str) -> Mapping[str, Any]:
    """A mapping section; ``None`` (absent or ``null``) reads as empty."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"expected a mapping, got {type(value).__name__}")
    return value


def only(raw: Mapping[str, Any], allowed: Collection[str], key: str) -> None:
    """Reject a key of ``raw`` not in ``allowed``, naming it and listing the valid ones."""
    for k in raw:
        if k not in allowed:
            raise ConfigError(join(key, str(k)), f"unknown key; valid keys: {', '.join(sorted(allowed))}")


def section(value: Any, allowed: Collection[str], key: str) -> Mapping[str, Any]:
    """``mapping`` and ``only`` at once: a section with a fixed set of keys."""
    raw = mapping(value, key)
    only(raw, allowed, key)
    return raw


def typed(value: Any, kind: Kind, key: str) -> Any:
    """``value`` if it is a ``kind`` (an int is widened to float where float is asked)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError(key, f"expected {_kind_name(kinds)}, got bool")
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kinds):
        raise ConfigError(key, f"expected {_kind_name(kinds)}, got {type(value).__name__}")
    return value


def get(raw: Mapping[str, Any], name: str, kind: Kind, key: str, default: Any = None, *,
        positive: bool = False, non_negative: bool = False, choices: Collection[Any] | None = None) -> Any:
    """``raw[name]`` checked to be a ``kind``, or ``default`` when absent or ``null``.

    ``positive`` / ``non_negative``: the number must be > 0 / >= 0 (checked only when given).
    ``choices``: the value, default included, must be one of these."""
    where = join(key, name)
    value = raw.get(name)
    if value is None:
        value = default
    else:
        value = typed(value, kind, where)
        if positive and value <= 0:
            raise ConfigError(where, f"must be positive, got {value}")
        if non_negative and value < 0:
            raise ConfigError(where, f"must not be negative, got {value}")
    if choices is not None and value not in choices:
        raise ConfigError(where, f"must be one of {', '.join(map(str, choices))}")
    return value


def required(raw: Mapping[str, Any], name: str, kind: Kind, key: str, why: str = "") -> Any:
    """``raw[name]``, a ``kind`` that must be given and not empty."""
    value = get(raw, name, kind, key)
    if value is None or value == "":
        raise ConfigError(join(key, name), f"required: {why}" if why else "required")
    return value


def items(value: Any, key: str, expected: str, *, non_empty: bool = False) -> list[Any]:
    """A list (``None`` reads as empty); ``expected`` says what, for the error."""
    if value is None:
        value = []
    if not isinstance(value, list) or (non_empty and not value):
        raise ConfigError(key, expected)
    return value


def str_list(value: Any, key: str) -> tuple[str, ...]:
    """A list of non-empty strings; ``None`` reads as empty."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(key, "expected a list of non-empty strings")
    return tuple(value)


def number_list(value: Any, key: str, expected: str,
                check: Callable[[tuple[float, ...]], bool] = lambda _: True) -> tuple[float, ...]:
    """A list of numbers (as floats) that passes ``check``; ``expected`` says what, for the error."""
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              for v in value):
        raise ConfigError(key, expected)
    numbers = tuple(float(v) for v in value)
    if not check(numbers):
        raise ConfigError(key, expected)
    return numbers


def secret_list(value: Any, key: str, local: Local) -> tuple[str, ...]:
    """API keys: strings or ``{env: NAME}`` / ``{file: PATH}`` references (``Local.secret``)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(key, "expected a list of keys (strings, {env: NAME} or {file: PATH})")
    return tuple(local.secret(v, join(key, i)) for i, v in enumerate(value))


def http_url(value: Any, key: str, *, secret: bool = False) -> str:
    """An ``http://`` or ``https://`` URL with a host. ``secret``: the error does not repeat it."""
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a URL string, got {type(value).__name__}")
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(key, "not an http(s) URL" if secret else f"not an http(s) URL: {value!r}")
    return value


def unique(names: list[Any], key: Callable[[int], str], what: str) -> None:
    """Reject the second occurrence of a name: ``key(i)`` names its place."""
    for i, n in enumerate(names):
        if n in names[:i]:
            raise ConfigError(key(i), f"duplicate {what} {n!r}")


def _kind_name(kinds: tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kinds)
