"""Issue 24, "Nothing lost, part two", beyond `sfr enhance`'s inputs (tests/test_enhance_inputs.py): every file
a job reads is an input, the API checks its keywords as the CLI, sizes and rates the encoder cannot take are
refused first, the drawn noise seed is reported, the enhancer's options are never ignored in silence."""

import builtins
import errno
import io
import json
import os
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from sfr_cli import batch_plan
from sfr_cli import manifest as manifests
from sfr_cli import media
from sfr_cli.cli import sfr
from sfr_cli.errors import CheckpointError, ConfigError, MediaError
from sfr_cli.jobs import RenderJob, job_inputs
from sfr_cli.stages import enhance as enhance_stage
from sfr_cli.stages import paste as paste_stage

from conftest import assert_user_error

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def golden(reference_dir):
    return reference_dir / "golden-crop"


def manifest_for(golden, folder: Path, extra_columns: str = "", extra_cells: str = "", rows: int = 1) -> Path:
    manifest = folder / "m.csv"
    lines = [f"coeffs,source,source_coeffs,frames_dir{extra_columns}"]
    lines += [f"{golden / 'coeffs.mat'},{golden / 'source.png'},{golden / 'source_coeffs.mat'},{folder / f'f{k}'}"
              f"{extra_cells}" for k in range(rows)]
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


# ---------------------------------------------------------------------------------------------------
# Case 2: every file a job reads, whatever stage reads it, is an input for the clash checks


def test_case2_each_stage_lists_the_files_it_reads(tiny_enhancer_weights, tmp_path):
    job = RenderJob.make(coeffs=Path("c.mat"), source=Path("crop.png"), paste_into=Path("full.jpg"),
                         enhancer="gfpgan-tiny", enhancer_dir=tiny_enhancer_weights)
    weights = [tiny_enhancer_weights / name for name in ("GFPGANv1.4.pth", "detection_Resnet50_Final.pth",
                                                         "parsing_parsenet.pth")]
    assert paste_stage.input_files(job.stages["paste"], job) == [(Path("full.jpg"), "--paste-into"),
                                                                 (Path("crop.png"), "--source")]
    assert [path for path, _ in enhance_stage.input_files(job.stages["enhance"], job)] == weights
    listed = [item.path for item in job_inputs(job)]
    assert all(path in listed for path in weights) and listed.count(Path("crop.png")) == 1


