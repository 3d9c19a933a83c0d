"""One way to declare a service's command-line flags with environment-variable fallbacks.

Each service keeps a frozen dataclass of its settings; its fields and defaults are declared once, as
argparse flags built here, so ``--draft-address`` falls back to ``SPECDEC_DRAFT_ADDRESS`` and then to the
default. Each service has its own prefix (``SPECDEC_DRAFT_``, ``SPECDEC_ORCHESTRATOR_``, ``SPECDEC_TARGET_``)
so one environment can configure several services on a host. Precedence: flag > environment > default.
A field whose type is itself such a dataclass (the target's model parameters inside its server config)
contributes its fields as flags of their own, without a prefix.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")

_BOOL_TRUE = {"1", "true", "yes", "on"}


def env_name(flag: str, prefix: str = "SPECDEC_") -> str:
    """``--draft-address`` -> ``SPECDEC_DRAFT_ADDRESS`` (with the default prefix)."""
    return prefix + flag.lstrip("-").replace("-", "_").upper()


def parse_config(
    cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None, env_prefix: str = "SPECDEC_"
) -> T:
    """Build the frozen dataclass ``cls`` from flags named after its fields (``max_sequences`` ->
    ``--max-sequences``), each falling back to ``<env_prefix>MAX_SEQUENCES``, then to the field's default.
    Field help comes from ``metadata={"help": ...}``.
    A bad value (the dataclass's own checks raise ValueError) is a usage error, as argparse's own are:
    the message and exit status 2, no traceback."""
    parser = build_parser(cls, prog=prog, env_prefix=env_prefix)
    namespace = parser.parse_args(argv)
    try:
        return from_namespace(cls, namespace)
    except ValueError as exc:
        parser.error(str(exc))


def build_parser(
    cls: type,
    prog: str | None = None,
    parser: argparse.ArgumentParser | None = None,
    env_prefix: str = "SPECDEC_",
) -> argparse.ArgumentParser:
    """Add one flag per field of ``cls`` (and of its nested dataclass fields) to ``parser`` (a new one if None)."""
    parser = parser or argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip().splitlines()[0])
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            build_parser(kind, parser=parser, env_prefix=env_prefix)
            continue
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        var = env_name(flag, env_prefix)
        env = os.environ.get(var)
        if env is not None:
            try:
                default = _convert(kind, env)
            except ValueError:
                parser.error(f"{var}={env!r} is not a valid {kind.__name__} (for {flag})")
        help_text = field.metadata.get("help", "")
        help_text = f"{help_text} [env {var}; default: %(default)s]"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=_converter(kind), default=default, help=help_text)
    return parser


def from_namespace(cls: type[T], namespace: argparse.Namespace) -> T:
    """The dataclass ``cls`` from parsed flags (nested dataclass fields built from their own flags)."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        values[field.name] = from_namespace(kind, namespace) if dataclasses.is_dataclass(kind) else getattr(namespace, field.name)
    return cls(**values)


def check_ports(config: object, *names: str) -> None:
    """ValueError unless each field ``names`` of ``config`` is a TCP port, or 0 (a free port, or off): grpc
    would otherwise bind 99999 as 99999 mod 65536, a port nobody asked for."""
    for name in names:
        if not 0 <= (port := getattr(config, name)) <= 65535:
            raise ValueError(f"{name} must be in [0, 65535], got {port}")


def _converter(kind: Any) -> Any:
    """``_convert`` for one type, named after it: argparse says "invalid int value: 'x'"."""

    def convert(text: str) -> Any:
        return _convert(kind, text)

    convert.__name__ = kind.__name__
    return convert


def _convert(kind: Any, text: str) -> Any:
    if kind is bool:
        return text.strip().lower() in _BOOL_TRUE
    if kind in (int, float, str):
        return kind(text)
    raise TypeError(f"unsupported config field type {kind!r}")
