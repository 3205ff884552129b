"""The `sfr` command line: the one place errors become exit codes.

Exit codes: 0 done; 1 an error the user can fix (`Error: ...` on stderr, no traceback); 2 a usage error
(bad option or value); 130 interrupted (Ctrl-C or SIGTERM; outputs are cleaned up first). `--debug`
shows the traceback instead. stdout carries results only; progress goes to stderr.

Nothing heavy is imported at module level, so `sfr --help` never imports torch.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Optional

import click

from . import __version__
from .errors import CheckpointError, SfrError
from .modes import DEFAULT_MODE, MODE_NAMES

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
DEBUG_KEY = "sfr.debug"
DEVICE_HELP = "auto (CUDA when available, else CPU), cpu, cuda or cuda:N."
OVERWRITE_HELP = "Replace outputs that already exist (never an input of the job, never a non-regular file)."
CONFIG_HELP = ("Model config: a built-in name (facerender, tiny; their _still siblings for 73 coefficients) "
               "or a YAML path, e.g. SadTalker's src/config/facerender.yaml.")


class SfrGroup(click.Group):
    """A group that turns SfrError into `Error: ...` + exit 1 and KeyboardInterrupt into exit 130."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SfrError as exc:
            if ctx.meta.get(DEBUG_KEY):
                raise
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(EXIT_ERROR)
        except KeyboardInterrupt:
            if ctx.meta.get(DEBUG_KEY):
                raise
            click.echo("Interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)


def _set_debug(ctx: click.Context, _param, value: bool) -> bool:
    if value:
        ctx.meta[DEBUG_KEY] = True
    return value


debug_option = click.option("--debug", is_flag=True, expose_value=False, callback=_set_debug, is_eager=True,
                            help="Show the full traceback for errors.")


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


class Degrees(click.ParamType):
    """A comma-separated list of degrees like `0,20,-10`, each finite and within one turn."""

    name = "DEG[,DEG...]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        from .coeffs import parse_degrees

        try:
            return tuple(parse_degrees(str(value)))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _reporter(quiet: bool):
    from .progress import RichReporter, SilentReporter

    return SilentReporter() if quiet else RichReporter()


@click.group(cls=SfrGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sfr")
@debug_option
def sfr() -> None:
    """sfr, the Smart Face Renderer: SadTalker 3DMM coefficients + one face -> talking-head MP4."""


@sfr.command(context_settings={"max_content_width": 100})
@click.option("--coeffs", "coeffs_path", required=True, type=click.Path(path_type=Path),
              help="SadTalker coefficients: .mat (coeff_3dmm) or .npy, (frames, 70|73).")
@click.option("--source", required=True, type=click.Path(dir_okay=True, path_type=Path),
              help="The source face image (any size; resized to --size).")
@click.option("--source-coeffs", type=click.Path(path_type=Path),
              help="The source face's own coefficients (default: the first frame of --coeffs).")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="The MP4 to write (default: <coeffs name>.mp4 here, unless only --frames-dir is given).")
@click.option("--frames-dir", type=click.Path(path_type=Path),
              help="Also (or, without -o, only) write frames as DIR/000000.png, 000001.png, ...")
@click.option("--audio", type=click.Path(path_type=Path), help="Audio to mux into the MP4 (cut to the video).")
@click.option("--fps", type=CheckedFloat(".media:check_fps"), default=25.0, show_default=True,
              help="Frames per second of the MP4 (above 0, at most 1000).")
@click.option("--checkpoint-dir", type=click.Path(path_type=Path),
              help="SadTalker's checkpoints folder [default: $SFR_CHECKPOINT_DIR or ./checkpoints].")
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="The renderer file (SadTalker_V0.0.2_256.safetensors or facevid2vid_00189-model.pth.tar).")
@click.option("--mapping", type=click.Path(path_type=Path),
              help="The mapping file (mapping_00229-model.pth.tar crop, mapping_00109-model.pth.tar full).")
@click.option("--config", "config", metavar="NAME|PATH", help=CONFIG_HELP + " [default: facerender]")
@click.option("--size", "size_px", type=click.Choice(["256", "512"]), default="256", show_default=True,
              help="Frame size in pixels (picks SadTalker_V0.0.2_<size>.safetensors).")
@click.option("--preprocess", type=click.Choice(MODE_NAMES), default=DEFAULT_MODE, show_default=True,
              help="SadTalker's preprocess mode of the coefficients: crop/resize/extcrop use 70, full/extfull 73.")
