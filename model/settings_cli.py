"""Command-line flags from typed settings, defined once: in the pydantic-settings class.

Every field of a settings class becomes a flag: its name (``--max-batch-size``, or ``--max_batch_size`` on
the KServe entry points, whose own flags are spelled that way), its type, its choices (``Literal``/``Enum``),
its help (the field's ``description``, the default and the environment variable) and, for a bool,
``--flag/--no-flag``. Read back, the flags given win over ``PNEUMOSCOPE_*`` environment variables, which
win over the defaults. A child process gets its settings as environment variables
(:func:`settings_environment`), never as flags. So adding a setting is one line: the field.

Where a field needs more than its name says, a :class:`Cli` marker in its annotation holds it: older
spellings that must keep working (``--drain-seconds``), or no flag at all (a secret would show in ``ps``).

Hand-written, not pydantic-settings' ``CliSettingsSource``: that one turns validation aliases into flags
(``--MLFLOW-TRACKING-URI``), keeps no older spelling without adding an environment variable of that name,
and collides with the flags KServe's ModelServer already put on the same parser.
"""

from __future__ import annotations

import argparse
import enum
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import AliasChoices, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings


@dataclass(frozen=True)
class Cli:
    """``Annotated`` marker of a settings field: how it appears on the command line beyond its name."""

    #: Older flag names that keep working, written like field names (``"drain_seconds"``).
    aliases: tuple[str, ...] = ()
    #: No flag: set by environment only (secrets, which a flag would show in ``ps``; test-only knobs).
    env_only: bool = False


class SettingsError(ValueError):
    """A setting's value is invalid: one line naming the setting, its flag and its environment variable."""


def _marker(info: FieldInfo) -> Cli:
    return next((m for m in info.metadata if isinstance(m, Cli)), Cli())


def _flag(name: str, style: str) -> str:
    return "--" + (name.replace("_", "-") if style == "-" else name)


def _aliases(settings_cls: type[BaseSettings], name: str) -> list[str]:
    alias = settings_cls.model_fields[name].validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice) for choice in alias.choices]
    return [alias] if isinstance(alias, str) else []


def env_names(settings_cls: type[BaseSettings], name: str) -> list[str]:
    """The environment variables a field is read from, first the one that wins."""
    aliases = _aliases(settings_cls, name)
    return [a.upper() for a in aliases] or [(settings_cls.model_config.get("env_prefix", "") + name).upper()]


#: argparse type and metavar of each plain field type (pydantic converts str to Path).
_SCALARS = {int: (int, "N"), float: (float, "NUM"), str: (str, "TEXT"), Path: (str, "PATH"), bool: (bool, None)}


