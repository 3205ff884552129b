"""media.py: source image parity with SadTalker's skimage path, PNG frames, and the one-pass ffmpeg MP4."""

import math
import os
import re
import stat
import struct
import subprocess
import sys
import wave

import numpy as np
import psutil
import pytest
from PIL import Image

from sfr_cli import media
from sfr_cli.errors import MediaError

# In the reference folder (the `reference_dir` fixture: ../shared/reference, skipped without it).
FACE_256 = "sample_face_256.png"
FACE_640x896 = "sample_face_640x896.png"
SPEECH_WAV = "sample_speech_24k_mono.wav"

WIDTH_PX, HEIGHT_PX = 64, 48


# ---------------------------------------------------------------------------------------------
# helpers


def frames(count, seed=0):
    """`count` synthetic `(48, 64, 3) uint8` frames: a moving gradient plus noise."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:HEIGHT_PX, 0:WIDTH_PX]
    for index in range(count):
        base = np.stack([(xs * 4 + index * 8) % 256, (ys * 5) % 256, np.full_like(xs, index * 10 % 256)], axis=2)
        noise = rng.integers(-20, 21, size=base.shape)
        yield np.clip(base + noise, 0, 255).astype(np.uint8)


def write_wav(path, seconds, rate_hz=24000, channels=1):
    """A 440 Hz sine, 16-bit PCM."""
    count = int(round(seconds * rate_hz))
    t = np.arange(count) / rate_hz
    samples = (0.3 * 32767 * np.sin(2 * math.pi * 440 * t)).astype("<i2")
    samples = np.repeat(samples[:, None], channels, axis=1)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(channels)
        handle.setsampwidth(2)
        handle.setframerate(rate_hz)
        handle.writeframes(samples.tobytes())
    return path


def ffmpeg_exe():
    return media.find_ffmpeg()


def describe(path):
    """ffmpeg's own description of a file (its stderr for `-i path`)."""
    result = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True)
    return result.stderr


def decoded_frame_count(path):
    result = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-i", str(path), "-map", "0:v:0", "-f", "null", "-"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return int(re.findall(r"frame=\s*(\d+)", result.stderr)[-1])


def audio_seconds(path, rate_hz):
    """Duration of the first audio stream as decoded (edit lists applied): mono s16 samples / rate."""
    result = subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-i", str(path), "-map", "0:a:0", "-ac", "1", "-ar", str(rate_hz),
         "-f", "s16le", "-"],
        capture_output=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return len(result.stdout) / 2 / rate_hz


def top_level_boxes(path):
    """Types of the top-level MP4 boxes, in file order."""
    types = []
    with open(path, "rb") as handle:
        size_total = os.fstat(handle.fileno()).st_size
        offset = 0
        while offset < size_total:
            handle.seek(offset)
            size, kind = struct.unpack(">I4s", handle.read(8))
            if size == 1:
                size = struct.unpack(">Q", handle.read(8))[0]
            elif size == 0:
                size = size_total - offset
            types.append(kind.decode("latin-1"))
            offset += size
    return types


def ffmpeg_children():
    return [
        child
        for child in psutil.Process().children(recursive=True)
        if child.is_running() and child.status() != psutil.STATUS_ZOMBIE and "ffmpeg" in child.name().lower()
    ]


def write_script(path, body):
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def encode(path, count, **options):
    with media.Mp4Writer(path, width_px=WIDTH_PX, height_px=HEIGHT_PX, **options) as writer:
        for frame in frames(count):
            writer.write(frame)
    return path


# ---------------------------------------------------------------------------------------------
# source image


