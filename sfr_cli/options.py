"""sfr's one option table, and the Click types of its values. Importing this module never imports torch.

Each option a user can give a render is one `OptionRow`, declared once. From the rows come:
- the Click options of `sfr render` and `sfr batch` (`command_options`; a row lists the commands that
  declare it, so `sfr enhance` or `sfr bench` can reuse rows), with one help text and one default;
- `sfr batch`'s manifest columns (`column_rows`): which exist, how a cell converts (`convert_cell`, the row's
  Click type, so a bad cell gets `sfr render`'s message) and which are paths relative to the manifest;
- the `Renderer`'s keywords (`shared_rows`: its constructor, engine settings loaded once; `clip_rows`:
  `frames()`/`render()`, one clip's options). Every `RenderJob` field is exactly one row, and so is every
  field of a stage's `Options` (what a job carries as `job.stages[stage name]`).

`table()` is the core rows (`CORE_OPTIONS`) followed by the rows each frame stage module brings as its
module-level `OPTIONS` tuple (modules listed in `stages.STAGE_MODULES`, in chain order; their `Options`
dataclass has one field per row). A stage module is
imported for its rows whenever the table is read (`sfr --help` included), so its top level stays light:
stdlib, `..options`, `..errors`, `..modes`; numpy, torch and media are imported inside its functions.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Tuple

import click

from .errors import ConfigError, SfrError
from .modes import DEFAULT_MODE, MODE_NAMES


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
    """A number that a library check accepts (`check(number)` returns it or raises SfrError: the check owns
    the limits; this turns its error into a usage error naming the option, exit 2)."""

    name = "FLOAT"

    def __init__(self, check: Callable[[float], float]):
        self.check = check

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        try:
            return self.check(number)
        except SfrError as exc:
            self.fail(str(exc), param, ctx)


class ParsedText(click.ParamType):
    """Text that a library parser (`parse(text)`, raising ValueError) turns into a tuple; the ValueError
    becomes a usage error naming the option. A tuple (a value parsed before) passes through unchanged."""

    def __init__(self, name: str, parse: Callable[[str], Any]):
        self.name = name
        self.parse = parse

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return tuple(self.parse(str(value)))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


# The checks below live with their data (coefficients, media); each imports its module when a value
# arrives, so that `sfr --help` (which reads this table) imports neither numpy's users nor imageio.
def check_fps(fps: float) -> float:
    """`media.check_fps`: MIN_FPS <= fps <= MAX_FPS."""
    from .media import check_fps as check

    return check(fps)


def check_expression_scale(scale: float) -> float:
    """`coeffs.check_expression_scale`."""
    from .coeffs import check_expression_scale as check

    return check(scale)


def parse_degrees(text: str):
    """`coeffs.parse_degrees`: `"0,20,-10"` -> [0.0, 20.0, -10.0], each finite and within the camera's limits."""
    from .coeffs import parse_degrees as parse

    return parse(text)


# A comma-separated list of degrees like `0,20,-10` (yaw, pitch, roll).
DEGREE_LIST = ParsedText("DEG[,DEG...]", parse_degrees)


class IntChoice(click.Choice):
    """One of a few whole numbers, shown and typed as text (`[256|512]`); the value is an int."""

    def __init__(self, choices):
        super().__init__([str(choice) for choice in choices])

    def convert(self, value, param, ctx):
        return int(super().convert(str(value), param, ctx))


class ChoiceOrNone(click.Choice):
    """One of `choices`, or `none` (off: the value None), so a manifest row can turn off what the batch's
    option turns on (an empty cell or JSON null keeps the batch's default). `aliases`: other spellings
    accepted and turned into their choice (SadTalker's `RestoreFormer` -> `restoreformer`)."""

    OFF = "none"

    def __init__(self, choices, aliases=None):
        self.aliases = dict(aliases or {})
        super().__init__([*choices, *self.aliases, self.OFF])

    def convert(self, value, param, ctx):
        chosen = super().convert(value, param, ctx)
        return None if chosen == self.OFF else self.aliases.get(chosen, chosen)


# ---------------------------------------------------------------------------------------------------
# The table