@click.option("--still/--no-still", default=False, show_default=True,
              help="Keep the source's head pose (SadTalker's --still).")
@click.option("--expression-scale", type=CheckedFloat(".coeffs:check_expression_scale"), default=1.0,
              show_default=True, help="Multiply the 64 expression coefficients (finite, within ±1000).")
@click.option("--yaw", type=Degrees(), help="Camera yaw in degrees (each within ±360), swept over the clip: 0,20,-10.")
@click.option("--pitch", type=Degrees(), help="Camera pitch in degrees, as --yaw.")
@click.option("--roll", type=Degrees(), help="Camera roll in degrees, as --yaw.")
@click.option("--batch-size", type=BatchSize(), default="auto", show_default=True,
              help="Frames per batch; auto picks from free memory.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Compute precision (fp16/bf16 on CUDA; keypoint and pose math stays fp32).")
@click.option("--compile/--no-compile", "compile_", default=False, show_default=True,
              help="torch.compile the decoder (CUDA; slow first batch).")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@click.option("--quiet", is_flag=True, help="No progress or notes on stderr.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object with the result and timings (no progress or notes on stderr).")
@debug_option
def render(coeffs_path: Path, source: Path, source_coeffs: Optional[Path], output: Optional[Path],
           frames_dir: Optional[Path], audio: Optional[Path], fps: float, checkpoint_dir: Optional[Path],
           checkpoint: Optional[Path], mapping: Optional[Path], config: Optional[str], size_px: str,
           preprocess: str, still: bool, expression_scale: float, yaw, pitch, roll, batch_size: Optional[int],
           device: str, precision: str, compile_: bool, overwrite: bool, quiet: bool, as_json: bool) -> None:
    """Render a talking-head MP4 (and/or PNG frames) from coefficients and one source face.

    Prints the MP4 path (or the frames folder when only --frames-dir is given), or with --json one
    JSON object: output, frames_dir, frames, seconds, frames_per_second, peak_rss_mib, peak_cuda_mib,
    device, precision, batch_size.
    """
    from .pipeline import RenderJob, render_job

    job = RenderJob(coeffs=coeffs_path, source=source, source_coeffs=source_coeffs, output=output,
                    frames_dir=frames_dir, audio=audio, fps=fps, checkpoint_dir=checkpoint_dir,
                    checkpoint=checkpoint, mapping=mapping, config=config, size_px=int(size_px),
                    preprocess=preprocess, still=still, expression_scale=expression_scale, yaw=yaw, pitch=pitch,
                    roll=roll, batch_size=batch_size, device=device, precision=precision, compile=compile_,
                    overwrite=overwrite)
    with _reporter(quiet or as_json) as reporter:
        report = render_job(job, reporter)
    if as_json:
        click.echo(report.to_json())
    else:
        click.echo(str(report.output if report.output is not None else report.frames_dir))


@sfr.group()
def checkpoints() -> None:
    """Write random weights in SadTalker's layout, or inspect a checkpoint file."""


@checkpoints.command("random")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--config", "config", metavar="NAME|PATH", default="facerender", show_default=True,
              help=CONFIG_HELP)
@click.option("--layout", type=click.Choice(["pth", "safetensors"]), default="pth", show_default=True,
              help="pth: facevid2vid_00189-model.pth.tar; safetensors: SadTalker_V0.0.2_<size>.safetensors.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--size", "size_px", type=click.Choice(["256", "512"]), default="256", show_default=True,
              help="The size in the safetensors file name.")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@debug_option
def checkpoints_random(out_dir: Path, config: str, layout: str, seed: int, size_px: str, overwrite: bool) -> None:
    """Write deterministic random weights under SadTalker's file names into OUT_DIR (the renderer and
    both mapping files). Random weights render abstract frames; they are for tests, demos and benches."""
    from .checkpoints import random_checkpoint_paths, write_random_checkpoints
    from .config import config_pair, config_path, load_config
    from .outputs import JobInput, check_output, describe_leftovers, remove_leftovers

    model_file = config_path(config)
    config_70, config_73 = config_pair(load_config(model_file))
    for path in random_checkpoint_paths(out_dir, layout=layout, size_px=int(size_px)):
        removed = remove_leftovers(path)
        if removed:
            click.echo(describe_leftovers(path, removed), err=True)
        check_output(path, [JobInput(model_file, "--config")], overwrite=overwrite)
    write_random_checkpoints(out_dir, config_70, config_73, layout=layout, seed=seed, size_px=int(size_px))
    click.echo(str(out_dir))


