"""sfr on a CUDA GPU (every test carries the `gpu` marker and skips without CUDA; CI has none).

Every mode and both sizes through `sfr render` against the CPU's frames, each precision, automatic
batch size, a real out-of-memory error (memory held by another tensor) that backs off and loses no
frame, `--compile` with a padded last batch, and the golden case from SadTalker's own renderer with the
reference weights in both on-disk layouts. Figures (frames/s, PSNR per frame) come from `sfr bench`
and scripts/gpu_fidelity.py, not from here.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from sfr_cli.bench import job_inputs
from sfr_cli.checkpoints import find_checkpoints, load_networks, write_random_checkpoints
from sfr_cli.cli import sfr
from sfr_cli.coeffs import prepare_semantics, read_coefficients, read_source_coefficients
from sfr_cli.config import CONFIG_DIR, load_config
from sfr_cli.engine import Engine, EngineOptions, configure_torch
from sfr_cli.media import read_source_image
from sfr_cli.modes import get_mode

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
GOLDEN = REFERENCE / "golden-crop"
FRAMES = 6

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def cuda_configured():
    configure_torch(torch.device("cuda"))


def level_gap(a: np.ndarray, b: np.ndarray):
    """(max level difference, share of values off by one or more)."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return int(diff.max()), float((diff > 0).mean())


def psnr_per_frame(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12))


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu-job")
    rng = np.random.default_rng(5)
    np.save(folder / "coeffs.npy", (0.4 * rng.standard_normal((FRAMES, 70))).astype(np.float32))
    np.save(folder / "source73.npy", (0.4 * rng.standard_normal((1, 73))).astype(np.float32))
    np.save(folder / "source70.npy", np.load(folder / "source73.npy")[:, :70])
    Image.fromarray((rng.random((96, 72, 3)) * 255).astype(np.uint8)).save(folder / "face.png")
    return folder


@pytest.fixture(scope="module")
def checkpoints_by_size(tmp_path_factory):
    folders = {}
    for size in (256, 512):
        folder = tmp_path_factory.mktemp(f"ck{size}")
        write_random_checkpoints(folder, load_config(CONFIG_DIR / "tiny.yaml"),
                                 load_config(CONFIG_DIR / "tiny_still.yaml"), layout="safetensors", size_px=size)
        folders[size] = folder
    return folders


def render(job, checkpoints, out, device, *extra, source_coeffs="source70.npy"):
    args = ["render", "--coeffs", str(job / "coeffs.npy"), "--source-coeffs", str(job / source_coeffs),
            "--source", str(job / "face.png"), "--checkpoint-dir", str(checkpoints), "--config", "tiny",
            "--frames-dir", str(out), "--device", device, "--quiet", *extra]
    result = CliRunner().invoke(sfr, args)
    assert result.exit_code == 0, result.output
    return np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))])


MODES = [("crop", []), ("resize", []), ("extcrop", []), ("full", []), ("extfull", []), ("crop", ["--still"]),
         ("crop", ["--expression-scale", "0.5"]), ("crop", ["--yaw", "0,30", "--pitch", "-10", "--roll", "5,-5"])]


@pytest.mark.parametrize("size", [256, 512])
@pytest.mark.parametrize("preprocess,extra", MODES)
def test_every_mode_and_size_on_cuda_matches_the_cpu(job, checkpoints_by_size, tmp_path, size, preprocess, extra):
    source = f"source{get_mode(preprocess).coeff_count}.npy"
    args = ["--preprocess", preprocess, "--size", str(size), *extra]
    cpu = render(job, checkpoints_by_size[size], tmp_path / "cpu", "cpu", *args, source_coeffs=source)
    cuda = render(job, checkpoints_by_size[size], tmp_path / "cuda", "cuda", *args, "--batch-size", "4",
                  source_coeffs=source)
    assert cuda.shape == cpu.shape == (FRAMES, size, size, 3)
    worst, share = level_gap(cuda, cpu)
    assert worst <= 1 and share <= 0.005, f"{worst} levels, {share:.2%} of values off"


@pytest.mark.parametrize("precision,min_db", [("fp16", 40.0), ("bf16", 35.0)])
def test_reduced_precision_on_cuda_stays_close_to_fp32(job, checkpoints_by_size, tmp_path, precision, min_db):
    """fp16 keeps 40 dB on every frame; bf16 (8-bit mantissa) is looser (README: measured figures)."""
    reference = render(job, checkpoints_by_size[256], tmp_path / "fp32", "cuda")
    frames = render(job, checkpoints_by_size[256], tmp_path / precision, "cuda", "--precision", precision)
    assert psnr_per_frame(frames, reference).min() >= min_db


@pytest.fixture(scope="module")
def tiny_nets(checkpoints_by_size):
    return load_networks(load_config(CONFIG_DIR / "tiny.yaml"), find_checkpoints(checkpoints_by_size[256]))


def render_engine(nets, image, semantics, **options):
    engine = Engine(nets, EngineOptions(device="cuda", **options))
    source = engine.prepare_source(image, semantics.source_window())
    return engine, np.stack(list(engine.render(source, semantics)))


