"""One way from a ``params.yaml`` section to a frozen, validated config dataclass.

:func:`from_params` refuses what it does not know: a key that is no field of the config is a
one-line :class:`ConfigError`, unless the config class names it in ``READ_ELSEWHERE`` (a key of
its section that another consumer reads, such as ``masks.gallery_per_class``, which the masks
stage's gallery reads and no mask knob does). A field whose type is itself a config dataclass
(``data.synthetic``) is built from its sub-section the same way.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from pipeline.errors import PipelineError, one_line

Config = TypeVar("Config")


class ConfigError(PipelineError, ValueError):
    """A params section that does not fit its config: unknown or missing keys, bad values."""


def from_params(cls: type[Config], section: Mapping[str, Any], name: str) -> Config:
    """``cls`` built from ``section``, the ``params.yaml`` section called ``name``."""
    if not isinstance(section, Mapping):
        raise ConfigError(f"params.yaml {name} must be a mapping of keys, not {section!r}")
    fields = {field.name for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    elsewhere = getattr(cls, "READ_ELSEWHERE", frozenset())
    if unknown := sorted(set(section) - fields - elsewhere):
        raise ConfigError(f"params.yaml {name}: unknown key(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(fields))}")
    types = typing.get_type_hints(cls)
    values = {}
    for key, value in section.items():
        if key not in fields:
            continue  # READ_ELSEWHERE: another consumer's key
        nested = types[key]
        is_config = isinstance(nested, type) and dataclasses.is_dataclass(nested)
        values[key] = from_params(nested, value, f"{name}.{key}") if is_config else value
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"params.yaml {name}: {one_line(error)}") from error