@pytest.mark.parametrize("name", ["GFPGANv1.4.pth", "detection_Resnet50_Final.pth", "parsing_parsenet.pth"])
def test_case2_a_batch_report_onto_the_enhancer_weights_is_refused(runner, golden, tiny_checkpoints,
                                                                   tiny_enhancer_weights, tmp_path, name, no_model_load):
    weights = tmp_path / "w"
    shutil.copytree(tiny_enhancer_weights, weights)
    before = (weights / name).read_bytes()
    manifest = manifest_for(golden, tmp_path)
    result = runner.invoke(sfr, ["batch", str(manifest), "--config", "tiny", "--checkpoint-dir", str(tiny_checkpoints),
                                 "--device", "cpu", "--enhancer", "gfpgan-tiny", "--enhancer-dir", str(weights),
                                 "--report", str(weights / name)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "choose another --report PATH" in result.stderr
    assert (weights / name).read_bytes() == before


def test_case2_a_batch_report_onto_a_full_mode_rows_mapping_file_is_refused(runner, golden, tiny_checkpoints, tmp_path,
                                                                            no_model_load):
    checkpoints = tmp_path / "ck"
    shutil.copytree(tiny_checkpoints, checkpoints)
    full = next(checkpoints.glob("mapping_00109*"))
    before = full.read_bytes()
    coeffs = tmp_path / "c.npy"
    np.save(coeffs, np.zeros((2, 73), np.float32))
    manifest = tmp_path / "m.csv"
    manifest.write_text("coeffs,source,frames_dir,preprocess\n"
                        f"{golden / 'coeffs.mat'},{golden / 'source.png'},{tmp_path / 'a'},crop\n"
                        f"{coeffs},{golden / 'source.png'},{tmp_path / 'b'},full\n")
    result = runner.invoke(sfr, ["batch", str(manifest), "--config", "tiny", "--checkpoint-dir", str(checkpoints),
                                 "--device", "cpu", "--report", str(full)])
    assert result.exit_code == 1 and "choose another --report PATH" in result.stderr, result.output
    assert full.read_bytes() == before


# ---------------------------------------------------------------------------------------------------
# Case 7: the Python API checks every keyword as the CLI does


def test_case7_the_api_checks_keywords_from_the_option_table(tiny_checkpoints, golden):
    from sfr_cli import Renderer

    renderer = Renderer(checkpoint_dir=tiny_checkpoints, config="tiny", device="cpu")
    job = renderer.job(golden / "coeffs.mat", golden / "source.png", crop_box="0,0,100,100")
    assert job.option("crop_box") == (0, 0, 100, 100)
    assert renderer.job(golden / "coeffs.mat", golden / "source.png",
                        crop_box=[0, 0, 90, 100]).option("crop_box") == (0, 0, 90, 100)
    for keyword, value, needle in (("crop_box", (10, 10, 5, 5), "x2 must exceed x1"), ("enhancer_seed", "x", "x"),
                                   ("enhancer_seed", 1.5, "whole number"), ("enhancer_upscale", True, "True"),
                                   ("still", "yes", "True or False"), ("fps", 0, "above 0"),
                                   ("enhancer", "gfpgan-huge", "gfpgan-huge")):
        with pytest.raises(ConfigError, match=re.escape(keyword)) as caught:
            renderer.job(golden / "coeffs.mat", golden / "source.png", **{keyword: value})
        assert needle in str(caught.value)
    with pytest.raises(ConfigError, match="precision"):
        Renderer(checkpoint_dir=tiny_checkpoints, precision="fp8")
    with pytest.raises(ConfigError, match="compile"):
        Renderer(checkpoint_dir=tiny_checkpoints, compile="no")


# ---------------------------------------------------------------------------------------------------
# Case 8: sizes and rates the encoder cannot take are refused before the model loads


@pytest.mark.parametrize("option,value", [("--crop-box", "0,0,3,1000000"), ("--crop-box", "0,0,10,1000"),
                                          ("--crop-box", "0,0,1000,10"), ("--fps", "1e-9"), ("--fps", "0.001")])
def test_case8_sizes_and_rates_the_encoder_cannot_take_are_usage_errors(runner, golden, tiny_checkpoints, tmp_path,
                                                                        option, value, no_model_load):
    out = tmp_path / "out"
    out.mkdir()
    result = runner.invoke(sfr, ["render", "--coeffs", str(golden / "coeffs.mat"), "--source", str(golden / "source.png"),
                                 "--config", "tiny", "--checkpoint-dir", str(tiny_checkpoints), "-o",
                                 str(out / "x.mp4"), option, value])
    assert_user_error(result, out, option, exit_code=2)


def test_case8_libx264s_largest_side_is_the_limit(tmp_path):
    """16384 px a side encodes (odd sizes are padded to even first); one more is refused before anything runs."""
    from sfr_cli.jobs import check_encodable_size

    check_encodable_size(16383, 3)
    with media.Mp4Writer(tmp_path / "wide.mp4", width_px=media.MAX_SIDE_PX, height_px=2, fps=25, pad_odd=True) as writer:
        writer.write(np.zeros((2, media.MAX_SIDE_PX, 3), np.uint8))
    assert media.count_video_frames(tmp_path / "wide.mp4") == 1
    for width, height in ((16385, 2), (2, 16386)):
        with pytest.raises(MediaError, match="too large for an H.264 MP4"):
            check_encodable_size(width, height)


# ---------------------------------------------------------------------------------------------------
# Case 9: a drawn noise seed is reported by sfr batch and by Renderer.frames


@pytest.mark.heavy
def test_case9_the_drawn_seed_is_in_the_batch_report_and_the_frames(runner, golden, tiny_checkpoints,
                                                                   tiny_enhancer_weights, tmp_path):
    from sfr_cli import Renderer

    manifest = manifest_for(golden, tmp_path)
    report = tmp_path / "report.jsonl"
    result = runner.invoke(sfr, ["batch", str(manifest), "--config", "tiny", "--checkpoint-dir", str(tiny_checkpoints),
                                 "--device", "cpu", "--enhancer", "gfpgan-tiny", "--enhancer-dir",
                                 str(tiny_enhancer_weights), "--enhancer-upscale", "1", "--enhancer-noise", "random",
                                 "--report", str(report), "--json"])
    assert result.exit_code == 0, result.output
    (line,) = [json.loads(text) for text in report.read_text().splitlines()]
    assert isinstance(line["enhancer_noise_seed"], int)
    assert json.loads(result.stdout)["rows"][0]["enhancer_noise_seed"] == line["enhancer_noise_seed"]
    renderer = Renderer(checkpoint_dir=tiny_checkpoints, config="tiny", device="cpu")
    frames = renderer.frames(golden / "coeffs.mat", golden / "source.png", source_coeffs=golden / "source_coeffs.mat",
                             enhancer="gfpgan-tiny", enhancer_dir=tiny_enhancer_weights, enhancer_upscale=1,
                             enhancer_noise="random", enhancer_seed=7)
    assert frames.stages["enhancer_noise_seed"] == 7
    assert len(list(frames)) == 4


# ---------------------------------------------------------------------------------------------------
# Case 10: a manifest row turns the enhancer off


def test_case10_a_row_turns_the_batch_enhancer_off(tmp_path):
    defaults = batch_plan.BatchDefaults(RenderJob.make(coeffs=Path("."), source=Path("."), enhancer="gfpgan"))
    off = batch_plan.row_job(manifests.ManifestRow(1, {"coeffs": "c.npy", "source": "f.png", "enhancer": "none"}), defaults)
    kept = batch_plan.row_job(manifests.ManifestRow(2, {"coeffs": "c.npy", "source": "f.png"}), defaults)
    assert off.option("enhancer") is None and kept.option("enhancer") == "gfpgan"
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"coeffs": "c.npy", "source": "f.png", "enhancer": null}\n'
                        '{"coeffs": "c.npy", "source": "f.png", "enhancer": "none"}\n')
    rows = manifests.read_manifest(manifest)
    assert [batch_plan.row_job(row, defaults).option("enhancer") for row in rows] == ["gfpgan", None]


