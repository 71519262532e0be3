"""Stage options declared once: a config dataclass field carries its flag, default and help.

    @dataclass(frozen=True)
    class ExportConfig:
        model: str = option("depth_anything_v2_vits", help="a registered model (--list)")
        opset: int = option(17, help="ONNX opset")

`add_config_arguments` turns such a dataclass into argparse options (`--opset`, named after the
field), `config_from_args` builds the config back from the parsed namespace, and `config_to_argv`
writes a config as the command line that rebuilds it. Flag, field and manifest key are the same
name, with `-` in the flag where the field has `_`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Callable

__all__ = ["option", "OptionSpec", "add_config_arguments", "config_from_args", "config_to_argv",
           "cli_fields", "flag_name", "choices_hint", "parse_size", "format_size", "parse_optional_path", "inherit", "quote_argv", "field_default"]


@dataclass(frozen=True)
class OptionSpec:
    help: str
    # Turns the command-line text into the field's value; by default chosen from the field's type.
    parse: Callable[[str], Any] | None = None
    # Writes a value back as command-line text (config_to_argv); default: str().
    format: Callable[[Any], str] | None = None
    choices: tuple | None = None
    metavar: str | None = None
    # A required option has no default in the dataclass either.
    required: bool = False
    # Options that only the library sets (e.g. thresholds with a dataclass value) are not flags.
    cli: bool = True
    # A list field: the flag may be repeated (--share a --share b).
    repeatable: bool = False
    # A list field given as positional words (`lpcv-depth predict a.jpg b.jpg`), one or more.
    positional: bool = False


def option(default: Any = MISSING, *, help: str, parse=None, format=None, choices=None, metavar=None,
           cli: bool = True, repeatable: bool = False, positional: bool = False,
           default_factory: Any = MISSING) -> Any:
    """A dataclass field that is also a command-line option (with `positional`, words without a flag)."""
    spec = OptionSpec(help=help, parse=parse, format=format, choices=tuple(choices) if choices else None,
                      metavar=metavar, required=default is MISSING and default_factory is MISSING, cli=cli,
                      repeatable=repeatable, positional=positional)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"option": spec})


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def choices_hint(field_name: str, choices) -> str:
    """The `fix:` line of a value outside an option's choices (reached from the library; the CLI's
    argparse already refuses it)."""
    return f"pass {flag_name(field_name)} " + " or ".join(map(str, choices))


def cli_fields(config_type: type) -> list[tuple[dataclasses.Field, OptionSpec]]:
    """The config's command-line options: its own first, then those it inherits from a base config."""
    own = config_type.__dict__.get("__annotations__", {})
    fields = [(f, f.metadata["option"]) for f in dataclasses.fields(config_type)
              if "option" in f.metadata and f.metadata["option"].cli]
    return sorted(fields, key=lambda pair: pair[0].name not in own)


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH like 518x518, got {text!r}") from None
    return height, width


def format_size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def parse_optional_path(text: str) -> Path | None:
    return None if text.lower() in ("none", "") else Path(text)


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the type without `| None`, whether None is allowed)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else annotation), len(args) < len(typing.get_args(annotation))
    return annotation, False


def _parser_for(annotation: Any, spec: OptionSpec) -> Callable[[str], Any] | None:
    if spec.parse is not None:
        return spec.parse
    base, optional = _base_type(annotation)
    if typing.get_origin(base) in (list, tuple):
        base = typing.get_args(base)[0]
    if base not in (int, float, Path, str):
        return None
    if not optional:
        return None if base is str else base

    def parse_optional(text: str):
        # "None" on the command line is how config_to_argv writes an unset optional value.
        return None if text == "None" else base(text)

    parse_optional.__name__ = getattr(base, "__name__", "value")
    return parse_optional


