"""Issue 17, point 8: names ffmpeg could read as a protocol (`take:2.wav`, `2025-01-01T10:30.mp4`) are
plain files to sfr: probed, muxed and written as named, relative or absolute."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from sfr_cli import media
from sfr_cli.cli import sfr

from conftest import DEMO_COEFFS, SOURCE
from test_media import HEIGHT_PX, WIDTH_PX, audio_seconds, frames, write_wav

COLON_NAMES = ["2025-01-01T10:30.mp4", "take:2.mp4", "a:b:c.mp4"]


@pytest.mark.heavy
@pytest.mark.parametrize("name", COLON_NAMES)
def test_mp4_writer_probe_and_count_take_colon_names_relative_and_absolute(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    audio = write_wav(tmp_path / "take:2.wav", 1.0)
    for target, sound in ((name, "take:2.wav"), (tmp_path / f"abs-{name}", audio)):
        assert media.probe_audio(sound).codec == "pcm_s16le"
        with media.Mp4Writer(target, width_px=WIDTH_PX, height_px=HEIGHT_PX, audio=sound, frame_count=5) as writer:
            for frame in frames(5):
                writer.write(frame)
        assert media.count_video_frames(target) == 5
        assert audio_seconds(tmp_path / target, 24000) == pytest.approx(5 / 25, abs=0.03)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"abs-{name}", name, "take:2.wav"])


@pytest.mark.heavy
def test_sfr_render_writes_every_colon_name_it_is_given(tmp_path, monkeypatch, tiny_checkpoints):
    """-o, --audio, --coeffs, --source-coeffs, --source and --frames-dir, each with a colon, relative to
    the working folder (where ffmpeg took them for protocols) and the MP4 is complete, with its audio."""
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "clip:1.npy", np.load(DEMO_COEFFS)[:3])
    np.save(tmp_path / "own:1.npy", np.load(DEMO_COEFFS)[5:6])
    (tmp_path / "face:1.png").write_bytes(SOURCE.read_bytes())
    write_wav(tmp_path / "take:2.wav", 1.0)
    args = ["render", "--coeffs", "clip:1.npy", "--source", "face:1.png", "--source-coeffs", "own:1.npy",
            "--audio", "take:2.wav", "-o", "2025-01-01T10:30.mp4", "--frames-dir", "frames:1",
            "--checkpoint-dir", str(tiny_checkpoints), "--config", "tiny", "--batch-size", "2", "--json"]
    result = CliRunner().invoke(sfr, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["output"] == "2025-01-01T10:30.mp4" and report["frames"] == 3
    assert media.count_video_frames(tmp_path / "2025-01-01T10:30.mp4") == 3
    assert audio_seconds(tmp_path / "2025-01-01T10:30.mp4", 24000) == pytest.approx(3 / 25, abs=0.03)
    assert len(media.existing_frames(tmp_path / "frames:1")) == 3
    assert not [p.name for p in tmp_path.iterdir() if ".sfr-" in p.name]  # no temporary, no lock