# ---------------------------------------------------------------------------------------------------
# Case 11: enhancer options are never ignored in silence


def test_case11_enhancer_options_without_the_enhancer_are_noted(tiny_enhancer_weights, tmp_path, monkeypatch):
    notes = []
    job = RenderJob.make(coeffs=Path("c"), source=Path("s"), enhancer_upscale=1, enhancer_seed=5,
                         enhancer_dir=tmp_path / "missing", enhancer_noise="random")
    assert enhance_stage.plan(job.stages["enhance"], job, 256, notes.append) == []
    assert len(notes) == 1
    for flag in ("--enhancer-upscale", "--enhancer-seed", "--enhancer-dir", "--enhancer-noise", "off"):
        assert flag in notes[0]
    notes.clear()
    monkeypatch.setenv("SFR_ENHANCER_DIR", str(tmp_path / "missing"))
    job = RenderJob.make(coeffs=Path("c"), source=Path("s"), enhancer="gfpgan-tiny",
                         checkpoint_dir=tiny_enhancer_weights, enhancer_seed=5)
    assert len(enhance_stage.plan(job.stages["enhance"], job, 256, notes.append)) == 1
    assert any("SFR_ENHANCER_DIR" in note and "no such folder" in note for note in notes), notes
    assert any("--enhancer-seed 5 ignored" in note for note in notes), notes