RENDER, BATCH, ENHANCE = "render", "batch", "enhance"  # the commands that declare rows
SHARED, CLIP = "shared", "clip"  # a Renderer setting (its constructor; one engine) | one clip's option

DEVICE_HELP = "auto (CUDA when available, else CPU), cpu, cuda or cuda:N."
OVERWRITE_HELP = "Replace outputs that already exist (never an input of the job, never a non-regular file)."
CONFIG_HELP = ("Model config: a built-in name (facerender, tiny; their _still siblings for 73 coefficients) "
               "or a YAML path, e.g. SadTalker's src/config/facerender.yaml.")
SIZE_CHOICES_PX = (256, 512)
PRECISIONS = ("fp32", "fp16", "bf16")


class TableOption(click.Option):
    """A Click option made from an `OptionRow` (`row`), so a command's table options can be told apart."""

    def __init__(self, *args, row: "OptionRow", **kwargs):
        super().__init__(*args, **kwargs)
        self.row = row


@dataclass(frozen=True)
class OptionRow:
    """One option, declared once.

    `name` is the `RenderJob` field (or its stage's `Options` field: `RenderJob.make`, `job.option(name)`),
    the Click parameter, the manifest column and (unless `keyword`) the
    `Renderer` keyword. `flags` are Click's declarations: `("-o", "--output")`, `("--still/--no-still",)`.
    `type` is a Click type (None: text, or `click.Path` for a `path` row); `click.BOOL` makes an on/off
    flag (`--x/--no-x` in `flags`, or a bare `--x`). `default` is the command line's (converted by `type`
    it equals the `RenderJob` default); None means "not given". `scope` is SHARED (an engine setting: the
    `Renderer` constructor; `sfr batch` applies it to every row) or CLIP (one clip's: `frames()`/`render()`,
    a manifest column if `column`). `path`: a file or folder (`Path` in the API, relative to the manifest in
    a manifest). `required`: `sfr render` and every manifest row need it. `commands`: the commands that
    declare it. `batch_help`: its help in `sfr batch` where that differs (a default for every row).
    """

    name: str
    flags: Tuple[str, ...]
    help: str
    type: Any = None
    default: Any = None
    scope: str = CLIP
    column: bool = False
    path: bool = False
    required: bool = False
    commands: Tuple[str, ...] = (RENDER, BATCH)
    batch_help: Optional[str] = None
    metavar: Optional[str] = None
    keyword: Optional[str] = None  # the Renderer keyword when it is not `name` (`size` for size_px)

    @property
    def api_name(self) -> str:
        """The `Renderer` keyword."""
        return self.keyword or self.name

    @property
    def click_type(self):
        if self.type is None and self.path:
            return click.Path(path_type=Path)
        return self.type

    @property
    def is_switch(self) -> bool:
        """A bare on/off flag (`--overwrite`): given or not, no value, no default shown."""
        return self.type is click.BOOL and not any("/" in flag for flag in self.flags)

    def help_in(self, command: str) -> str:
        return self.batch_help if command == BATCH and self.batch_help else self.help

    def click_option(self, command: str) -> Callable:
        """The `click.option` decorator declaring this row in `command`."""
        kwargs = dict(cls=TableOption, row=self, type=self.click_type, help=self.help_in(command),
                      required=self.required, metavar=self.metavar)
        if self.is_switch:
            kwargs.update(is_flag=True, default=False)
        elif self.default is not None:
            kwargs.update(default=self.default, show_default=True)
        return click.option(*self.flags, self.name, **kwargs)

    def convert(self, value):
        """`value` (a manifest cell or JSON value, or the command line's default) as `sfr render` would
        take it; raises click.BadParameter with `sfr render`'s message."""
        if value is None:
            return None
        if self.path:
            return Path(value)
        if isinstance(value, (list, tuple)) and isinstance(self.type, ParsedText):
            value = ",".join(str(v) for v in value)  # a JSON list: [0, 20, -10]
        return value if self.type is None else self.type.convert(value, None, None)


def convert_keyword(row: OptionRow, value):
    """`value` given to the Python API under `row`'s keyword, checked as the command line checks its text
    (the row's Click type), without Python's loose coercions: no True for a number, no 1.5 for a whole
    number, a box or degrees as a tuple checked as their text. Raises ConfigError naming the keyword."""
    try:
        return _convert_keyword(row, value)
    except click.BadParameter as exc:
        raise ConfigError(f"{row.api_name}: {exc.format_message()}") from None


