"""One job end to end: the MP4 for the golden-crop inputs, rendered with tiny random weights.

Not the parity test (tests/test_parity.py compares frames with SadTalker's); this one checks the file:
H.264 yuv420p 256x256, 4 frames at 25 fps, faststart, AAC 24000 Hz mono as long as the video, and
nothing else in the output folder.
"""

import re
import struct
import subprocess
from pathlib import Path

import pytest

from sfr_cli.jobs import RenderJob, RenderReport
from sfr_cli.media import count_video_frames, find_ffmpeg
from sfr_cli.progress import SilentReporter
from sfr_cli.models import ModelCache
from sfr_cli.streaming import render_job

FPS = 25.0
FRAMES = 4


def top_level_boxes(path: Path):
    """The MP4's top-level box types in file order."""
    boxes = []
    with open(path, "rb") as stream:
        while True:
            header = stream.read(8)
            if len(header) < 8:
                return boxes
            size, kind = struct.unpack(">I4s", header)
            if size == 1:
                size = struct.unpack(">Q", stream.read(8))[0] - 8
            boxes.append(kind.decode("ascii", "replace"))
            stream.seek(size - 8, 1)


def stream_seconds(ffmpeg: str, path: Path, selector: str) -> float:
    """Decoded length of one stream (`0:v:0` or `0:a:0`) in seconds, from ffmpeg's last `time=`."""
    result = subprocess.run([ffmpeg, "-hide_banner", "-nostdin", "-i", str(path), "-map", selector, "-f", "null", "-"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    hours, minutes, seconds = re.findall(r"time=(\d+):(\d+):([\d.]+)", result.stderr)[-1]
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


@pytest.mark.heavy
def test_golden_crop_inputs_to_mp4(reference_dir, tiny_checkpoints, tmp_path):
    golden = reference_dir / "golden-crop"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / "golden.mp4"
    job = RenderJob(coeffs=golden / "coeffs.mat", source=golden / "source.png",
                    source_coeffs=golden / "source_coeffs.mat", output=output,
                    audio=reference_dir / "sample_speech_24k_mono.wav", fps=FPS,
                    checkpoint_dir=tiny_checkpoints, config="tiny", batch_size=2, device="cpu")
    report = render_job(job, SilentReporter(), ModelCache())

    assert isinstance(report, RenderReport)
    assert report.output == output and report.frames_dir is None and report.frames == FRAMES
    assert report.device == "cpu" and report.precision == "fp32" and report.batch_size == 2
    assert report.notes and not any("first frame" in note for note in report.notes)
    assert sorted(p.name for p in out_dir.iterdir()) == ["golden.mp4"]

    ffmpeg = find_ffmpeg()
    info = subprocess.run([ffmpeg, "-hide_banner", "-nostdin", "-i", str(output)], capture_output=True,
                          text=True).stderr
    video = re.search(r"Stream #0:\d+[^:]*: Video: ([^\n]*)", info).group(1)
    audio = re.search(r"Stream #0:\d+[^:]*: Audio: ([^\n]*)", info).group(1)
    assert video.startswith("h264") and "yuv420p" in video and "256x256" in video and "25 fps" in video, video
    assert audio.startswith("aac") and "24000 Hz" in audio and "mono" in audio, audio
    assert len(re.findall(r"Stream #0:\d+", info)) == 2
    assert count_video_frames(output, ffmpeg) == FRAMES

    boxes = top_level_boxes(output)
    assert "moov" in boxes and boxes.index("moov") < boxes.index("mdat"), boxes  # faststart

    video_seconds = stream_seconds(ffmpeg, output, "0:v:0")
    audio_seconds = stream_seconds(ffmpeg, output, "0:a:0")
    assert video_seconds == pytest.approx(FRAMES / FPS, abs=0.05)
    assert audio_seconds == pytest.approx(video_seconds, abs=0.1)


def test_report_json_has_the_documented_keys():
    import json

    report = RenderReport(output=Path("a.mp4"), frames_dir=None, frames=3, seconds=1.5, frames_per_second=2.0,
                          peak_rss_mib=100.0, peak_cuda_mib=None, device="cpu", precision="fp32", batch_size=2,
                          notes=["x"])
    data = json.loads(report.to_json())
    assert data == {"output": "a.mp4", "frames_dir": None, "frames": 3, "seconds": 1.5, "frames_per_second": 2.0,
                    "peak_rss_mib": 100.0, "peak_cuda_mib": None, "device": "cpu", "precision": "fp32",
                    "batch_size": 2}
