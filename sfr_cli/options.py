"""Click types for sfr's options, shared by `sfr render`'s command line and `sfr batch`'s manifest rows,
so a bad value gets the same message wherever it is written. Importing this module never imports torch."""

from __future__ import annotations

import click

from .errors import SfrError
from .modes import MODE_NAMES


class BatchSize(click.ParamType):
    """`auto` (None) or a whole number of frames >= 1."""

    name = "auto|N"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int):
            number = value
        elif str(value).strip().lower() == "auto":
            return None
        else:
            try:
                number = int(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is neither 'auto' nor a whole number", param, ctx)
        if number is not None and number < 1:
            self.fail(f"{number} is below 1; give a batch size of at least 1, or auto", param, ctx)
        return number


class CheckedFloat(click.ParamType):
    """A number that a library check accepts (the check owns the limits; this turns its error into a usage
    error naming the option, exit 2). `check` is "module:function", imported when a value arrives so
    that `sfr --help` stays light."""

    name = "FLOAT"

    def __init__(self, check: str):
        self.check = check

    def convert(self, value, param, ctx):
        import importlib

        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        module, _, function = self.check.partition(":")
        try:
            return getattr(importlib.import_module(module, __package__), function)(number)
        except SfrError as exc:
            self.fail(str(exc), param, ctx)


class ParsedText(click.ParamType):
    """Text that a library parser turns into a tuple (`parser` is "module:function", imported when a value
    arrives so that `sfr --help` stays light); the parser's ValueError becomes a usage error naming the
    option. A tuple (a value parsed before) passes through unchanged."""

    def __init__(self, name: str, parser: str):
        self.name = name
        self.parser = parser

    def convert(self, value, param, ctx):
        import importlib

        if isinstance(value, tuple):
            return value
        module, _, function = self.parser.partition(":")
        parse = getattr(importlib.import_module(module, __package__), function)
        try:
            return tuple(parse(str(value)))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def Degrees() -> ParsedText:  # noqa: N802 (used like the other Click types)
    """A comma-separated list of degrees like `0,20,-10`, each finite and within one turn."""
    return ParsedText("DEG[,DEG...]", ".coeffs:parse_degrees")


def CropBox() -> ParsedText:  # noqa: N802
    """`x1,y1,x2,y2`: SadTalker's face box in the original picture (ox1,oy1,ox2,oy2), exclusive ends."""
    return ParsedText("X1,Y1,X2,Y2", ".stages.paste:parse_box")


def Shard() -> ParsedText:  # noqa: N802
    """`K/N`: the K-th of N shards."""
    return ParsedText("K/N", ".batch:parse_shard")



# Per-clip options as a manifest row may give them, with the types `sfr render` checks them with.
ROW_TYPES = {
    "fps": CheckedFloat(".media:check_fps"),
    "preprocess": click.Choice(MODE_NAMES),
    "still": click.BOOL,
    "expression_scale": CheckedFloat(".coeffs:check_expression_scale"),
    "yaw": Degrees(),
    "pitch": Degrees(),
    "roll": Degrees(),
}


def convert_row_value(name: str, value):
    """`value` of per-clip option `name` (a manifest cell or JSON value) as `sfr render` would take it;
    raises click.BadParameter with `sfr render`'s message."""
    if name in ("yaw", "pitch", "roll") and isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    return ROW_TYPES[name].convert(value, None, None)
