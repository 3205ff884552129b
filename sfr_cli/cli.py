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

from . import __version__, options
from .errors import CheckpointError, SfrError
from .modes import DEFAULT_MODE
from .manifest import parse_shard
from .options import CONFIG_HELP, DEVICE_HELP, OVERWRITE_HELP, BatchSize, ParsedText
from .stages.restorers import ALIASES, ENHANCERS

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
DEBUG_KEY = "sfr.debug"


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
@options.command_options(options.RENDER)
@click.option("--quiet", is_flag=True, help="No progress or notes on stderr.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object with the result and timings (no progress or notes on stderr).")
@debug_option
def render(quiet: bool, as_json: bool, **given) -> None:
    """Render a talking-head MP4 (and/or PNG frames) from coefficients and one source face.

    Prints the MP4 path (or the frames folder when only --frames-dir is given), or with --json one
    JSON object: output, frames_dir, frames, seconds, frames_per_second, peak_rss_mib, peak_cuda_mib,
    device, precision, batch_size (and with --enhancer: enhancer, enhancer_upscale, enhancer_faces,
    enhancer_noise_seed; with --background-enhancer: background_enhancer, background_tiles_computed,
    background_tiles_reused, background_tile_reuse).
    """
    from .renderer import Renderer

    settings = {row.api_name: given[row.name] for row in options.command_rows(options.RENDER, options.SHARED)}
    clip = {row.name: given[row.name] for row in options.command_rows(options.RENDER, options.CLIP)}
    renderer = Renderer(**settings)
    with _reporter(quiet or as_json) as reporter:
        report = renderer.render(reporter=reporter, **clip)
    _print_result(report, as_json)


def _print_result(report, as_json: bool) -> None:
    """stdout's one result: the MP4 path (or the frames folder when only frames were written), or with
    --json the report as one JSON object."""
    if as_json:
        click.echo(report.to_json())
    else:
        click.echo(str(report.output if report.output is not None else report.frames_dir))


def _batch_help() -> str:
    columns = [row.name for row in options.column_rows()]
    required = [name for name in columns if options.row_named(name).required]
    optional = [name for name in columns if name not in required]
    return (f"""Render many clips with models loaded once: MANIFEST (.csv with a header row, or .jsonl) has one row
    per clip ({', '.join(required)}; optional {', '.join(optional)}), or `--coeffs GLOB --source FACE` gives one
    clip per file.

    Rows whose outputs exist are skipped (rerun the same command to resume). Exit 0 when every row is
    done or skipped, 1 when any failed, 2 for a usage error.
    """)


@sfr.command(context_settings={"max_content_width": 100}, help=_batch_help())
@click.argument("manifest_or_coeffs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--coeffs", "coeffs_globs", multiple=True, metavar="GLOB",
              help="Without a manifest: coefficient files, e.g. 'results/*.mat' (quoted, or expanded by the shell).")
@click.option("--source", help="Without a manifest: the source face for every clip (a row's default otherwise).")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), default=".", show_default=True,
              help="Where a row without `output` writes <coeffs stem>.mp4.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Report to append one JSON line per row to [default: <manifest stem>.report.jsonl beside the "
                   "manifest, or sfr-batch.report.jsonl in --output-dir].")
@options.command_options(options.BATCH, options.CLIP)  # defaults for rows that do not say
@options.command_options(options.BATCH, options.SHARED)
@click.option("--workers", type=click.IntRange(min=1),
              help="Worker processes, each loading the models once [default: one per visible GPU, else 1].")
@click.option("--devices", help="GPUs for the workers, e.g. cuda:0,cuda:2 [default: every visible GPU].")
@click.option("--shard", type=ParsedText("K/N", parse_shard), help="Render only shard K of N (rows K, K+N, ...): 1/4, 2/4, ...")
@click.option("--ray", "ray_address", metavar="local|auto|ADDRESS",
              help="Run rows on Ray actors: local (start a local instance), auto or ADDRESS (join a cluster).")