def test_auto_batch_size_is_planned_from_free_memory(tiny_nets):
    image, semantics = job_inputs(70, 40, 256)
    engine, frames = render_engine(tiny_nets, image, semantics)
    assert engine.batch_size == 0  # auto: planned per render, the engine's setting stays "auto"
    assert 2 <= max(engine.stats.batch_sizes) <= 40
    _, single = render_engine(tiny_nets, image, semantics, batch_size=1)
    worst, share = level_gap(frames, single)
    assert worst <= 1 and share <= 0.005


def test_auto_batch_is_planned_per_render_not_frozen_by_the_first(checkpoints_by_size):
    """A Renderer that previews a 1-frame clip first still renders a later 200-frame clip in full batches."""
    from sfr_cli import Renderer

    image, semantics = job_inputs(70, 200, 256)
    coeffs = np.repeat(semantics.windows(0, 200)[:, :, 13], 1, axis=0)
    face = (image.transpose(1, 2, 0) * 255).astype(np.uint8)
    renderer = Renderer(checkpoint_dir=checkpoints_by_size[256], config="tiny", device="cuda")
    assert len(list(renderer.frames(coeffs[:1], face))) == 1
    assert len(list(renderer.frames(coeffs, face))) == 200
    engine, = renderer.models.engines
    assert max(engine.stats.batch_sizes) > 1 and len(engine.stats.batch_sizes) < 200


def test_real_out_of_memory_backs_off_and_loses_no_frame(tiny_nets):
    """Another tensor holds all but room for about 8 frames: batch 64 fails for real, the engine halves
    until a batch fits, and every frame comes out as at batch 8."""
    image, semantics = job_inputs(70, 64, 256)
    engine, reference = render_engine(tiny_nets, image, semantics, batch_size=8)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    engine.render_batch(engine.prepare_source(image, semantics.source_window()), semantics.windows(0, 8))
    eight_frames = torch.cuda.max_memory_allocated() - base
    del engine
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    hold = torch.empty(int(free - 1.5 * eight_frames - 512 * 2 ** 20), dtype=torch.uint8, device="cuda")
    try:
        engine, frames = render_engine(tiny_nets, image, semantics, batch_size=64)
    finally:
        del hold
        torch.cuda.empty_cache()
    assert engine.stats.oom_retries >= 2 and engine.stats.batch_sizes[-1] <= 16
    assert sum(engine.stats.batch_sizes) == 64 and len(frames) == 64
    worst, share = level_gap(frames, reference)
    assert worst <= 1 and share <= 0.005


def test_compile_pads_the_last_batch_instead_of_recompiling(tiny_nets):
    import torch._dynamo

    image, semantics = job_inputs(70, 7, 256)
    _, eager = render_engine(tiny_nets, image, semantics, batch_size=4)
    torch._dynamo.reset()
    torch._dynamo.config.error_on_recompile = True  # the short last batch (3 frames) must not recompile
    try:
        engine, compiled = render_engine(tiny_nets, image, semantics, batch_size=4, compile_scope="decoder")
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert engine.stats.batch_sizes == [4, 3] and len(compiled) == 7
    worst, share = level_gap(compiled, eager)
    assert worst <= 1 and share <= 0.005


@pytest.fixture(scope="module")
def reference_checkpoints(tmp_path_factory):
    if not GOLDEN.is_dir():
        pytest.skip("needs ../shared/reference (CI has it; a user's clone does not)")
    folders = {}
    for layout in ("pth", "safetensors"):
        folder = tmp_path_factory.mktemp(f"ref-{layout}")
        subprocess.run([sys.executable, str(REFERENCE / "make_reference_checkpoint.py"), str(folder),
                        "--layout", layout, "--seed", "0"], check=True)
        folders[layout] = folder
    return folders


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["pth", "safetensors"])
def test_golden_crop_on_cuda(reference_checkpoints, layout):
    """fp32 on CUDA against SadTalker's own frames: max 1 level, at most 0.5 % of values off by one;
    fp16 against fp32 on CUDA: at least 40 dB on every frame."""
    nets = load_networks(load_config(CONFIG_DIR / "facerender.yaml"), find_checkpoints(reference_checkpoints[layout]))
    semantics = prepare_semantics(read_coefficients(GOLDEN / "coeffs.mat"),
                                  read_source_coefficients(GOLDEN / "source_coeffs.mat"))
    image = read_source_image(GOLDEN / "source.png", 256)
    _, fp32 = render_engine(nets, image, semantics, batch_size=2)
    golden = np.stack([np.asarray(Image.open(p)) for p in sorted((GOLDEN / "frames").glob("*.png"))])
    worst, share = level_gap(fp32, golden)
    assert worst <= 1 and share <= 0.005, f"{worst} levels, {share:.2%} of values off"
    _, fp16 = render_engine(nets, image, semantics, batch_size=2, precision="fp16")
    assert psnr_per_frame(fp16, fp32).min() >= 40