@pytest.mark.parametrize("source", [FACE_256, FACE_640x896], ids=["256", "640x896"])
@pytest.mark.parametrize("size_px", [256, 512])
def test_read_source_image_matches_sadtalker_skimage_path(reference_dir, source, size_px):
    skimage_transform = pytest.importorskip("skimage.transform")
    skimage_util = pytest.importorskip("skimage.util")
    source = reference_dir / source
    expected = skimage_transform.resize(
        skimage_util.img_as_float32(np.array(Image.open(source))), (size_px, size_px, 3)
    ).transpose(2, 0, 1)

    got = media.read_source_image(source, size_px)

    assert got.shape == (3, size_px, size_px)
    assert got.dtype == np.float32
    assert got.flags.c_contiguous
    assert 0.0 <= got.min() and got.max() <= 1.0
    assert np.abs(got - expected).max() <= 1e-6


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "LA"])
def test_read_source_image_converts_modes_to_rgb(tmp_path, mode):
    skimage_transform = pytest.importorskip("skimage.transform")
    rgb = next(frames(1))
    image = Image.fromarray(rgb, "RGB").convert(mode)
    path = tmp_path / "face.png"
    image.save(path)
    expected_rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.float32) / 255
    expected = skimage_transform.resize(expected_rgb, (32, 32, 3)).transpose(2, 0, 1)

    got = media.read_source_image(path, 32)

    assert got.shape == (3, 32, 32) and got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-6


def test_read_source_image_keeps_16_bit_precision(tmp_path):
    skimage_transform = pytest.importorskip("skimage.transform")
    skimage_util = pytest.importorskip("skimage.util")
    gray = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(gray).save(path)
    assert Image.open(path).mode.startswith("I;16")
    expected = skimage_transform.resize(skimage_util.img_as_float32(gray), (40, 40, 3)).transpose(2, 0, 1)

    got = media.read_source_image(path, 40)

    assert np.abs(got - expected).max() <= 1e-6
    assert np.array_equal(got[0], got[2])


def test_read_source_image_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(MediaError, match="missing.png.*not found"):
        media.read_source_image(missing, 256)

    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    with pytest.raises(MediaError, match="notes.png.*not an image"):
        media.read_source_image(text, 256)

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match="empty.png"):
        media.read_source_image(empty, 256)

    truncated = tmp_path / "truncated.png"
    buffer = tmp_path / "full.png"
    Image.fromarray(next(frames(1)), "RGB").save(buffer)
    data = buffer.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="truncated.png"):
        media.read_source_image(truncated, 256)

    with pytest.raises(MediaError, match="folder"):
        media.read_source_image(tmp_path, 256)


# ---------------------------------------------------------------------------------------------
# PNG frames


def test_png_frame_writer_is_lossless_and_numbered(tmp_path):
    folder = tmp_path / "frames"
    originals = list(frames(3))
    with media.PngFrameWriter(folder) as writer:
        for frame in originals:
            writer.write(frame)
    assert writer.frames_written == 3
    assert sorted(os.listdir(folder)) == ["000000.png", "000001.png", "000002.png"]
    for index, frame in enumerate(originals):
        back = np.asarray(Image.open(folder / f"{index:06d}.png"))
        assert back.dtype == np.uint8 and np.array_equal(back, frame)


def test_png_frame_writer_abort_removes_its_frames_and_created_folders(tmp_path):
    folder = tmp_path / "new" / "frames"
    with pytest.raises(RuntimeError):
        with media.PngFrameWriter(folder) as writer:
            for frame in frames(2):
                writer.write(frame)
            raise RuntimeError("render failed")
    assert list(tmp_path.iterdir()) == []