@checkpoints.command("inspect")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--config", "config", metavar="NAME|PATH", help=CONFIG_HELP + " [default: facerender, or "
              "facerender_still for a 73-coefficient mapping file]")
@debug_option
def checkpoints_inspect(path: Path, config: Optional[str]) -> None:
    """Say what a checkpoint file holds and whether it fits a config (exit 1 naming the first mismatch)."""
    from .checkpoints import build_networks, check_state_dict, read_state_dicts
    from .config import config_path, load_config
    from .modes import describe_coeff_count, modes_taking

    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    parts = read_state_dicts(path)
    layout = "safetensors" if path.suffix == ".safetensors" else "pth"
    click.echo(f"{path}: {layout} layout, parts: {', '.join(parts)}")
    coeff_nc = None
    for part, state_dict in parts.items():
        values = sum(t.numel() for t in state_dict.values() if t.is_floating_point())
        line = f"  {part}: {len(state_dict)} tensors, {values:,} parameters"
        if part == "mapping" and "first.0.weight" in state_dict:
            coeff_nc = int(state_dict["first.0.weight"].shape[1])
            line += f", takes {coeff_nc} coefficients ({describe_coeff_count(coeff_nc)})"
        if part == "he_estimator":
            line += " (not used by sfr)"
        click.echo(line)
    # Without --config, the default family's member that fits the mapping net (facerender_still for 73).
    fitting = next((mode.name for mode in modes_taking(coeff_nc)), DEFAULT_MODE) if config is None else DEFAULT_MODE
    model = load_config(config_path(config, fitting))
    nets = build_networks(model, with_he_estimator=True)
    for part, state_dict in parts.items():
        module = getattr(nets, part, None)
        if module is not None:
            check_state_dict(module, state_dict, f"{path} [{part}]", model.name)
    click.echo(f"fits {model.name}")


@sfr.command()
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="The engine's compute precision (reduced precision also reports PSNR against fp32).")
@click.option("--batch-size", type=BatchSize(), default="auto", show_default=True,
              help="Frames per batch; auto picks from free memory.")
@click.option("--frames", type=click.IntRange(min=1), default=8, show_default=True, help="Frames to render.")
@click.option("--size", "size_px", type=click.Choice(["256", "512"]), default="256", show_default=True,
              help="Frame size in pixels.")
@click.option("--config", "config", metavar="NAME|PATH", default="facerender", show_default=True, help=CONFIG_HELP)
@click.option("--checkpoint-dir", type=click.Path(path_type=Path),
              help="Checkpoints to time [default: random weights shaped by --config].")
@click.option("--compile/--no-compile", "compile_", default=False, show_default=True,
              help="torch.compile the engine's decoder (CUDA).")
@click.option("--plain/--no-plain", default=True, show_default=True,
              help="Also time a plain one-frame-at-a-time loop in SadTalker's style, for the speed-up.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@debug_option
def bench(device: str, precision: str, batch_size: Optional[int], frames: int, size_px: str, config: str,
          checkpoint_dir: Optional[Path], compile_: bool, plain: bool, as_json: bool) -> None:
    """Measure frames per second and peak memory of the renderer on this machine, against a plain
    SadTalker-style loop on the same weights and frames."""
    import json

    from .bench import format_report, run_benchmark
    from .config import config_path, load_config

    model = load_config(config_path(config))
    report = run_benchmark(model, device=device, precision=precision, batch_size=batch_size, frames=frames,
                           size_px=int(size_px), checkpoint_dir=checkpoint_dir, compile=compile_, plain=plain)
    click.echo(json.dumps(report) if as_json else format_report(report))


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    """The `sfr` entry point: SIGTERM interrupts like Ctrl-C, so outputs are cleaned up on the way out."""
    # Idle OpenMP threads sleep instead of spinning: frames are encoded (ffmpeg, PNG) while the next batch
    # renders, and spinning threads on a busy CPU made CPU renders several times slower. Read by
    # libgomp when torch loads, which is after this line.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, _raise_interrupt)
    sfr.main(prog_name="sfr")


if __name__ == "__main__":
    main()