def _convert_keyword(row: OptionRow, value):
    if value is None or row.path or row.type is None:
        return value
    is_bool = isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", "") == "b"
    if row.type is click.BOOL:
        if not is_bool:
            raise click.BadParameter(f"got {type(value).__name__} {value!r}; give True or False")
        return bool(value)
    if is_bool:
        raise click.BadParameter(f"got {value!r}; give {row.type.name if hasattr(row.type, 'name') else 'a value'}")
    whole = row.type is click.INT or isinstance(row.type, (IntChoice, BatchSize))
    if whole and isinstance(value, float):
        if not value.is_integer():
            raise click.BadParameter(f"{value!r} is not a whole number")
        value = int(value)
    if isinstance(row.type, ParsedText) and not isinstance(value, (str, list, tuple)):
        raise click.BadParameter(f"got {type(value).__name__} {value!r}; give text like {row.type.name} or a tuple")
    return row.convert(value)


CORE_OPTIONS: Tuple[OptionRow, ...] = (
    OptionRow("coeffs", ("--coeffs",), "SadTalker coefficients: .mat (coeff_3dmm) or .npy, (frames, 70|73).",
              path=True, column=True, required=True, commands=(RENDER,)),
    # sfr batch's own --coeffs (globs) and --source (text: every glob clip's face, or a row's default) differ
    OptionRow("source", ("--source",), "The source face image (any size; resized to --size).",
              path=True, column=True, required=True, commands=(RENDER,)),
    OptionRow("source_coeffs", ("--source-coeffs",),
              "The source face's own coefficients (default: the first frame of --coeffs).",
              path=True, column=True, batch_help="Default for rows without source_coeffs."),
    OptionRow("output", ("-o", "--output"),
              "The MP4 to write (default: <coeffs name>.mp4 here, unless only --frames-dir is given).",
              path=True, column=True, commands=(RENDER,)),
    OptionRow("frames_dir", ("--frames-dir",),
              "Also (or, without -o, only) write frames as DIR/000000.png, 000001.png, ...",
              path=True, column=True, commands=(RENDER,)),
    OptionRow("audio", ("--audio",), "Audio to mux into the MP4 (cut to the video).",
              path=True, column=True, commands=(RENDER,)),
    OptionRow("fps", ("--fps",), "Frames per second of the MP4 (0.01 to 1000).",
              type=CheckedFloat(check_fps), default=25.0, column=True,
              batch_help="Default frames per second."),
    OptionRow("checkpoint_dir", ("--checkpoint-dir",),
              "SadTalker's checkpoints folder [default: $SFR_CHECKPOINT_DIR or ./checkpoints].",
              path=True, scope=SHARED),
    OptionRow("checkpoint", ("--checkpoint",),
              "The renderer file (SadTalker_V0.0.2_256.safetensors or facevid2vid_00189-model.pth.tar).",
              path=True, scope=SHARED, batch_help="The renderer file, as sfr render's."),
    OptionRow("mapping", ("--mapping",),
              "The mapping file (mapping_00229-model.pth.tar crop, mapping_00109-model.pth.tar full).",
              path=True, scope=SHARED, batch_help="The mapping file, as sfr render's."),
    OptionRow("config", ("--config",), CONFIG_HELP + " [default: facerender]", scope=SHARED, metavar="NAME|PATH"),
    OptionRow("size_px", ("--size",), "Frame size in pixels (picks SadTalker_V0.0.2_<size>.safetensors).",
              type=IntChoice(SIZE_CHOICES_PX), default="256", scope=SHARED, keyword="size",
              batch_help="Frame size in pixels."),
    OptionRow("preprocess", ("--preprocess",),
              "SadTalker's preprocess mode of the coefficients: crop/resize/extcrop use 70, full/extfull 73.",
              type=click.Choice(MODE_NAMES), default=DEFAULT_MODE, column=True, batch_help="Default preprocess mode."),
    OptionRow("still", ("--still/--no-still",), "Keep the source's head pose (SadTalker's --still).",
              type=click.BOOL, default=False, column=True, batch_help="Default for rows without still."),
    OptionRow("expression_scale", ("--expression-scale",),
              "Multiply the 64 expression coefficients (finite, within ±1000).",
              type=CheckedFloat(check_expression_scale), default=1.0, column=True,
              batch_help="Default expression scale."),
    OptionRow("yaw", ("--yaw",), "Camera yaw in degrees (each within ±360), swept over the clip: 0,20,-10.",
              type=DEGREE_LIST, column=True, batch_help="Default camera yaw sweep, as sfr render's."),
    OptionRow("pitch", ("--pitch",), "Camera pitch in degrees, as --yaw.", type=DEGREE_LIST, column=True,
              batch_help="Default camera pitch sweep."),
    OptionRow("roll", ("--roll",), "Camera roll in degrees, as --yaw.", type=DEGREE_LIST, column=True,
              batch_help="Default camera roll sweep."),
    OptionRow("batch_size", ("--batch-size",), "Frames per batch; auto picks from free memory.",
              type=BatchSize(), default="auto", scope=SHARED, batch_help="Frames per batch."),
    OptionRow("device", ("--device",), DEVICE_HELP, default="auto", scope=SHARED),
    OptionRow("precision", ("--precision",),
              "Compute precision (fp16/bf16 on CUDA; keypoint and pose math stays fp32).",
              type=click.Choice(PRECISIONS), default="fp32", scope=SHARED, batch_help="Compute precision."),
    OptionRow("compile", ("--compile/--no-compile",), "torch.compile the decoder (CUDA; slow first batch).",
              type=click.BOOL, default=False, scope=SHARED, batch_help="torch.compile the decoder (CUDA)."),
    OptionRow("overwrite", ("--overwrite",), OVERWRITE_HELP, type=click.BOOL, default=False,
              batch_help="Render rows whose outputs exist again (default: skip them)."),
)


