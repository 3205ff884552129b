"""`sfr enhance`'s inputs (issue 24): the input folder is never an output, real-world videos (joined, looped,
rotated, odd names) enhance, `--fps` never cuts the kept sound, and every message says what happened."""

import os
import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from sfr_cli import media
from sfr_cli.cli import sfr
from sfr_cli.media import count_video_frames

from conftest import assert_user_error

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


def make_video(path: Path, *, size="32x32", seconds=0.2, audio_seconds=None, extra=()):
    """A small H.264 test pattern (with a sine as AAC sound when `audio_seconds`), by the bundled ffmpeg."""
    command = [FFMPEG, "-y", "-loglevel", "error", "-f", "lavfi", "-i", f"testsrc=size={size}:rate=25:duration={seconds}"]
    if audio_seconds is not None:
        command += ["-f", "lavfi", "-i", f"sine=duration={audio_seconds}", "-c:a", "aac"]
    command += [*extra, "-pix_fmt", "yuv420p", "-c:v", "libx264", "file:" + str(path)]
    subprocess.run(command, check=True)
    return path


def make_frames(folder: Path, names, size=16):
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        Image.fromarray(np.full((size, size, 3), 10 * k, np.uint8)).save(folder / name)
    return folder


def enhance_args(weights, *extra):
    return ["enhance", "--enhancer", "gfpgan-tiny", "--enhancer-dir", str(weights), "--device", "cpu",
            "--enhancer-upscale", "1", *extra]


def snapshot(folder: Path):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------------------------------
# Case 1: the input folder is never the output folder