def test_png_frame_writer_abort_keeps_an_existing_folder_and_others_files(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    writer = media.PngFrameWriter(tmp_path)
    writer.write(next(frames(1)))
    writer.abort()
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_png_frame_writer_rejects_bad_folder_and_frames(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MediaError, match="not a folder"):
        media.PngFrameWriter(blocker)
    with pytest.raises(MediaError, match="cannot create"):
        media.PngFrameWriter(blocker / "frames")
    writer = media.PngFrameWriter(tmp_path / "frames")
    with pytest.raises(ValueError, match="uint8"):
        writer.write(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError):
        writer.write(np.zeros((8, 8), np.uint8))


def test_writers_hold_their_targets_lock_while_they_write(tmp_path):
    """A temporary is named from its target alone, so a writer must be its target's only writer: it holds
    the target's lock while it writes (its job's, else its own); another live run's lock refuses it before
    anything is written."""
    from sfr_cli.outputs import OutputBusy, lock_path

    clip, folder = tmp_path / "clip.mp4", tmp_path / "frames"
    writers = [media.Mp4Writer(clip, width_px=WIDTH_PX, height_px=HEIGHT_PX), media.PngFrameWriter(folder)]
    assert lock_path(clip).exists() and lock_path(folder).exists()
    for writer in writers:
        with writer:
            writer.write(next(frames(1)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "frames"]
    code = ("import sys, time\nfrom sfr_cli.outputs import OutputClaim\n"
            f"claims = [OutputClaim(path).acquire() for path in ({str(clip)!r}, {str(folder)!r})]\n"
            "print('held', flush=True)\ntime.sleep(120)\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": repo})
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(OutputBusy, match=f"pid {holder.pid},"):
            media.Mp4Writer(clip, width_px=WIDTH_PX, height_px=HEIGHT_PX)
        with pytest.raises(OutputBusy, match=f"pid {holder.pid},"):
            media.PngFrameWriter(folder)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".clip.mp4.sfr-lock", ".frames.sfr-lock", "clip.mp4",
                                                               "frames"]
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------------------------
# ffmpeg discovery and audio probing


def test_find_ffmpeg_returns_a_working_binary():
    exe = media.find_ffmpeg()
    assert subprocess.run([exe, "-version"], capture_output=True).returncode == 0


def test_broken_ffmpeg_fails_fast_with_its_message(tmp_path, monkeypatch):
    broken = write_script(tmp_path / "ffmpeg", 'echo "libavcodec.so.61: cannot open shared object" >&2\nexit 1\n')
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(broken))
    with pytest.raises(MediaError, match="cannot open shared object"):
        media.find_ffmpeg()
    with pytest.raises(MediaError, match="IMAGEIO_FFMPEG_EXE") as caught:
        media.Mp4Writer(tmp_path / "out.mp4", width_px=WIDTH_PX, height_px=HEIGHT_PX)
    # Fails from its own answer (exit 1 and its message), not by waiting out the -version timeout.
    assert "exit 1" in str(caught.value) and "did not answer" not in str(caught.value)
    assert not isinstance(caught.value.__cause__, subprocess.TimeoutExpired)
    assert list(tmp_path.iterdir()) == [broken] and ffmpeg_children() == []


def test_hanging_ffmpeg_times_out(tmp_path, monkeypatch):
    hanging = write_script(tmp_path / "ffmpeg", "exec sleep 30\n")
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(hanging))
    monkeypatch.setattr(media.ffmpeg, "FFMPEG_VERSION_TIMEOUT_SECONDS", 0.5)
    with pytest.raises(MediaError, match="did not answer"):
        media.find_ffmpeg()


def test_missing_or_not_executable_ffmpeg(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(tmp_path / "nowhere" / "ffmpeg"))
    with pytest.raises(MediaError, match="not found"):
        media.find_ffmpeg()
    plain = tmp_path / "ffmpeg-plain"
    plain.write_text("not a program")
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(plain))
    with pytest.raises(MediaError, match="ffmpeg"):
        media.find_ffmpeg()


def test_probe_audio_reads_rate_and_duration(tmp_path):
    info = media.probe_audio(write_wav(tmp_path / "stereo.wav", 0.5, rate_hz=16000, channels=2))
    assert info.codec == "pcm_s16le"
    assert info.duration_seconds == pytest.approx(0.5, abs=0.01)


def test_probe_audio_on_the_reference_speech(reference_dir):
    info = media.probe_audio(reference_dir / SPEECH_WAV)
    assert info.codec == "pcm_s16le"
    assert info.duration_seconds == pytest.approx(3.0, abs=0.01)


