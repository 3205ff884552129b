"""Shared fixtures: the reference data folder, tiny random weights, the `gpu` marker, the one rule for
judging two renders of the same frames that differ only in arithmetic order (``assert_frames_close``), and
the CLI's test helpers (``runner``, ``render_args``, ``assert_user_error``, ``run_batch``, ``tiny``)."""

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest

# As `sfr` itself does (sfr_cli.cli.main): OpenMP threads sleep when idle, so torch does not crawl while
# ffmpeg, a writer thread or another process shares this small CPU. Set before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"
REFERENCE_SKIP = "needs ../shared/reference (CI has it; a user's clone does not)"
SOURCE = Path(__file__).resolve().parents[1] / "demo" / "source.png"
DEMO_COEFFS = Path(__file__).resolve().parents[1] / "demo" / "coeffs.npy"


@pytest.fixture(scope="session", autouse=True)
def torch_configured_for_the_cpu():
    """What `sfr render` and `sfr bench` do once at start (engine.configure_torch): flush denormals, which
    random weights are full of and which slow CPU convolutions up to ten-fold; on CUDA, fp32 without TF32."""
    import torch

    from sfr_cli.engine import configure_torch

    configure_torch(torch.device("cpu"))
    if torch.cuda.is_available():  # and, on a GPU machine, no TF32 for fp32 (the gpu tests compare levels)
        configure_torch(torch.device("cuda"))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """`../shared/reference` beside the repo: golden case, sample faces and speech."""
    if not REFERENCE_DIR.is_dir():
        pytest.skip(REFERENCE_SKIP)
    return REFERENCE_DIR


@pytest.fixture
def runner():
    """Click's test runner for `sfr` commands (`runner.invoke(sfr, [...])`)."""
    from click.testing import CliRunner

    return CliRunner()


@pytest.fixture
def coeffs_npy(tmp_path) -> Path:
    """clip.npy: the demo's first 4 frames of coefficients."""
    path = tmp_path / "clip.npy"
    np.save(path, np.load(DEMO_COEFFS)[:4])
    return path


@pytest.fixture
def out_dir(tmp_path) -> Path:
    """An empty output folder, which a failed command must leave empty."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the networks load: these errors must be found before."""

    def fail(*args, **kwargs):
        raise AssertionError("load_networks was called before the error was reported")

    from sfr_cli import checkpoints

    monkeypatch.setattr(checkpoints, "load_networks", fail)


def render_args(coeffs, out_dir, checkpoint_dir, *extra):
    """`sfr render` of the demo face to out_dir/clip.mp4 at tiny widths, 2 frames per batch."""
    return ["render", "--coeffs", str(coeffs), "--source", str(SOURCE), "-o", str(out_dir / "clip.mp4"),
            "--checkpoint-dir", str(checkpoint_dir), "--config", "tiny", "--batch-size", "2", *extra]