def test_case11_one_mechanism_notes_every_enhancer_option_that_does_nothing(monkeypatch):
    """`ignored_options`: the options off while the enhancer is off, the seed without random noise, and random
    noise (with its seed) for a restorer that draws none, each with why."""
    import dataclasses

    from sfr_cli.stages import restorers

    Options = enhance_stage.Options
    assert enhance_stage.ignored_options(Options()) == []
    assert enhance_stage.ignored_options(Options(enhancer="gfpgan", enhancer_noise="random", enhancer_seed=3)) == []
    (flags, why), = enhance_stage.ignored_options(Options(enhancer_upscale=1, enhancer_seed=3))
    assert flags == ["--enhancer-upscale 1", "--enhancer-seed 3"] and "off" in why
    (flags, why), = enhance_stage.ignored_options(Options(enhancer="gfpgan", enhancer_seed=3))
    assert flags == ["--enhancer-seed 3"] and "random only" in why
    quiet = dataclasses.replace(restorers.RESTORERS["gfpgan"], draw_noise=None)
    monkeypatch.setattr(enhance_stage, "restorer_of", lambda name: (quiet, name.endswith("-tiny")))
    (flags, why), = enhance_stage.ignored_options(Options(enhancer="gfpgan", enhancer_noise="random", enhancer_seed=3))
    assert flags == ["--enhancer-noise random", "--enhancer-seed 3"] and why == "the gfpgan enhancer draws no noise"


# ---------------------------------------------------------------------------------------------------
# Case 12: progress in logs


def test_case12_progress_lines_when_stderr_is_no_terminal(monkeypatch):
    from sfr_cli.progress import RichReporter

    monkeypatch.setenv("SFR_PROGRESS_SECONDS", "0")
    console = Console(file=io.StringIO(), width=160, color_system=None, force_terminal=False)
    with RichReporter(console) as reporter:
        reporter.start(6, "rendering")
        for _ in range(3):
            reporter.advance(2)
    lines = [line for line in console.file.getvalue().splitlines() if line]
    assert [line.split(",")[0] for line in lines] == ["rendering: 2/6 frames", "rendering: 4/6 frames",
                                                      "rendering: 6/6 frames"]
    assert all("frames/s" in line and "ETA" in line for line in lines)
    monkeypatch.setenv("SFR_PROGRESS_SECONDS", "3600")
    console = Console(file=io.StringIO(), width=160, color_system=None, force_terminal=False)
    with RichReporter(console) as reporter:
        reporter.start(6)
        reporter.advance(2)
        reporter.advance(4)
    assert console.file.getvalue().count("frames/s") == 1  # the last count only: not a line per batch