@click.option("--dry-run", is_flag=True, help="Check every row and say what would run; render nothing.")
@click.option("--quiet", is_flag=True, help="No progress on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document at the end: totals and every row.")
@debug_option
@click.pass_context
def batch(ctx: click.Context, manifest_or_coeffs, coeffs_globs, source, output_dir: Path, report_path, workers,
          devices, shard, ray_address, dry_run, quiet, as_json, **given) -> None:
    import json

    from . import batch as batching
    from .manifest import MANIFEST_SUFFIXES, ManifestError, read_manifest, rows_from_globs, select_shard
    from .batch_plan import FAILED, TODO, BatchDefaults, check_report, plan_rows
    from .jobs import RenderJob
    from .progress import BatchProgress

    manifest = None
    if coeffs_globs:
        manifests = [str(p) for p in manifest_or_coeffs if p.suffix.lower() in MANIFEST_SUFFIXES]
        if manifests:
            raise click.UsageError(f"{manifests[0]}: a manifest, given with --coeffs; give either MANIFEST or "
                                   "--coeffs GLOB --source FACE, not both")
        patterns = list(coeffs_globs) + [str(p) for p in manifest_or_coeffs]  # the shell expanded the glob
        if not source:
            raise click.UsageError("--coeffs needs --source FACE (the face of every clip)")
        try:
            rows = rows_from_globs(patterns, source)
        except ManifestError as exc:
            raise click.UsageError(str(exc)) from None
        prefix = "row"  # as in a manifest: row N is the N-th file matched
    else:
        if len(manifest_or_coeffs) != 1:
            raise click.UsageError("give one MANIFEST (.csv or .jsonl), or --coeffs GLOB --source FACE")
        manifest = manifest_or_coeffs[0]
        if not manifest.is_file():
            raise click.UsageError(f"{manifest}: no such manifest file")
        try:
            rows = read_manifest(manifest, default_source=source)
        except ManifestError as exc:
            raise click.UsageError(str(exc)) from None
        prefix = "row"
    template = RenderJob.make(coeffs=Path("."), source=Path("."), **given)  # every row's defaults
    defaults = BatchDefaults(template, output_dir=output_dir, overwrite=template.overwrite)
    rows = select_shard(rows, shard)
    checking = _CheckProgress(quiet=quiet or as_json)
    plan = plan_rows(rows, defaults, prefix=prefix, dry_run=dry_run, on_checked=checking)
    checking.end(len(rows))
    progress = BatchProgress(quiet=quiet or as_json)
    if dry_run:
        summary = batching.dry_run_summary(plan)
    else:
        report_file = report_path or batching.default_report_path(manifest, output_dir)
        check_report(report_file, plan, manifest)
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
            if row.status == FAILED:
                click.echo(f"Error: {row.error}", err=True)
        click.echo(f"dry run: {counts.get(TODO, 0)} to do, {counts['skipped']} skipped, "
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
@sfr.command(context_settings={"max_content_width": 100})
@click.option("--input", "input_path", required=True, type=click.Path(),  # text: "" is refused, not "."
              help="The frames to enhance: a video (SadTalker's result, another tool's) or a folder of pictures.")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="The MP4 to write (default: <input name>_enhanced.mp4 here, unless only --frames-dir is given); "
                   "a video's sound is kept (copied when it is AAC).")
@click.option("--frames-dir", type=click.Path(path_type=Path),
              help="Also (or, without -o, only) write frames as DIR/000000.png, 000001.png, ...")
@click.option("--fps", type=options.CheckedFloat(options.check_fps),
              help="Frames per second of the MP4 [default: the video's own; 25 for a folder].")
@click.option("--enhancer", type=options.ChoiceOrNone(ENHANCERS, ALIASES), default="gfpgan", show_default=True,
              help="The face enhancer: SadTalker's GFPGAN v1.4, or RestoreFormer (-tiny: the same nets at test "
                   "widths; none: no faces restored, e.g. with --background-enhancer alone).")
