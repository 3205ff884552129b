"""Shared fixtures: the reference data folder, tiny random weights, the `gpu` marker."""

import contextlib
import os
from pathlib import Path

import pytest

# As `sfr` itself does (sfr_cli.cli.main): OpenMP threads sleep when idle, so torch does not crawl while
# ffmpeg, a writer thread or another process shares this small CPU. Set before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"
REFERENCE_SKIP = "needs ../shared/reference (CI has it; a user's clone does not)"


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


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> Path:
    """A folder of tiny random weights (configs/tiny.yaml) in SadTalker's pth layout and file names:
    facevid2vid_00189-model.pth.tar, mapping_00229-model.pth.tar (70), mapping_00109-model.pth.tar (73)."""
    from sfr_cli.checkpoints import write_random_checkpoints
    from sfr_cli.config import load_config

    out_dir = tmp_path_factory.mktemp("tiny-checkpoints")
    with one_torch_thread():
        write_random_checkpoints(out_dir, load_config(REPO / "configs" / "tiny.yaml"),
                                 load_config(REPO / "configs" / "tiny_still.yaml"), layout="pth")
    return out_dir


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