@pytest.mark.heavy
def test_case12_sfr_render_prints_progress_lines_in_a_log(runner, golden, tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("SFR_PROGRESS_SECONDS", "0")
    result = runner.invoke(sfr, ["render", "--coeffs", str(golden / "coeffs.mat"), "--source", str(golden / "source.png"),
                                 "--config", "tiny", "--checkpoint-dir", str(tiny_checkpoints), "--device", "cpu",
                                 "--frames-dir", str(tmp_path / "f"), "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "rendering: 2/4 frames" in result.stderr and "rendering: 4/4 frames" in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------------
# Case 13: make demo runs twice


def demo_commands():
    """The `sfr` command lines of the Makefile's demo recipe, continuation lines joined."""
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    recipe = text.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    return [shlex.split(line.strip().split(">")[0])[1:] for line in recipe.splitlines() if line.strip().startswith("$(BIN)/sfr ")]


@pytest.mark.heavy
def test_case13_make_demo_reruns(runner, tmp_path, monkeypatch):
    commands = demo_commands()
    assert [command[0] for command in commands] == ["checkpoints", "render"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    np.save(tmp_path / "demo" / "coeffs.npy", np.load(REPO / "demo" / "coeffs.npy")[:2])  # 2 frames: the same command
    for name in ("source.png", "speech.wav"):
        shutil.copy(REPO / "demo" / name, tmp_path / "demo" / name)
    for attempt in range(2):
        for command in commands:
            args = [arg.replace("$(DEMO_OUT)", "demo-out") for arg in command]
            result = runner.invoke(sfr, args)
            assert result.exit_code == 0, (attempt, args, result.output)
    assert media.count_video_frames(tmp_path / "demo-out" / "demo.mp4") == 2


# ---------------------------------------------------------------------------------------------------
# Case 14: a file sfr may not read is "permission denied", not corrupt


@pytest.fixture
def unreadable(monkeypatch):
    """`unreadable(path)`: opening `path` raises PermissionError(EACCES), as for another user's 0600 file
    (permission bits do not bind root, who runs these tests in CI)."""
    denied = set()
    original = builtins.open

    def guarded(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) in denied:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
        return original(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    return lambda path: denied.add(os.path.abspath(path))


def test_case14_unreadable_weights_and_frames_say_permission_denied(tiny_enhancer_weights, tmp_path, unreadable):
    unreadable(tiny_enhancer_weights / "GFPGANv1.4.pth")
    with pytest.raises(CheckpointError) as caught:
        enhance_stage.read_state_dicts("gfpgan-tiny", enhance_stage.find_weights("gfpgan-tiny", tiny_enhancer_weights))
    assert "permission denied" in str(caught.value) and "corrupt" not in str(caught.value)
    frame = tmp_path / "000000.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(frame)
    unreadable(frame)
    with pytest.raises(MediaError) as caught:
        media.read_picture_uint8(frame, "--input")
    assert "permission denied" in str(caught.value) and "corrupt" not in str(caught.value)


# ---------------------------------------------------------------------------------------------------
# Case 16: small things


def test_case16_a_manifest_with_coeffs_globs_is_a_usage_error(runner, golden, tmp_path, no_model_load):
    manifest = manifest_for(golden, tmp_path)
    result = runner.invoke(sfr, ["batch", str(manifest), "--coeffs", str(tmp_path / "c*.mat"), "--source",
                                 str(golden / "source.png")])
    assert result.exit_code == 2 and "a manifest, given with --coeffs" in result.output, result.output


def test_case16_a_failed_job_leaves_no_folder_it_created(tmp_path):
    from sfr_cli.media import ClipSinks

    sinks = ClipSinks(output=tmp_path / "nd1" / "x.mp4", frames_dir=tmp_path / "nd1" / "fr", width_px=16, height_px=16,
                      frame_count=4)
    sinks.put(np.zeros((16, 16, 3), np.uint8))
    sinks.abort()
    assert list(tmp_path.iterdir()) == []


def test_case16_checkpoints_inspect_reads_the_enhancer_files(runner, tiny_enhancer_weights):
    for name in ("GFPGANv1.4.pth", "detection_Resnet50_Final.pth", "parsing_parsenet.pth"):
        result = runner.invoke(sfr, ["checkpoints", "inspect", str(tiny_enhancer_weights / name)])
        assert result.exit_code == 0, result.output
        assert "face enhancer" in result.stdout and "fits the gfpgan-tiny enhancer" in result.stdout


def test_case16_a_packed_rows_line_shows_its_own_seconds():
    from sfr_cli.progress import BatchProgress

    console = Console(file=io.StringIO(), width=160, color_system=None, force_terminal=False)
    progress = BatchProgress(console)
    progress.begin(3, 12)
    for row, (seconds, own) in enumerate(((45.8, 45.8), (91.2, 45.4), (137.8, 46.6)), start=1):
        progress.settled(batch_plan.RowResult(row, "c.mat", f"c{row}.mp4", "done", frames=4, seconds=seconds,
                                            render_seconds=own))
    shown = re.findall(r"\(4 frames, ([\d.]+) s\)", console.file.getvalue())
    assert shown == ["45.8", "45.4", "46.6"]