@options.command_options(options.ENHANCE)
@options.row_named("checkpoint_dir").click_option(options.RENDER)
@click.option("--batch-size", type=BatchSize(), default=None, help="Frames per batch [default: 4 on a CPU, 16 on CUDA].")
@options.row_named("device").click_option(options.RENDER)
@options.row_named("overwrite").click_option(options.RENDER)
@click.option("--quiet", is_flag=True, help="No progress or notes on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the result and timings.")
@debug_option
def enhance(input_path: Path, quiet: bool, as_json: bool, **given) -> None:
    """Run the face enhancer (SadTalker's --enhancer gfpgan) and/or the background enhancer (Real-ESRGAN)
    on frames that already exist.

    The same stage, weights lookup and guarantees as `sfr render --enhancer`: outputs written atomically,
    existing ones refused without --overwrite, every input checked before any model loads. Prints the MP4
    path (or the frames folder), or with --json one JSON object.
    """
    from .enhance_jobs import EnhanceJob, prepare_enhance
    from .models import ModelCache
    from .streaming import render_enhance

    job = EnhanceJob.make(input=input_path, **given)
    with _reporter(quiet or as_json) as reporter:
        report = render_enhance(prepare_enhance(job, reporter.note), reporter, ModelCache())
    _print_result(report, as_json)


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
    """Download SadTalker's weights, write random ones in its layout, or inspect a checkpoint file."""


@checkpoints.command("random")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--config", "config", metavar="NAME|PATH", default="facerender", show_default=True,
              help=CONFIG_HELP)
@click.option("--layout", type=click.Choice(["pth", "safetensors"]), default="pth", show_default=True,
              help="pth: facevid2vid_00189-model.pth.tar; safetensors: SadTalker_V0.0.2_<size>.safetensors.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--size", "size_px", type=click.Choice(["256", "512"]), default="256", show_default=True,
              help="The size in the safetensors file name.")
@click.option("--enhancer/--no-enhancer", default=False, show_default=True,
              help="Also write the enhancers' files (GFPGANv1.4.pth, RestoreFormer.pth, detection_Resnet50_Final.pth, "
                   "parsing_parsenet.pth, RealESRGAN_x2plus.pth), at the config's widths: -tiny for tiny configs.")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@debug_option
def checkpoints_random(out_dir: Path, config: str, layout: str, seed: int, size_px: str, enhancer: bool,
                       overwrite: bool) -> None:
    """Write deterministic random weights under SadTalker's file names into OUT_DIR (the renderer and
    both mapping files; with --enhancer the face enhancer's too). Random weights render abstract frames;
    they are for tests, demos and benches."""
    from .checkpoints import random_checkpoint_paths, write_random_checkpoints
    from .config import config_pair, config_path, load_config
    from .outputs import JobInput, check_output, describe_leftovers, remove_leftovers
    from .stages import enhance as enhance_stage

    model_file = config_path(config)
    config_70, config_73 = config_pair(load_config(model_file))
    paths = random_checkpoint_paths(out_dir, layout=layout, size_px=int(size_px))
    # every restorer's files at the config's widths (gfpgan-tiny for tiny configs): the one enhancer list
    enhancers = enhance_stage.random_weights_names(tiny=config_70.name.startswith("tiny")) if enhancer else {}
    for names in enhancers.values():
        paths += [out_dir / name for name in names if out_dir / name not in paths]
    for path in paths:
        removed = remove_leftovers(path)
        if removed:
            click.echo(describe_leftovers(path, removed), err=True)
        check_output(path, [JobInput(model_file, "--config")], overwrite=overwrite)
    write_random_checkpoints(out_dir, config_70, config_73, layout=layout, seed=seed, size_px=int(size_px))
    for name in enhancers:  # the reference seeds (14: golden-enhance, 39: golden-bg); --seed moves them along
        enhance_stage.write_random_files(out_dir, name, seed)
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
    from .stages import enhance as enhance_stage

    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if enhance_stage.weights_part(path.name) is not None:
        for line in enhance_stage.inspect_weights_file(path):
            click.echo(line)
        return
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


@checkpoints.command("download")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--size", "size_px", type=click.Choice(["256", "512"]), default="256", show_default=True,
              help="Which SadTalker_V0.0.2_<size>.safetensors (the safetensors layout).")
@click.option("--layout", type=click.Choice(["safetensors", "pth"]), default="safetensors", show_default=True,
              help="safetensors: SadTalker_V0.0.2_<size>.safetensors (what SadTalker's script fetches, and all "
                   "SadTalker's own steps need); pth: the older facevid2vid_00189-model.pth.tar.")