def add_config_arguments(parser: argparse.ArgumentParser, config_type: type, *, given_only: bool = False) -> None:
    """One flag per option field. With `given_only`, nothing is required and the namespace holds
    only the flags actually given (for `lpcv-depth run --ptq-args "..."`)."""
    hints = typing.get_type_hints(config_type)
    for field, spec in cli_fields(config_type):
        annotation = hints[field.name]
        base, _ = _base_type(annotation)
        flag = flag_name(field.name)
        default = field_default(field)
        help_text = spec.help
        if base is bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS if given_only else default,
                                help=f"{help_text} (default: {'on' if default else 'off'})")
            continue
        kwargs: dict[str, Any] = {"dest": field.name, "help": help_text, "metavar": spec.metavar}
        converter = _parser_for(annotation, spec)
        if converter is not None:
            kwargs["type"] = converter
        if spec.positional:
            kwargs.pop("dest")
            kwargs["metavar"] = spec.metavar or field.name.upper()
            kwargs.update({"nargs": "*", "default": argparse.SUPPRESS} if given_only else {"nargs": "+"})
            parser.add_argument(field.name, **kwargs)
            continue
        if spec.choices:
            kwargs["choices"] = spec.choices
        if given_only:
            kwargs["default"] = argparse.SUPPRESS
            if spec.repeatable:
                kwargs["action"] = "append"
        elif spec.repeatable:
            kwargs["action"] = "append"
            kwargs["default"] = None
        elif spec.required:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
            if "default" not in help_text:
                shown = _format_value(field, spec, default) if default is not None else "none"
                kwargs["help"] = f"{help_text} (default: {shown})"
        parser.add_argument(flag, **kwargs)


def field_default(field: dataclasses.Field) -> Any:
    if field.default is not MISSING:
        return field.default
    if field.default_factory is not MISSING:
        return field.default_factory()
    return None


def config_from_args(config_type: type, args: argparse.Namespace, **overrides) -> Any:
    """Build the config from a namespace that `add_config_arguments` filled; validation runs in the
    dataclass, so a bad value is a ConfigError with its fix."""
    values = {}
    for field, spec in cli_fields(config_type):
        value = getattr(args, field.name)
        if spec.repeatable or spec.positional:
            value = tuple(value) if value else field_default(field)
        values[field.name] = value
    values.update(overrides)
    return config_type(**values)


def _format_value(field: dataclasses.Field, spec: OptionSpec, value: Any) -> str:
    if spec.format is not None:
        return spec.format(value)
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return format_size(value)
    return str(value)


def inherit(config_type: type, name: str, **changes) -> Any:
    """The option `name` of another stage's config, for a config that passes it on (`lpcv-depth run`
    takes --calib as ptq declares it): declared once, with the same flag, default and help."""
    source = {f.name: f for f in dataclasses.fields(config_type)}[name]
    spec = dataclasses.replace(source.metadata["option"], **changes)
    return dataclasses.field(default=source.default, default_factory=source.default_factory,
                             metadata={"option": spec})


def config_to_argv(config: Any, *, only_changed: bool = True) -> list[str]:
    """The command-line arguments that rebuild `config` (fields left at their default are omitted)."""
    hints = typing.get_type_hints(type(config))
    argv: list[str] = []
    positional: list[str] = []
    for field, spec in cli_fields(type(config)):
        if spec.positional:
            positional += [_format_value(field, spec, item) for item in getattr(config, field.name)]
            continue
        value = getattr(config, field.name)
        default = field_default(field)
        if only_changed and not spec.required and value == default:
            continue
        base, _ = _base_type(hints[field.name])
        flag = flag_name(field.name)
        if base is bool:
            argv.append(flag if value else "--no-" + flag[2:])
        elif value is None:
            argv += [flag, "None"]
        elif spec.repeatable:
            for item in value:
                argv += [flag, _format_value(field, spec, item)]
        else:
            text = _format_value(field, spec, value)
            # argparse reads a separate "-..." word as a flag: glue such a value to its own flag.
            argv += [f"{flag}={text}"] if text.startswith("-") else [flag, text]
    # After "--", a word that starts with "-" is still read as a positional value.
    return [*argv, "--", *positional] if positional else argv


def quote_argv(argv: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(os.fspath(a)) for a in argv)