def test_probe_audio_errors(tmp_path):
    with pytest.raises(MediaError, match="missing.wav.*not found"):
        media.probe_audio(tmp_path / "missing.wav")
    text = tmp_path / "speech.wav"
    text.write_text("hello\n" * 100)
    with pytest.raises(MediaError, match="speech.wav.*cannot read"):
        media.probe_audio(text)
    picture = tmp_path / "picture.png"
    Image.fromarray(next(frames(1)), "RGB").save(picture)
    with pytest.raises(MediaError, match="picture.png.*no audio stream"):
        media.probe_audio(picture)


# ---------------------------------------------------------------------------------------------
# MP4 writer


def test_mp4_video_only_has_the_frames_codec_size_fps(tmp_path):
    target = encode(tmp_path / "out.mp4", 10)

    assert os.listdir(tmp_path) == ["out.mp4"]
    info = describe(target)
    assert "Video: h264" in info and "yuv420p" in info
    assert f"{WIDTH_PX}x{HEIGHT_PX}" in info and "25 fps" in info
    assert "Audio:" not in info
    assert decoded_frame_count(target) == 10


def test_mp4_with_longer_audio_is_trimmed_to_the_video(tmp_path):
    audio = write_wav(tmp_path / "speech.wav", 2.0)
    target = encode(tmp_path / "out.mp4", 10, audio=audio, frame_count=10)

    assert sorted(os.listdir(tmp_path)) == ["out.mp4", "speech.wav"]
    info = describe(target)
    assert "Video: h264" in info and "Audio: aac" in info
    assert "24000 Hz" in info and "mono" in info
    assert decoded_frame_count(target) == 10
    assert audio_seconds(target, 24000) == pytest.approx(10 / 25, abs=0.1)


def test_mp4_with_shorter_audio_keeps_every_frame(tmp_path):
    audio = write_wav(tmp_path / "short.wav", 0.2)
    target = encode(tmp_path / "out.mp4", 25, audio=audio, frame_count=25)

    assert decoded_frame_count(target) == 25
    assert audio_seconds(target, 24000) == pytest.approx(0.2, abs=0.1)


def test_mp4_keeps_the_audio_rate_and_channels(tmp_path):
    audio = write_wav(tmp_path / "stereo.wav", 1.0, rate_hz=16000, channels=2)
    info = describe(encode(tmp_path / "out.mp4", 5, audio=audio, frame_count=5))
    assert "Audio: aac" in info and "16000 Hz" in info and "stereo" in info


def test_mp4_is_faststart(tmp_path):
    boxes = top_level_boxes(encode(tmp_path / "out.mp4", 5))
    assert "moov" in boxes and "mdat" in boxes
    assert boxes.index("moov") < boxes.index("mdat")


def test_mp4_exception_in_block_leaves_nothing_and_no_ffmpeg(tmp_path):
    target = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="render failed"):
        with media.Mp4Writer(target, width_px=WIDTH_PX, height_px=HEIGHT_PX) as writer:
            for frame in frames(3):
                writer.write(frame)
            assert ffmpeg_children(), "ffmpeg should be running while frames stream"
            raise RuntimeError("render failed")
    assert list(tmp_path.iterdir()) == []
    assert ffmpeg_children() == []


