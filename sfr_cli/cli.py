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
from .options import ROW_TYPES, BatchSize, CropBox, Degrees, Shard

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
@click.option("--fps", type=ROW_TYPES["fps"], default=25.0, show_default=True,
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
@click.option("--expression-scale", type=ROW_TYPES["expression_scale"], default=1.0,
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
@click.option("--paste-into", type=click.Path(path_type=Path), metavar="PICTURE",
              help="Paste the face back into this original picture, SadTalker's full-mode way (seamless "
                   "clone); frames and MP4 take its size. --source must then be SadTalker's crop of it.")
@click.option("--crop-box", type=CropBox(),
              help="The face box in the original picture (SadTalker's ox1,oy1,ox2,oy2). With --paste-into: "
                   "skip the search; alone: frames resized to the box's aspect, as SadTalker's <name>.mp4.")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@click.option("--quiet", is_flag=True, help="No progress or notes on stderr.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object with the result and timings (no progress or notes on stderr).")
@debug_option
def render(coeffs_path: Path, source: Path, source_coeffs: Optional[Path], output: Optional[Path],
           frames_dir: Optional[Path], audio: Optional[Path], fps: float, checkpoint_dir: Optional[Path],
           checkpoint: Optional[Path], mapping: Optional[Path], config: Optional[str], size_px: str,
           preprocess: str, still: bool, expression_scale: float, yaw, pitch, roll, batch_size: Optional[int],
           device: str, precision: str, compile_: bool, paste_into: Optional[Path], crop_box, overwrite: bool,
           quiet: bool, as_json: bool) -> None:
    """Render a talking-head MP4 (and/or PNG frames) from coefficients and one source face.

    Prints the MP4 path (or the frames folder when only --frames-dir is given), or with --json one
    JSON object: output, frames_dir, frames, seconds, frames_per_second, peak_rss_mib, peak_cuda_mib,
    device, precision, batch_size.
    """
    from .renderer import Renderer

    renderer = Renderer(checkpoint_dir=checkpoint_dir, config=config, device=device, precision=precision,
                        batch_size=batch_size, size=int(size_px), checkpoint=checkpoint, mapping=mapping,
                        compile=compile_)
    with _reporter(quiet or as_json) as reporter:
        report = renderer.render(coeffs_path, source, output=output, frames_dir=frames_dir, audio=audio,
                                 reporter=reporter, source_coeffs=source_coeffs, fps=fps, preprocess=preprocess,
                                 still=still, expression_scale=expression_scale, yaw=yaw, pitch=pitch, roll=roll,
                                 overwrite=overwrite, paste_into=paste_into, crop_box=crop_box)
    if as_json:
        click.echo(report.to_json())
    else:
        click.echo(str(report.output if report.output is not None else report.frames_dir))


@sfr.command(context_settings={"max_content_width": 100})
@click.argument("manifest_or_coeffs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--coeffs", "coeffs_globs", multiple=True, metavar="GLOB",
              help="Without a manifest: coefficient files, e.g. 'results/*.mat' (quoted, or expanded by the shell).")
@click.option("--source", help="Without a manifest: the source face for every clip (a row's default otherwise).")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), default=".", show_default=True,
              help="Where a row without `output` writes <coeffs stem>.mp4.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Report to append one JSON line per row to [default: <manifest stem>.report.jsonl beside the "
                   "manifest, or sfr-batch.report.jsonl in --output-dir].")
@click.option("--source-coeffs", type=click.Path(path_type=Path), help="Default for rows without source_coeffs.")
@click.option("--fps", type=ROW_TYPES["fps"], default=25.0, show_default=True, help="Default frames per second.")
@click.option("--preprocess", type=ROW_TYPES["preprocess"], default=DEFAULT_MODE, show_default=True,
              help="Default preprocess mode.")
@click.option("--still/--no-still", default=False, show_default=True, help="Default for rows without still.")
@click.option("--expression-scale", type=ROW_TYPES["expression_scale"], default=1.0, show_default=True,
              help="Default expression scale.")
@click.option("--yaw", type=Degrees(), help="Default camera yaw sweep, as sfr render's.")
@click.option("--pitch", type=Degrees(), help="Default camera pitch sweep.")
@click.option("--roll", type=Degrees(), help="Default camera roll sweep.")
@click.option("--checkpoint-dir", type=click.Path(path_type=Path),
              help="SadTalker's checkpoints folder [default: $SFR_CHECKPOINT_DIR or ./checkpoints].")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="The renderer file, as sfr render's.")
