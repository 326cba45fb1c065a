"""One way from a ``params.yaml`` section to a frozen, validated config dataclass.

:func:`from_params` refuses what it does not know: a key that is no field of the config is a
one-line :class:`ConfigError`, unless the config class names it in ``READ_ELSEWHERE`` (a key of
its section that another consumer reads, such as ``masks.gallery_per_class``, which the masks
stage's gallery reads and no mask knob does). A field whose default is itself a config dataclass
(``data.synthetic``) is built from its sub-section the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from pipeline.errors import PipelineError, one_line

Config = TypeVar("Config")


class ConfigError(PipelineError, ValueError):
    """A params section that does not fit its config: unknown or missing keys, bad values."""


def as_tuple(value: Any) -> tuple[Any, ...]:
    """A YAML list as a tuple; one string (``-S key=value`` without brackets) as one item, not
    as its characters; nothing as ``()``."""
    if isinstance(value, str):
        return (value,)
    return tuple(value or ())


def from_params(cls: type[Config], section: Mapping[str, Any], name: str) -> Config:
    """``cls`` built from ``section``, the ``params.yaml`` section called ``name``."""
    if not isinstance(section, Mapping):
        raise ConfigError(f"params.yaml {name} must be a mapping of keys, not {section!r}")
    fields = {field.name: field for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    elsewhere = getattr(cls, "READ_ELSEWHERE", frozenset())
    if unknown := sorted(set(section) - set(fields) - elsewhere):
        raise ConfigError(f"params.yaml {name}: unknown key(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(fields))}")
    values = {}
    for key, value in section.items():
        if key not in fields:
            continue  # READ_ELSEWHERE: another consumer's key
        default = fields[key].default
        if dataclasses.is_dataclass(default):  # a nested config: its default is one
            value = from_params(type(default), value, f"{name}.{key}")
        values[key] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"params.yaml {name}: {one_line(error)}") from error