def test_mp4_keyboard_interrupt_leaves_nothing_and_no_ffmpeg(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with media.Mp4Writer(tmp_path / "out.mp4", width_px=WIDTH_PX, height_px=HEIGHT_PX) as writer:
            writer.write(next(frames(1)))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    assert ffmpeg_children() == []


def test_mp4_abort_leaves_nothing(tmp_path):
    writer = media.Mp4Writer(tmp_path / "out.mp4", width_px=WIDTH_PX, height_px=HEIGHT_PX)
    writer.write(next(frames(1)))
    writer.abort()
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    assert ffmpeg_children() == []


def test_mp4_wrong_frame_count_fails_and_leaves_nothing(tmp_path):
    with pytest.raises(MediaError, match="3 frames were written but 5"):
        encode(tmp_path / "out.mp4", 3, frame_count=5)
    assert list(tmp_path.iterdir()) == []


def test_mp4_no_frames_fails_and_leaves_nothing(tmp_path):
    with pytest.raises(MediaError, match="no frames"):
        encode(tmp_path / "out.mp4", 0)
    assert list(tmp_path.iterdir()) == []


def test_mp4_bad_frame_is_rejected_and_cleaned_up(tmp_path):
    with pytest.raises(ValueError, match=r"\(48, 64, 3\)"):
        with media.Mp4Writer(tmp_path / "out.mp4", width_px=WIDTH_PX, height_px=HEIGHT_PX) as writer:
            writer.write(np.zeros((HEIGHT_PX + 2, WIDTH_PX, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        with media.Mp4Writer(tmp_path / "out.mp4", width_px=WIDTH_PX, height_px=HEIGHT_PX) as writer:
            writer.write(np.zeros((HEIGHT_PX, WIDTH_PX, 3), np.float32))
    assert list(tmp_path.iterdir()) == []
    assert ffmpeg_children() == []


@pytest.mark.parametrize("size", [(63, 48), (64, 47)])
def test_mp4_odd_size_is_rejected_up_front(tmp_path, size):
    width_px, height_px = size
    with pytest.raises(MediaError, match="even width and height"):
        media.Mp4Writer(tmp_path / "out.mp4", width_px=width_px, height_px=height_px)
    assert list(tmp_path.iterdir()) == []


def test_mp4_encoder_failure_reports_ffmpeg_stderr(tmp_path, monkeypatch):
    real = media.find_ffmpeg()
    fake = write_script(
        tmp_path / "ffmpeg",
        f'if [ "$1" = "-version" ]; then exec "{real}" -version; fi\n'
        'echo "Unknown encoder libx264: this build has no H.264" >&2\nexit 1\n',
    )
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(fake))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(MediaError, match="Unknown encoder libx264"):
        encode(out / "video.mp4", 50)
    assert list(out.iterdir()) == []
    assert ffmpeg_children() == []


def test_mp4_missing_audio_is_rejected_up_front(tmp_path):
    with pytest.raises(MediaError, match="nope.wav.*not found"):
        media.Mp4Writer(tmp_path / "out.mp4", width_px=WIDTH_PX, height_px=HEIGHT_PX, audio=tmp_path / "nope.wav")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# output location


def test_check_output_writable(tmp_path):
    media.check_output_writable(tmp_path / "out.mp4")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(MediaError, match="does not exist"):
        media.check_output_writable(tmp_path / "missing" / "out.mp4")
    with pytest.raises(MediaError, match="is a folder"):
        media.check_output_writable(tmp_path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permissions do not bind root")
def test_check_output_writable_read_only_folder(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(MediaError, match="not writable"):
            media.check_output_writable(folder / "out.mp4")
    finally:
        folder.chmod(0o700)


def test_png_frames_are_written_aside_and_committed_as_a_set(tmp_path):
    """Issue 17.4: nothing appears in the target before close(); old frames are replaced only then (a folder
    holding other files keeps them); frames appearing meanwhile are never replaced without overwrite."""
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    for index in range(3):
        (folder / f"{index:06d}.png").write_bytes(b"old")
    writer = media.PngFrameWriter(folder, replace_existing=True)
    for frame in frames(2):
        writer.write(frame)
    assert sorted(p.name for p in folder.iterdir()) == ["000000.png", "000001.png", "000002.png", "keep.txt"]
    assert (folder / "000000.png").read_bytes() == b"old"
    writer.close()
    assert sorted(p.name for p in folder.iterdir()) == ["000000.png", "000001.png", "keep.txt"]
    assert (folder / "000000.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames"]

    other = tmp_path / "other"
    writer = media.PngFrameWriter(other)
    writer.write(next(frames(1)))
    other.mkdir()
    (other / "000000.png").write_bytes(b"another run's")
    with pytest.raises(MediaError, match="appeared there while this job rendered"):
        writer.close()
    assert (other / "000000.png").read_bytes() == b"another run's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames", "other"]