@click.option("--mapping", type=click.Path(path_type=Path), help="The mapping file, as sfr render's.")
@click.option("--config", "config", metavar="NAME|PATH", help=CONFIG_HELP + " [default: facerender]")
@click.option("--size", "size_px", type=click.Choice(["256", "512"]), default="256", show_default=True,
              help="Frame size in pixels.")
@click.option("--batch-size", type=BatchSize(), default="auto", show_default=True, help="Frames per batch.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Compute precision.")
@click.option("--compile/--no-compile", "compile_", default=False, show_default=True,
              help="torch.compile the decoder (CUDA).")
@click.option("--workers", type=click.IntRange(min=1),
              help="Worker processes, each loading the models once [default: one per visible GPU, else 1].")
@click.option("--devices", help="GPUs for the workers, e.g. cuda:0,cuda:2 [default: every visible GPU].")
@click.option("--shard", type=Shard(), help="Render only shard K of N (rows K, K+N, ...): 1/4, 2/4, ...")
@click.option("--ray", "ray_address", metavar="local|auto|ADDRESS",
              help="Run rows on Ray actors: local (start a local instance), auto or ADDRESS (join a cluster).")
@click.option("--overwrite", is_flag=True, help="Render rows whose outputs exist again (default: skip them).")
@click.option("--dry-run", is_flag=True, help="Check every row and say what would run; render nothing.")
@click.option("--quiet", is_flag=True, help="No progress on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document at the end: totals and every row.")
@debug_option
@click.pass_context
def batch(ctx: click.Context, manifest_or_coeffs, coeffs_globs, source, output_dir: Path, report_path, source_coeffs,
          fps, preprocess, still, expression_scale, yaw, pitch, roll, checkpoint_dir, checkpoint, mapping, config,
          size_px, batch_size, device, precision, compile_, workers, devices, shard, ray_address, overwrite, dry_run,
          quiet, as_json) -> None:
    """Render many clips with models loaded once: MANIFEST (.csv with a header row, or .jsonl) has one row
    per clip (coeffs, source; optional output, frames_dir, source_coeffs, audio, fps, preprocess, still,
    expression_scale, yaw, pitch, roll), or `--coeffs GLOB --source FACE` gives one clip per file.

    Rows whose outputs exist are skipped (rerun the same command to resume). Exit 0 when every row is
    done or skipped, 1 when any failed, 2 for a usage error.
    """
    import json

    from . import batch as batching
    from .jobs import RenderJob
    from .progress import BatchProgress

    manifest = None
    if coeffs_globs:
        patterns = list(coeffs_globs) + [str(p) for p in manifest_or_coeffs]  # the shell expanded the glob
        if not source:
            raise click.UsageError("--coeffs needs --source FACE (the face of every clip)")
        try:
            rows = batching.rows_from_globs(patterns, source)
        except batching.ManifestError as exc:
            raise click.UsageError(str(exc)) from None
        prefix = "row"  # as in a manifest: row N is the N-th file matched
    else:
        if len(manifest_or_coeffs) != 1:
            raise click.UsageError("give one MANIFEST (.csv or .jsonl), or --coeffs GLOB --source FACE")
        manifest = manifest_or_coeffs[0]
        if not manifest.is_file():
            raise click.UsageError(f"{manifest}: no such manifest file")
        try:
            rows = batching.read_manifest(manifest, default_source=source)
        except batching.ManifestError as exc:
            raise click.UsageError(str(exc)) from None
        prefix = "row"
    template = RenderJob(coeffs=Path("."), source=Path("."), source_coeffs=source_coeffs, fps=fps,
                         checkpoint_dir=checkpoint_dir, checkpoint=checkpoint, mapping=mapping, config=config,
                         size_px=int(size_px), preprocess=preprocess, still=still, expression_scale=expression_scale,
                         yaw=yaw, pitch=pitch, roll=roll, batch_size=batch_size, device=device, precision=precision,
                         compile=compile_, overwrite=overwrite)
    defaults = batching.BatchDefaults(template, output_dir=output_dir, overwrite=overwrite)
    rows = batching.select_shard(rows, shard)
    checking = _CheckProgress(quiet=quiet or as_json)
    plan = batching.plan_batch(rows, defaults, prefix=prefix, dry_run=dry_run, on_checked=checking)
    checking.end(len(rows))
    progress = BatchProgress(quiet=quiet or as_json)
    if dry_run:
        summary = batching.dry_run_summary(plan)
    else:
        report_file = report_path or batching.default_report_path(manifest, output_dir)
        batching.check_report(report_file, plan, manifest)
        report = batching.ReportFile(report_file)
        settings = batching.renderer_settings(template)
        debug = bool(ctx.meta.get(DEBUG_KEY))
        try:
            backend = _batch_backend(settings, workers, devices, ray_address, debug)
            summary = batching.run_batch(plan, backend, report, progress)
        finally:
            report.close()
    if as_json:
        click.echo(json.dumps(summary.to_dict()))
    elif dry_run:
        counts = summary.counts
        for row in sorted(summary.rows, key=lambda r: r.row):
            if row.status == batching.FAILED:
                click.echo(f"Error: {row.error}", err=True)
        click.echo(f"dry run: {counts.get(batching.TODO, 0)} to do, {counts['skipped']} skipped, "
                   f"{counts['failed']} failed of {len(summary.rows)} rows; nothing rendered", err=quiet)
    else:
        counts = summary.counts
        click.echo(f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed "
                   f"of {len(summary.rows)} rows", err=quiet)
    if not summary.ok:
        ctx.exit(EXIT_ERROR)