@pytest.mark.parametrize("spelling", ["same", "dot", "parent", "symlink"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_case1_frames_dir_that_is_the_input_folder_is_refused(runner, tiny_enhancer_weights, tmp_path, spelling,
                                                                 overwrite, no_model_load):
    frames = make_frames(tmp_path / "x" / "f", ["000000.png", "000001.png"])
    before = snapshot(frames)
    out = {"same": frames, "dot": frames / ".", "parent": frames / ".." / ".." / "x" / "f",
           "symlink": tmp_path / "link"}[spelling]
    if spelling == "symlink":
        out.symlink_to(frames)
    result = runner.invoke(sfr, enhance_args(tiny_enhancer_weights, "--input", str(frames), "--frames-dir", str(out),
                                             *(["--overwrite"] if overwrite else [])))
    assert_user_error(result, None, "is the --input folder", "choose another --frames-dir")
    assert "earlier render" not in result.stderr
    assert snapshot(frames) == before


def test_case1_other_frame_names_in_the_input_folder_are_refused_too(runner, tiny_enhancer_weights, tmp_path,
                                                                     no_model_load):
    frames = make_frames(tmp_path / "f", ["a.png", "b.png"])
    result = runner.invoke(sfr, enhance_args(tiny_enhancer_weights, "--input", str(frames), "--frames-dir", str(frames)))
    assert_user_error(result, None, "is the --input folder")
    assert sorted(p.name for p in frames.iterdir()) == ["a.png", "b.png"]


# ---------------------------------------------------------------------------------------------------
# Case 3: joined and looped videos enhance; the count cannot throw the work away


@pytest.mark.heavy
@pytest.mark.parametrize("kind", ["joined", "looped"])
def test_case3_joined_and_looped_videos_enhance(runner, tiny_enhancer_weights, tmp_path, kind):
    clip = make_video(tmp_path / "c.mp4", seconds=0.6, audio_seconds=0.65)
    video = tmp_path / f"{kind}.mp4"
    if kind == "joined":
        listing = tmp_path / "list.txt"
        listing.write_text(f"file '{clip}'\nfile '{clip}'\nfile '{clip}'\n")
        command = ["-f", "concat", "-safe", "0", "-i", str(listing)]
    else:
        command = ["-stream_loop", "3", "-i", str(clip)]
    subprocess.run([FFMPEG, "-y", "-loglevel", "error", *command, "-c", "copy", str(video)], check=True)
    packets = count_video_frames(video)
    result = runner.invoke(sfr, enhance_args(tiny_enhancer_weights, "--input", str(video), "-o", str(tmp_path / "o.mp4"),
                                             "--frames-dir", str(tmp_path / "of")))
    assert result.exit_code == 0, result.output
    assert "coefficient" not in result.output
    assert count_video_frames(tmp_path / "o.mp4") == packets
    assert len(list((tmp_path / "of").iterdir())) == packets


def test_case3_a_count_that_differs_at_the_end_keeps_the_work(tmp_path):
    """`sfr enhance`'s sinks take the frames the decoder gave, whatever was counted beforehand."""
    from sfr_cli.media import ClipSinks

    sinks = ClipSinks(output=tmp_path / "o.mp4", frames_dir=tmp_path / "f", width_px=16, height_px=16, frame_count=5,
                      exact_count=False)
    for _ in range(3):
        sinks.put(np.zeros((16, 16, 3), np.uint8))
    assert sinks.commit() == 3
    assert count_video_frames(tmp_path / "o.mp4") == 3 and len(list((tmp_path / "f").iterdir())) == 3


# ---------------------------------------------------------------------------------------------------
# Case 4: --fps with the kept sound is refused


def test_case4_fps_with_kept_sound_is_refused(runner, tiny_enhancer_weights, tmp_path, no_model_load):
    video = make_video(tmp_path / "v.mp4", audio_seconds=0.2)
    out = tmp_path / "out"
    out.mkdir()
    result = runner.invoke(sfr, enhance_args(tiny_enhancer_weights, "--input", str(video), "-o", str(out / "o.mp4"),
                                             "--fps", "50"))
    assert_user_error(result, out, "--fps 50", "sound", "Drop --fps")


# ---------------------------------------------------------------------------------------------------
# Case 5: every path reaches ffmpeg as file:PATH, decoding included; case 12/15: progress in a log


@pytest.mark.heavy
def test_case5_odd_names_are_the_files_they_name(runner, tiny_enhancer_weights, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SFR_PROGRESS_SECONDS", "0")
    make_video(tmp_path / "b.mp4", size="48x48", seconds=0.2)  # 5 frames, 48 px
    make_video(tmp_path / "file:b.mp4", size="32x32", seconds=0.12)  # 3 frames, 32 px
    make_video(tmp_path / "concat:a.mp4", size="32x32", seconds=0.08)  # 2 frames
    result = runner.invoke(sfr, enhance_args(tiny_enhancer_weights, "--input", "file:b.mp4", "--frames-dir", "fb"))
    assert result.exit_code == 0, result.output
    assert [np.asarray(Image.open(p)).shape for p in sorted(Path("fb").iterdir())] == [(32, 32, 3)] * 3
    # case 12 and 15: a stderr that is no terminal gets progress lines, the enhancer's words, no batch size
    assert "enhancing: 3/3 frames" in result.stderr and "frames/s, ETA" in result.stderr, result.stderr
    assert "rendering" not in result.stderr and "batch size" not in result.stderr
    result = runner.invoke(sfr, enhance_args(tiny_enhancer_weights, "--input", "concat:a.mp4", "--frames-dir", "fa"))
    assert result.exit_code == 0, result.output
    assert len(list(Path("fa").iterdir())) == 2


# ---------------------------------------------------------------------------------------------------
# Case 6: frames numbered without padding keep their order


def test_case6_unpadded_frame_numbers_sort_as_numbers(tmp_path):
    folder = make_frames(tmp_path / "f", [f"frame{k}.png" for k in (1, 2, 10, 11, 3, 9)])
    assert [p.name for p in media.FrameSource(folder).files] == [f"frame{k}.png" for k in (1, 2, 3, 9, 10, 11)]


# ---------------------------------------------------------------------------------------------------
# Case 15: messages


def test_case15_tiny_weights_name_the_enhancer_not_a_config(runner, tiny_enhancer_weights, tmp_path, no_model_load):
    frames = make_frames(tmp_path / "f", ["0.png"])
    result = runner.invoke(sfr, ["enhance", "--input", str(frames), "--enhancer-dir", str(tiny_enhancer_weights),
                                 "--frames-dir", str(tmp_path / "o"), "--device", "cpu"])
    assert_user_error(result, None, "--enhancer gfpgan-tiny")
    assert "--config" not in result.stderr


def test_case15_an_empty_input_is_refused_and_a_dot_names_its_folder(runner, tiny_enhancer_weights, tmp_path,
                                                                    monkeypatch, no_model_load):
    from sfr_cli.enhance_jobs import default_enhanced_name

    monkeypatch.chdir(make_frames(tmp_path / "takes", ["0.png"]))
    result = runner.invoke(sfr, enhance_args(tiny_enhancer_weights, "--input", ""))
    assert_user_error(result, None, "--input is empty")
    assert default_enhanced_name(Path(".")) == Path("takes_enhanced.mp4")
    assert default_enhanced_name(Path("clip.mp4")) == Path("clip_enhanced.mp4")


def test_case15_a_sound_file_has_no_video_stream(runner, tiny_enhancer_weights, reference_dir, tmp_path, no_model_load):
    out = tmp_path / "out"
    out.mkdir()
    result = runner.invoke(sfr, enhance_args(tiny_enhancer_weights, "--input", str(reference_dir / "sample_speech_24k_mono.wav"),
                                             "-o", str(out / "o.mp4")))
    assert_user_error(result, out, "no video stream")
    assert "Error opening output" not in result.stderr


# ---------------------------------------------------------------------------------------------------
# Case 16: a rotated video's warning, once, and never under --quiet


@pytest.mark.heavy
def test_case16_a_rotated_video_is_said_once_and_not_under_quiet(runner, tiny_enhancer_weights, tmp_path):
    plain = make_video(tmp_path / "w.mp4", size="32x16", seconds=0.08)
    rotated = tmp_path / "r.mp4"
    subprocess.run([FFMPEG, "-y", "-loglevel", "error", "-display_rotation", "90", "-i", str(plain), "-c", "copy",
                    str(rotated)], check=True)
    loud = runner.invoke(sfr, enhance_args(tiny_enhancer_weights, "--input", str(rotated), "--frames-dir",
                                           str(tmp_path / "a")))
    assert loud.exit_code == 0, loud.output
    assert loud.stderr.count("turned upright") == 1 and "frame size for reading" not in loud.stderr
    assert [np.asarray(Image.open(p)).shape for p in sorted((tmp_path / "a").iterdir())] == [(32, 16, 3)] * 2
    quiet = runner.invoke(sfr, enhance_args(tiny_enhancer_weights, "--input", str(rotated), "--frames-dir",
                                            str(tmp_path / "b"), "--quiet"))
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == ""