def _scalar(annotation) -> tuple[type, list | None, str | None]:
    """(argparse type, choices, metavar) of a field's annotation; ``X | None`` counts as X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        values = list(typing.get_args(annotation))
        return type(values[0]), values, None
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        values = [member.value for member in annotation]
        return type(values[0]), values, None
    if annotation in _SCALARS:
        kind, metavar = _SCALARS[annotation]
        return kind, None, metavar
    raise TypeError(f"no command-line flag for a setting of type {annotation!r}")


def _help(settings_cls: type[BaseSettings], name: str, info: FieldInfo) -> str:
    if not info.description:
        raise TypeError(f"{settings_cls.__name__}.{name} has no description: it is the flag's help")
    default = info.get_default(call_default_factory=True)
    if isinstance(default, enum.Enum):
        default = default.value
    shown = "" if default is None else f"default: {str(default).lower() if isinstance(default, bool) else default}; "
    return f"{info.description} ({shown}env {env_names(settings_cls, name)[0]})".replace("%", "%%")


def add_settings_flags(parser: argparse.ArgumentParser, settings_cls: type[BaseSettings], *, style: str = "-",
                       only: Iterable[str] | None = None, exclude: Iterable[str] = (),
                       adopt: bool = False) -> set[str]:
    """Add one flag per field of ``settings_cls`` to ``parser`` (``style`` "-": ``--max-batch-size``; "_":
    ``--max_batch_size``). Flags not given leave no attribute behind, so that :func:`settings_from_args` can
    tell them from defaults. With ``adopt``, a field whose flag the parser already has (KServe's
    ``--model_name``) keeps that flag; returns the names of the fields so adopted."""
    if style not in ("-", "_"):
        raise ValueError(f"style must be '-' or '_', not {style!r}")
    wanted = set(settings_cls.model_fields if only is None else only) - set(exclude)
    unknown = wanted - set(settings_cls.model_fields)
    if unknown:
        raise ValueError(f"{settings_cls.__name__} has no field {', '.join(sorted(unknown))}")
    adopted = set()
    for name, info in settings_cls.model_fields.items():
        marker = _marker(info)
        if name not in wanted or marker.env_only:
            continue
        kind, choices, metavar = _scalar(info.annotation)
        flags = [_flag(n, style) for n in (name, *marker.aliases)]
        options = dict(dest=name, default=argparse.SUPPRESS, help=_help(settings_cls, name, info))
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options.update(type=kind, choices=choices, metavar=metavar)
        try:
            parser.add_argument(*flags, **options)
        except argparse.ArgumentError as exc:
            if not adopt or flags[0] not in str(exc):  # adopt the field's own flag, never a clash of an alias
                raise
            adopted.add(name)
    return adopted


def _invalid(settings_cls: type[BaseSettings], exc: ValidationError, style: str = "-") -> SettingsError:
    first = exc.errors()[0]
    name = str(first["loc"][0]) if first["loc"] else ""
    if name not in settings_cls.model_fields:  # reported under an environment variable's alias
        name = next((n for n in settings_cls.model_fields if name.upper() in env_names(settings_cls, n)), name)
    where = f" ({_flag(name, style)} or {env_names(settings_cls, name)[0]})" if name in settings_cls.model_fields \
        else ""
    return SettingsError(f"invalid setting {name}{where}: {first['msg']}")


def settings_from_args(settings_cls: type[BaseSettings], args: argparse.Namespace, style: str = "-", **fixed):
    """The settings: ``fixed`` over the flags given in ``args`` over the environment over the defaults.
    An invalid value, wherever it came from, is one :class:`SettingsError` line."""
    values = {name: getattr(args, name) for name in settings_cls.model_fields if hasattr(args, name)} | fixed
    # A field with a validation alias takes its value under the alias (its name alone would be ignored).
    try:
        return settings_cls(**{(_aliases(settings_cls, name) or [name])[0]: value for name, value in values.items()})
    except ValidationError as exc:
        raise _invalid(settings_cls, exc, style) from None


def parse_settings(parser: argparse.ArgumentParser, settings_cls: type[BaseSettings],
                   argv: list[str] | None = None, style: str = "_"):
    """For an entry point of its own (the KServe predictor and transformer): add the flags, parse ``argv``
    and return ``(args, settings)``. Flags the parser already had (KServe's ``--model_name``,
    ``--predictor_protocol``) are adopted: their default becomes the environment's value, and what they hold
    is the setting. A bad value ends the program with one usage line."""
    adopted = add_settings_flags(parser, settings_cls, style=style, adopt=True)
    try:
        environment = settings_cls()
    except ValidationError as exc:
        parser.error(str(_invalid(settings_cls, exc, style)))
    parser.set_defaults(**{name: getattr(environment, name) for name in adopted})
    args = parser.parse_args(argv)
    try:
        return args, settings_from_args(settings_cls, args, style)
    except SettingsError as exc:
        parser.error(str(exc))


def _env_value(value) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    return str(value).lower() if isinstance(value, bool) else str(value)


def settings_environment(settings: BaseSettings, base: Mapping[str, str] | None = None,
                         exclude: Iterable[str] = ()) -> dict[str, str]:
    """``base`` (default: this process's environment) with every field of ``settings`` written into its
    environment variable, so that a child process reads exactly these settings; a field that is None
    removes its variables (the child then gets the default, as this process did)."""
    env = dict(os.environ if base is None else base)
    for name in type(settings).model_fields.keys() - set(exclude):
        first, *others = env_names(type(settings), name)
        for variable in others:
            env.pop(variable, None)
        value = getattr(settings, name)
        if value is None:
            env.pop(first, None)
        else:
            env[first] = _env_value(value)
    return env