class _CheckProgress:
    """`sfr batch` checking its rows (before any model loads): a line on stderr every few seconds,
    "checking rows: 2,400 of 10,000", so a long manifest never looks hung; nothing when quiet."""

    EVERY_SECONDS = 2.0

    def __init__(self, quiet: bool):
        import time

        self.quiet = quiet
        self._clock = time.monotonic
        self._next = self._clock() + self.EVERY_SECONDS
        self.shown = False

    def __call__(self, checked: int, total: int) -> None:
        if self.quiet or self._clock() < self._next:
            return
        self._next = self._clock() + self.EVERY_SECONDS
        self.shown = True
        click.echo(f"checking rows: {checked:,} of {total:,}", err=True)

    def end(self, total: int) -> None:
        if self.shown:
            click.echo(f"checking rows: {total:,} of {total:,}", err=True)


def _batch_backend(settings, workers, devices, ray_address, debug: bool):
    """In-process for one worker on one device; worker processes for more; Ray actors with --ray."""
    from .batch import InProcessBackend

    device_list = [d.strip() for d in devices.split(",") if d.strip()] if devices else None
    if ray_address is not None:
        from .cluster import RayBackend

        return RayBackend(settings, address=ray_address, workers=workers, debug=debug)
    if device_list is None and (settings["device"] in ("auto", "cuda") and workers is None):
        from .workers import visible_cuda_devices

        found = visible_cuda_devices()
        device_list = found if len(found) > 1 else None
    count = workers or (len(device_list) if device_list else 1)
    if count == 1 and not device_list:
        return InProcessBackend(settings, debug=debug)
    from .workers import WorkerPoolBackend

    return WorkerPoolBackend(settings, workers=count, devices=device_list)
@sfr.command("crop-box", context_settings={"max_content_width": 100})
@click.option("--source", required=True, type=click.Path(path_type=Path),
              help="SadTalker's crop PNG (the face it rendered from).")
@click.option("--original", required=True, type=click.Path(path_type=Path),
              help="The original picture SadTalker cropped it from.")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"box": [x1, y1, x2, y2], "exact": ..., "mean_abs_levels": ..., "max_abs_levels": ...}.')
@debug_option
def crop_box(source: Path, original: Path, as_json: bool) -> None:
    """Find and print the box x1,y1,x2,y2 of ORIGINAL that SadTalker resized into the crop --source.

    The box is what `sfr render --crop-box` takes (SadTalker's ox1,oy1,ox2,oy2); keep it to skip the
    search next time.
    """
    import json

    from .stages.paste import describe_match, find_crop_box, format_box

    match = find_crop_box(source, original, "--source", "--original")
    if as_json:
        click.echo(json.dumps({"box": list(match.box), "exact": match.exact,
                               "mean_abs_levels": round(match.mean_abs_levels, 4),
                               "max_abs_levels": match.max_abs_levels}))
    else:
        click.echo(describe_match(match), err=True)
        click.echo(format_box(match.box))


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