@functools.lru_cache(maxsize=None)
def table() -> Tuple[OptionRow, ...]:
    """Every row: `CORE_OPTIONS`, then each stage module's `OPTIONS` in chain order. Two rows with one
    name or one flag are a bug in sfr (ValueError)."""
    from .stages import stage_modules

    rows = CORE_OPTIONS + tuple(row for module in stage_modules() for row in getattr(module, "OPTIONS", ()))
    names = [row.name for row in rows]
    flags = [flag for row in rows for decl in row.flags for flag in decl.split("/")]
    for seen in (names, flags):
        twice = sorted({item for item in seen if seen.count(item) > 1})
        if twice:
            raise ValueError(f"option table: {', '.join(twice)} declared twice")
    return rows


def command_rows(command: str, scope: Optional[str] = None) -> Tuple[OptionRow, ...]:
    """The rows `command` declares (of `scope`, if given), in table order."""
    return tuple(row for row in table() if command in row.commands and scope in (None, row.scope))


def shared_rows() -> Tuple[OptionRow, ...]:
    """The `Renderer` constructor's settings (`RenderJob` fields shared by every clip of a Renderer)."""
    return tuple(row for row in table() if row.scope == SHARED)


def clip_rows() -> Tuple[OptionRow, ...]:
    """One clip's options: the keywords of `Renderer.frames`/`render` (`coeffs` and `source` included)."""
    return tuple(row for row in table() if row.scope == CLIP)


def column_rows() -> Tuple[OptionRow, ...]:
    """`sfr batch`'s manifest columns, in table order."""
    return tuple(row for row in table() if row.column)


def row_named(name: str) -> OptionRow:
    return next(row for row in table() if row.name == name)


def command_options(command: str, scope: Optional[str] = None) -> Callable:
    """A decorator declaring `command`'s table rows (of `scope`, if given) as Click options, in table order;
    the command function receives each under its row's `name`."""
    rows = command_rows(command, scope)

    def decorate(function):
        for row in reversed(rows):  # Click lists options in decorator order, top first
            function = row.click_option(command)(function)
        return function

    return decorate


def convert_cell(name: str, value):
    """Manifest cell (or JSON value) `value` of column `name` as `sfr render` would take it; raises
    click.BadParameter with `sfr render`'s message."""
    return row_named(name).convert(value)
