"""Click types for sfr's options, shared by `sfr render`'s command line and `sfr batch`'s manifest rows,
so a bad value gets the same message wherever it is written. Importing this module never imports torch."""

from __future__ import annotations

import click

PREPROCESS_MODES = ("crop", "resize", "extcrop", "full", "extfull")


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


class Degrees(click.ParamType):
    """A comma-separated list of degrees like `0,20,-10`."""

    name = "DEG[,DEG...]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        from .coeffs import parse_degrees

        try:
            return tuple(parse_degrees(str(value)))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


# Per-clip options as a manifest row may give them, with the types `sfr render` checks them with.
ROW_TYPES = {
    "fps": click.FloatRange(min=0, min_open=True),
    "preprocess": click.Choice(PREPROCESS_MODES),
    "still": click.BOOL,
    "expression_scale": click.FLOAT,
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