def error_line(result) -> str:
    """The one line a user's mistake prints (exit 1, no traceback): `Error: ...`."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def assert_user_error(result, out_dir, *needles, exit_code=1):
    """Exit code, one `Error:` line naming the problem, no traceback, empty stdout, nothing written."""
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, AssertionError), result.exception
    assert result.stdout == ""
    if exit_code == 1:
        assert result.stderr.count("Error:") == 1, result.stderr
        assert [line for line in result.stderr.splitlines() if line.startswith("Error: ")], result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr
    if out_dir is not None:
        assert sorted(p.name for p in out_dir.iterdir()) == []


def tiny(checkpoints) -> list:
    """`sfr render`/`sfr batch` options for the tiny random weights in `checkpoints`, on the CPU."""
    return ["--config", "tiny", "--checkpoint-dir", str(checkpoints), "--device", "cpu"]


def run_batch(*args, env=None):
    """`sfr batch ARGS...` in-process; a user error may exit non-zero, but nothing raises past Click and no
    traceback is printed."""
    from click.testing import CliRunner

    from sfr_cli.cli import sfr

    result = CliRunner().invoke(sfr, ["batch", *map(str, args)], env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> Path:
    """A folder of tiny random weights (configs/tiny.yaml) in SadTalker's pth layout and file names:
    facevid2vid_00189-model.pth.tar, mapping_00229-model.pth.tar (70), mapping_00109-model.pth.tar (73)."""
    from sfr_cli.checkpoints import write_random_checkpoints
    from sfr_cli.config import CONFIG_DIR, load_config

    out_dir = tmp_path_factory.mktemp("tiny-checkpoints")
    with one_torch_thread():
        write_random_checkpoints(out_dir, load_config(CONFIG_DIR / "tiny.yaml"),
                                 load_config(CONFIG_DIR / "tiny_still.yaml"), layout="pth")
    return out_dir


@pytest.fixture(scope="session")
def enhancer_reference_weights(reference_dir, tmp_path_factory) -> Path:
    """The face enhancer's reference weights (GFPGANv1.4.pth, detection_Resnet50_Final.pth,
    parsing_parsenet.pth) as `golden-enhance/` was made with them: `make_enhancer_checkpoints.py --seed 14`,
    written once per session (about 0.55 GB, 10-20 s)."""
    import subprocess
    import sys

    out_dir = tmp_path_factory.mktemp("enhancer-weights")
    subprocess.run([sys.executable, str(reference_dir / "make_enhancer_checkpoints.py"), str(out_dir),
                    "--seed", "14"], check=True, stdout=subprocess.DEVNULL)
    return out_dir


@pytest.fixture(scope="session")
def tiny_enhancer_weights(tmp_path_factory) -> Path:
    """The face enhancer at test widths (`--enhancer gfpgan-tiny`): GFPGANv1.4.pth, detection_Resnet50_Final.pth
    and parsing_parsenet.pth of random weights in the real files' layouts; the detector finds 1-3 faces on
    the golden face frames and none on a flat grey frame."""
    from sfr_cli.stages.enhance import write_random_weights as write_random_enhancer_weights

    out_dir = tmp_path_factory.mktemp("tiny-enhancer")
    with one_torch_thread():
        write_random_enhancer_weights(out_dir, "gfpgan-tiny")
    return out_dir


@pytest.fixture(scope="session")
def served_tiny_weights(tmp_path_factory, tiny_enhancer_weights) -> dict:
    """What tests/weights_server.py serves for `sfr checkpoints download`: {SadTalker's file name: bytes} of
    tiny random weights in both renderer layouts (SadTalker_V0.0.2_256.safetensors and
    facevid2vid_00189-model.pth.tar), both mapping files, and the tiny enhancer's three files."""
    from sfr_cli.checkpoints import write_random_checkpoints
    from sfr_cli.config import CONFIG_DIR, load_config
    from sfr_cli.stages.enhance import weights_files

    folder = tmp_path_factory.mktemp("served")
    with one_torch_thread():
        for layout in ("safetensors", "pth"):
            write_random_checkpoints(folder, load_config(CONFIG_DIR / "tiny.yaml"),
                                     load_config(CONFIG_DIR / "tiny_still.yaml"), layout=layout)
    files = {path.name: path.read_bytes() for path in folder.iterdir()}
    files.update({name: (tiny_enhancer_weights / name).read_bytes() for name in weights_files("gfpgan-tiny")})
    return files


# How far two renders of the same frames may differ when only the order of float arithmetic differs
# (batching, folded weights, another CPU's SIMD width or thread count), taken from what SadTalker itself
# shows: its own frames at batch size 1 and 2 differ by at most 1 uint8 level, on 0.12 % of values
# (../shared/reference/README.md). Rounding to uint8 is where such noise becomes visible, so frames are
# judged in levels: never more than 1, and at most 0.5 % of values off by one (about 4x SadTalker's own
# share: the gap moves with the machine; sfr against the goldens measured 0.15-0.27 %, AVX2 and AVX-512).
# A real regression (a wrong window, a wrong pose, a dropped column) moves many values by many levels.
MAX_LEVELS = 1
MAX_OFF_BY_ONE_SHARE = 0.005


def frame_gap(got: np.ndarray, want: np.ndarray):
    """(largest difference in uint8 levels, share of values that differ) between two uint8 frame stacks."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"shapes differ: {got.shape} vs {want.shape}"
    assert got.dtype == want.dtype == np.uint8, f"dtypes: {got.dtype} vs {want.dtype}"
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    return int(diff.max()), float(np.count_nonzero(diff)) / diff.size


def assert_frames_close(got: np.ndarray, want: np.ndarray, what: str = "frames") -> None:
    """Equal up to float rounding, by the rule above: max 1 level, at most 0.5 % of values off by one."""
    max_levels, share = frame_gap(got, want)
    assert max_levels <= MAX_LEVELS and share <= MAX_OFF_BY_ONE_SHARE, (
        f"{what}: max {max_levels} uint8 level(s), {100 * share:.3f} % of values differ "
        f"(allowed: max {MAX_LEVELS}, {100 * MAX_OFF_BY_ONE_SHARE:.1f} %)")


def read_png_frames(folder) -> np.ndarray:
    """The `*.png` frames of a folder in name order, `(N, H, W, 3) uint8 RGB`."""
    from PIL import Image

    return np.stack([np.asarray(Image.open(path).convert("RGB")) for path in sorted(Path(folder).glob("*.png"))])


def to_uint8(prediction) -> np.ndarray:
    """A float prediction ``(B, 3, H, W)`` in [0, 1] (tensor or array) -> ``(B, H, W, 3) uint8``, as
    SadTalker writes frames: round(255 x value)."""
    array = prediction.detach().cpu().double().numpy() if hasattr(prediction, "detach") else np.asarray(prediction)
    return np.clip(np.round(array.astype(np.float64) * 255), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


@contextlib.contextmanager
def one_torch_thread():
    """Run torch on one thread: on a busy 2-core machine OpenMP contention makes the small SVDs of
    random weights take a second each instead of a millisecond."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is false)")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture
def denied(monkeypatch):
    """`denied(folder)`: make `folder` refuse access, as `chmod 000` does. Where permission bits bind (not
    root) it is that chmod (undone after the test); as root, which they do not bind, every listing of the
    folder and every stat, open or mkdir of a path inside it raises PermissionError(EACCES) as the kernel
    would for another user, so the same code paths run on any machine."""
    import builtins
    import errno

    locked = []

    def deny(folder):
        folder = Path(folder)
        if os.geteuid() != 0:
            folder.chmod(0)
            locked.append(folder)
            return
        prefix = os.path.abspath(folder)

        def inside(path, itself: bool) -> bool:
            try:
                text = os.fsdecode(os.fspath(path))
            except TypeError:  # a file descriptor
                return False
            text = os.path.abspath(text)
            return text.startswith(prefix + os.sep) or (itself and text == prefix)

        def guard(module, name, itself):
            original = getattr(module, name)

            def guarded(path=".", *args, **kwargs):
                if inside(path, itself):
                    raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
                return original(path, *args, **kwargs)

            monkeypatch.setattr(module, name, guarded)

        for name in ("stat", "lstat", "open", "mkdir", "remove", "unlink", "rename", "replace"):
            guard(os, name, itself=False)
        for name in ("scandir", "listdir"):
            guard(os, name, itself=True)
        guard(builtins, "open", itself=False)

    yield deny
    for folder in locked:
        folder.chmod(0o700)


def _reference_enhancer_weights(reference_dir, out_dir, seed: int, optional_file: str) -> Path:
    """`make_enhancer_checkpoints.py OUT_DIR --seed SEED --also OPTIONAL_FILE` (as the golden's README says),
    quietly; returns OUT_DIR."""
    import subprocess
    import sys

    subprocess.run([sys.executable, str(reference_dir / "make_enhancer_checkpoints.py"), str(out_dir),
                    "--seed", str(seed), "--also", optional_file], check=True, stdout=subprocess.DEVNULL)
    return out_dir


@pytest.fixture(scope="session")
def realesrgan_reference_weights(reference_dir, tmp_path_factory) -> Path:
    """The weights `golden-bg/` was made with: `make_enhancer_checkpoints.py --seed 39 --also
    RealESRGAN_x2plus.pth` (the enhancer's three files and RealESRGAN_x2plus.pth; about 0.6 GB, 5-20 s)."""
    return _reference_enhancer_weights(reference_dir, tmp_path_factory.mktemp("realesrgan-weights"), 39,
                                       "RealESRGAN_x2plus.pth")


@pytest.fixture(scope="session")
def restoreformer_reference_weights(reference_dir, tmp_path_factory) -> Path:
    """The weights `golden-restoreformer/` was made with: `make_enhancer_checkpoints.py --seed 14 --also
    RestoreFormer.pth` (the enhancer's three files and RestoreFormer.pth; about 0.85 GB, 5-20 s)."""
    return _reference_enhancer_weights(reference_dir, tmp_path_factory.mktemp("restoreformer-weights"), 14,
                                       "RestoreFormer.pth")


@pytest.fixture(scope="session")
def tiny_optional_enhancer_weights(tmp_path_factory) -> Path:
    """RestoreFormer.pth (with the face path's two files) and RealESRGAN_x2plus.pth of random weights at test widths (`restoreformer-tiny`,
    `realesrgan-tiny`), in the real files' layout."""
    from sfr_cli.stages.enhance import write_random_background_weights, write_random_weights

    out_dir = tmp_path_factory.mktemp("tiny-optional-enhancer")
    with one_torch_thread():
        write_random_weights(out_dir, "restoreformer-tiny", 14)
        write_random_background_weights(out_dir, "realesrgan-tiny", 39)
    return out_dir