@click.option("--enhancer/--no-enhancer", default=False, show_default=True,
              help="Also the face enhancer's GFPGANv1.4.pth, detection_Resnet50_Final.pth, parsing_parsenet.pth.")
@click.option("--restoreformer/--no-restoreformer", default=False, show_default=True,
              help="Also RestoreFormer.pth (SadTalker's --enhancer RestoreFormer), with the detector and parser.")
@click.option("--background-enhancer/--no-background-enhancer", default=False, show_default=True,
              help="Also RealESRGAN_x2plus.pth (SadTalker's --background_enhancer realesrgan).")
@click.option("--enhancer-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the enhancers' files go [default: gfpgan/weights beside OUT_DIR, where SadTalker keeps "
                   "them and sfr looks].")
@click.option("--url", "base_url", envvar="SFR_DOWNLOAD_URL", metavar="BASE_URL",
              help="Fetch every file from BASE_URL/NAME instead of its release URL (a mirror) [env: SFR_DOWNLOAD_URL].")
@click.option("--timeout", "timeout_seconds", type=click.FloatRange(min=0, min_open=True), default=60.0,
              show_default=True, help="Seconds without data before a try fails.")
@click.option("--retries", type=click.IntRange(min=0), default=3, show_default=True,
              help="Tries after the first, each resuming where the last stopped.")
@click.option("--config", "config", metavar="NAME|PATH", default="facerender", show_default=True,
              help="The widths the files are checked against (tiny: test weights).")
@click.option("--overwrite", is_flag=True, help="Download files that are already there again.")
@click.option("--quiet", is_flag=True, help="No progress or notes on stderr.")
@debug_option
def checkpoints_download(out_dir: Path, size_px: str, layout: str, enhancer: bool, restoreformer: bool,
                         background_enhancer: bool, enhancer_dir: Optional[Path], base_url: Optional[str],
                         timeout_seconds: float, retries: int, config: str, overwrite: bool, quiet: bool) -> None:
    """Download SadTalker's weights into OUT_DIR (SadTalker's checkpoints folder): the files and public
    release URLs of SadTalker's scripts/download_models.sh. A partial file is resumed on the next run; each
    file is checked (keys and shapes, no code run) before it gets its name. Prints OUT_DIR."""
    from .download import WeightCheck, choose_files, download_weights, plan_downloads
    from .progress import TransferProgress

    files = choose_files(size_px=int(size_px), layout=layout, enhancer=enhancer, restoreformer=restoreformer,
                         background_enhancer=background_enhancer)
    downloads = plan_downloads(files, out_dir, enhancer_dir, base_url or None)
    check = WeightCheck(config)
    reporter = TransferProgress(quiet=quiet)
    try:
        download_weights(downloads, check, reporter, timeout_seconds=timeout_seconds, retries=retries,
                         overwrite=overwrite)
    finally:
        reporter.finish()
    click.echo(str(out_dir))


@sfr.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False,
                               "max_content_width": 100})
@click.argument("inference_py", type=click.Path(path_type=Path))
@click.argument("flags", nargs=-1, type=click.UNPROCESSED)
@options.row_named("precision").click_option(options.RENDER)
@options.row_named("batch_size").click_option(options.RENDER)
@click.option("--config", "config", metavar="NAME|PATH",
              help=CONFIG_HELP + " [default: SadTalker's own src/config YAML]")
@click.option("--quiet", is_flag=True, help="No render progress on stderr (SadTalker's own output stays).")
@debug_option
def sadtalker(inference_py: Path, flags, precision: str, batch_size: Optional[int], config: Optional[str],
              quiet: bool) -> None:
    """Run SadTalker's own INFERENCE_PY (from your checkout, with its flags after it) with sfr as its face
    renderer: SadTalker's preprocessing and audio-to-coefficients, then sfr's render, paste-back and
    enhancer in one pass; the video lands where SadTalker puts it. sfr's options go before INFERENCE_PY:

    \b
    python -m sfr_cli.sadtalker --precision fp16 SadTalker/inference.py --driven_audio a.wav
    --source_image face.png --enhancer gfpgan
    """
    from .sadtalker import run_inference

    run_inference(inference_py, list(flags), precision=precision, batch_size=batch_size, config=config,
                  quiet=quiet)


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
