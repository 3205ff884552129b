"""Frames against SadTalker's own renders, with the full-size model on the CPU: golden-crop (crop mode)
and golden-paste's renderer frames (full mode, 73 coefficients, before paste-back).

The golden cases were rendered by SadTalker's face-render code from deterministic random weights
written by ``make_reference_checkpoint.py --seed 0``; these tests write the same weights in both on-disk
layouts and judge every render by SadTalker's own batch noise (``conftest.assert_frames_close``: max 1
uint8 level, at most 0.5 % of values off by one; measured: max 1 level on 0.15-0.27 % of values).
Full-size frames take seconds each here, so each render is a few frames and runs once.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REFERENCE_DIR, REFERENCE_SKIP, assert_frames_close, to_uint8
from sfr_cli.checkpoints import find_checkpoints, load_networks
from sfr_cli.coeffs import prepare_semantics, read_coefficients, read_source_coefficients
from sfr_cli.config import CONFIG_DIR, load_config
from sfr_cli.engine import Engine, EngineOptions
from sfr_cli.media import read_source_image

REFERENCE = REFERENCE_DIR
GOLDEN = REFERENCE / "golden-crop"
GOLDEN_FULL = REFERENCE / "golden-paste"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not GOLDEN.is_dir(), reason=REFERENCE_SKIP),
]


def write_reference_checkpoints(out_dir: Path, layout: str) -> Path:
    subprocess.run([sys.executable, str(REFERENCE / "make_reference_checkpoint.py"), str(out_dir),
                    "--layout", layout, "--seed", "0"], check=True)
    return out_dir


@pytest.fixture(scope="module")
def reference_pth(tmp_path_factory):
    return write_reference_checkpoints(tmp_path_factory.mktemp("ck_pth"), "pth")


@pytest.fixture(scope="module")
def reference_safetensors(tmp_path_factory):
    return write_reference_checkpoints(tmp_path_factory.mktemp("ck_safetensors"), "safetensors")


def golden_frames(golden=GOLDEN):
    return np.stack([np.asarray(Image.open(p)) for p in sorted((golden / "frames").glob("*.png"))])


def assert_matches_golden(frames, golden=GOLDEN):
    expected = golden_frames(golden)
    assert len(frames) == len(expected) == (4 if golden == GOLDEN else 3)
    assert all(frame.shape == (256, 256, 3) and frame.dtype == np.uint8 for frame in frames)
    assert_frames_close(np.stack(frames), expected, f"{golden.name}: sfr's frames against SadTalker's")


def golden_job(engine):
    semantics = prepare_semantics(read_coefficients(GOLDEN / "coeffs.mat"),
                                  read_source_coefficients(GOLDEN / "source_coeffs.mat"))
    source = engine.prepare_source(read_source_image(GOLDEN / "source.png", 256), semantics.source_window())
    return source, semantics


@pytest.fixture(scope="module")
def pth_engine(reference_pth):
    config = load_config(CONFIG_DIR / "facerender.yaml")
    nets = load_networks(config, find_checkpoints(reference_pth))
    return Engine(nets, EngineOptions(device="cpu", batch_size=1))


# batch 2 is the out-of-memory test's (4 -> 2, 2) and batch 3 the CLI test's (3, 1): each full-size frame
# costs seconds, so no batch size is rendered twice.
@pytest.mark.parametrize("batch_size", [1, 8])
def test_golden_crop_at_every_batch_size(pth_engine, batch_size):
    pth_engine.batch_size = batch_size
    source, semantics = golden_job(pth_engine)
    frames = list(pth_engine.render(source, semantics))
    assert pth_engine.stats.batch_sizes[-((4 + batch_size - 1) // batch_size):] == \
        [min(batch_size, 4 - i) for i in range(0, 4, batch_size)]
    assert_matches_golden(frames)


def test_golden_crop_through_simulated_out_of_memory(pth_engine, monkeypatch):
    """Batch 4 runs out of memory once: the engine retries the same frames at 2, then carries on at 2."""
    calls = []
    real = Engine.launch_batch

    def flaky(self, source, windows, *poses, **kwargs):
        calls.append(len(windows))
        if len(windows) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, source, windows, *poses, **kwargs)

    monkeypatch.setattr(Engine, "launch_batch", flaky)
    pth_engine.batch_size = 4
    source, semantics = golden_job(pth_engine)
    frames = list(pth_engine.render(source, semantics))
    assert calls == [4, 2, 2]
    assert_matches_golden(frames)


@pytest.mark.parametrize("layout", ["pth", "safetensors"])
def test_golden_crop_cli_batch_size_3(layout, request, tmp_path):
    """The issue's own command: PNG frames at batch size 3, from either on-disk layout."""
    from click.testing import CliRunner

    from sfr_cli.cli import sfr

    checkpoint_dir = request.getfixturevalue(f"reference_{layout}")
    if layout == "safetensors":
        assert (checkpoint_dir / "SadTalker_V0.0.2_256.safetensors").is_file()
        assert not (checkpoint_dir / "facevid2vid_00189-model.pth.tar").exists()
    out = tmp_path / "frames"
    result = CliRunner().invoke(sfr, [
        "render", "--coeffs", str(GOLDEN / "coeffs.mat"), "--source-coeffs", str(GOLDEN / "source_coeffs.mat"),
        "--source", str(GOLDEN / "source.png"), "--checkpoint-dir", str(checkpoint_dir),
        "--frames-dir", str(out), "--batch-size", "3", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    assert_matches_golden([np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))])


def test_golden_float_prediction_of_plain_modules(reference_pth):
    """The plain modules (no inference rewrites) against SadTalker's float output, frame 0."""
    config = load_config(CONFIG_DIR / "facerender.yaml")
    engine = Engine(load_networks(config, find_checkpoints(reference_pth)),
                    EngineOptions(device="cpu", batch_size=1, optimize=False))
    source, semantics = golden_job(engine)
    frame = engine.render_batch(source, semantics.windows(0, 1))[0]
    expected = to_uint8(np.load(GOLDEN / "frames_float.npy")[:1])[0]
    assert_frames_close(frame, expected, "plain modules frame 0 against SadTalker's float prediction")


@pytest.mark.skipif(not GOLDEN_FULL.is_dir(), reason=REFERENCE_SKIP)
def test_golden_full_mode_frames(reference_pth):
    """Full mode: the 73-coefficient mapping (mapping_00109), the source's 3 crop columns appended to every
    driving frame; golden-paste/frames are SadTalker's renderer output before paste-back."""
    config = load_config(CONFIG_DIR / "facerender_still.yaml")
    engine = Engine(load_networks(config, find_checkpoints(reference_pth, preprocess="full")),
                    EngineOptions(device="cpu", batch_size=2))
    semantics = prepare_semantics(read_coefficients(GOLDEN_FULL / "coeffs.mat"),
                                  read_source_coefficients(GOLDEN_FULL / "source_coeffs.mat"), preprocess="full")
    assert semantics.coeff_count == 73
    source = engine.prepare_source(read_source_image(GOLDEN_FULL / "source.png", 256), semantics.source_window())
    assert_matches_golden(list(engine.render(source, semantics)), GOLDEN_FULL)
