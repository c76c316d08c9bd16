"""`expand_bundles`: a command's bundle parameters shown to typer as the bundles' fields.

A bundle is a frozen dataclass of options (`options.py`). Typer reads a command's signature
to build its options; this decorator gives it one where each bundle parameter is replaced by
the bundle's fields (nested bundles too), and calls the command with the bundles built from
the values typer parsed. mypy sees the command as written, with its typed bundles.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any, get_type_hints


def expand_bundles(command: Callable[..., None]) -> Callable[..., None]:
    """`command` as typer should see it: each bundle parameter replaced by its fields.

    The command is called with the bundles built from those fields. Bundles nest (a field
    typed with a bundle is expanded too); every option ends up keyword-only, in the order
    of the signature and then of the fields, which is the order `--help` shows.
    """
    hints = get_type_hints(command, include_extras=True)
    params: list[inspect.Parameter] = []
    for p in inspect.signature(command).parameters.values():
        if _is_bundle(hints[p.name]):
            params += _fields_as_params(hints[p.name])
        else:
            params.append(p.replace(annotation=hints[p.name], kind=p.KEYWORD_ONLY))
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise TypeError(f"{command.__name__}: an option is in two bundles: {names}")

    @functools.wraps(command)
    def called(**values: Any) -> None:
        for name, hint in hints.items():
            if name != "return" and _is_bundle(hint):
                values[name] = _build(hint, values)
        return command(**values)

    called.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    called.__annotations__ = {p.name: p.annotation for p in params}
    return called


def _is_bundle(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


@functools.cache
def _hints(bundle: type) -> dict[str, Any]:
    """The bundle's field types, aliases resolved (once: `soup --help` builds every command)."""
    return get_type_hints(bundle, include_extras=True)


def _fields_as_params(bundle: type) -> list[inspect.Parameter]:
    hints = _hints(bundle)
    params = []
    for f in dataclasses.fields(bundle):
        if _is_bundle(hints[f.name]):
            params += _fields_as_params(hints[f.name])
            continue
        default = f.default if f.default is not dataclasses.MISSING else inspect.Parameter.empty
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                        default=default, annotation=hints[f.name]))  # fmt: skip
    return params


def _build(bundle: type, values: dict[str, Any]) -> object:
    """The bundle from the options' values (taken out of `values`)."""
    hints = _hints(bundle)
    kwargs = {}
    for f in dataclasses.fields(bundle):
        is_nested = _is_bundle(hints[f.name])
        kwargs[f.name] = _build(hints[f.name], values) if is_nested else values.pop(f.name)
    return bundle(**kwargs)
