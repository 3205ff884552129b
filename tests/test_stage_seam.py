"""The stage seam, proven from outside: a complete new stage written by the test in one module of a package
of its own, registered with one line (`STAGE_MODULES`), gets everything a stage gets, touching no other file:
the CLI flag on `sfr render`, `sfr batch` and `sfr enhance`, the manifest column, the `Renderer` keyword, its
weights checked before any model loads (a missing file is a clean error), its `--json` report, and its
frames through `sfr render`, `sfr batch`, `Renderer.frames` and `sfr enhance`.

The stage mirrors frames left to right, scaled by a gain read from its one weights file. The registration
must happen before sfr builds its commands (they are built from the option table at import), so the
checks run in a fresh interpreter that registers the module and then imports sfr, as a stage shipped in
sfr itself is registered by its line in `stages/__init__.py`.
"""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import read_png_frames

FLIP_MODULE = '''
"""A frame stage written by a test: frames mirrored left to right, times a gain from its weights file."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from sfr_cli.errors import CheckpointError
from sfr_cli.options import BATCH, ENHANCE, RENDER, OptionRow

OPTIONS = (
    OptionRow("flip_weights", ("--flip-weights",), "Mirror the frames; the gain's weights file.", path=True,
              column=True, commands=(RENDER, BATCH, ENHANCE)),
)


@dataclass(frozen=True)
class Options:
    flip_weights: Optional[Path] = None


def input_files(options: Options, job) -> List[Tuple[Path, str]]:
    return [(Path(options.flip_weights), "--flip-weights")] if options.flip_weights is not None else []


def read_gain(path: Path) -> float:
    """Check before load: the file holds {"gain": a one-element tensor}; CheckpointError otherwise."""
    import torch

    if not Path(path).is_file():
        raise CheckpointError(f"{path}: flip weights not found; write them with write_random_weights")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or set(data) != {"gain"} or data["gain"].numel() != 1:
        raise CheckpointError(f"{path}: not flip weights (one tensor, 'gain')")
    return float(data["gain"])


def write_random_weights(path: Path) -> Path:
    import torch

    torch.save({"gain": torch.tensor([1.0])}, path)
    return path


def plan(options: Options, job, size_px: int, note: Callable[[str], None]) -> List:
    if options.flip_weights is None:
        return []
    read_gain(options.flip_weights)
    note("frames mirrored")
    return [Flip(Path(options.flip_weights))]


@dataclass
class Flip:
    weights: Path
    name: str = "flip"
    frames: int = 0
    _gain: object = field(default=None, repr=False)

    def output_size(self, width_px: int, height_px: int) -> Tuple[int, int]:
        return width_px, height_px

    def load(self, device, models) -> None:
        import torch

        self._gain = models.stage_model(("flip", str(self.weights), str(device)),
                                        lambda: torch.tensor(read_gain(self.weights), device=device))

    def report(self):
        return {"flip_frames": self.frames}

    def __call__(self, frames):
        self.frames += frames.shape[0]
        return (frames.flip(2).float() * self._gain).round().clamp(0, 255).to(frames.dtype)
'''

RUN = '''
import json, sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])
import sfr_cli.stages
sfr_cli.stages.STAGE_MODULES += ("seamstage.flip",)  # the one line that registers the stage

import numpy as np
from click.testing import CliRunner

import sfr_cli.models
from sfr_cli.cli import sfr
from sfr_cli import Renderer

work, golden, checkpoints, enhancer = (Path(p) for p in sys.argv[2:6])
loads = []
build_engine = sfr_cli.models.build_engine
sfr_cli.models.build_engine = lambda prepared: loads.append(1) or build_engine(prepared)
out = {}
runner = CliRunner()
clip = ["--coeffs", str(golden / "coeffs.mat"), "--source", str(golden / "source.png"),
        "--source-coeffs", str(golden / "source_coeffs.mat")]
common = ["--config", "tiny", "--checkpoint-dir", str(checkpoints), "--device", "cpu"]
for command in ("render", "batch", "enhance"):
    out[command + "_help"] = runner.invoke(sfr, [command, "--help"]).output
__import__("seamstage.flip", fromlist=["x"]).write_random_weights(work / "flip.pth")

def invoke(name, args):
    result = runner.invoke(sfr, args)
    out[name] = {"exit": result.exit_code, "stdout": result.stdout, "stderr": result.stderr,
                 "loads": len(loads)}

invoke("missing", ["render", *clip, *common, "--flip-weights", str(work / "nope.pth"), "--frames-dir",
                   str(work / "missing")])
invoke("plain", ["render", *clip, *common, "--frames-dir", str(work / "plain")])
invoke("flipped", ["render", *clip, *common, "--flip-weights", str(work / "flip.pth"), "--frames-dir",
                   str(work / "flipped"), "--json"])
(work / "clips.csv").write_text("coeffs,source,source_coeffs,frames_dir,flip_weights\\n"
                                f"{golden / 'coeffs.mat'},{golden / 'source.png'},{golden / 'source_coeffs.mat'},b1,flip.pth\\n"
                                f"{golden / 'coeffs.mat'},{golden / 'source.png'},{golden / 'source_coeffs.mat'},b2,\\n")
invoke("batch", ["batch", str(work / "clips.csv"), *common, "--quiet"])
renderer = Renderer(checkpoint_dir=checkpoints, config="tiny", device="cpu")
np.save(work / "api.npy", np.stack(list(renderer.frames(golden / "coeffs.mat", golden / "source.png",
                                                       source_coeffs=golden / "source_coeffs.mat",
                                                       flip_weights=work / "flip.pth"))))
enhance = ["enhance", "--input", str(work / "plain"), "--enhancer", "gfpgan-tiny", "--enhancer-dir", str(enhancer),
           "--device", "cpu", "--json"]
invoke("enhanced", [*enhance, "--frames-dir", str(work / "enhanced")])
invoke("enhanced_flipped", [*enhance, "--flip-weights", str(work / "flip.pth"), "--frames-dir",
                            str(work / "enhanced_flipped")])
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def seam(tmp_path_factory, reference_dir, tiny_checkpoints, tiny_enhancer_weights):
    """Write the stage's package, run every command with it registered (one fresh interpreter); what
    each command said, and the folder its frames went to."""
    root = tmp_path_factory.mktemp("seam")
    package = root / "pkg" / "seamstage"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "flip.py").write_text(textwrap.dedent(FLIP_MODULE))
    work = root / "work"
    work.mkdir()
    (work / "run.py").write_text(RUN)
    result = subprocess.run([sys.executable, str(work / "run.py"), str(root / "pkg"), str(work),
                             str(reference_dir / "golden-crop"), str(tiny_checkpoints), str(tiny_enhancer_weights)],
                            capture_output=True, text=True, timeout=600, cwd=work)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), work


def mirrored(frames: np.ndarray) -> np.ndarray:
    return frames[:, :, ::-1]


@pytest.mark.heavy
def test_the_stage_module_brings_its_flag_to_every_command(seam):
    out, _ = seam
    for command in ("render", "batch", "enhance"):
        assert "--flip-weights" in out[command + "_help"], command


@pytest.mark.heavy
def test_a_missing_weights_file_is_a_clean_error_before_any_model_loads(seam):
    out, work = seam
    missing = out["missing"]
    assert missing["exit"] == 1
    assert "Error: " in missing["stderr"] and "nope.pth: flip weights not found" in missing["stderr"]
    assert "Traceback" not in missing["stderr"]
    assert missing["loads"] == 0  # no engine was built
    assert not (work / "missing").exists()


def test_render_runs_the_stage_and_reports_it(seam):
    out, work = seam
    assert out["plain"]["exit"] == 0 and out["flipped"]["exit"] == 0, out["flipped"]["stderr"]
    plain, flipped = read_png_frames(work / "plain"), read_png_frames(work / "flipped")
    np.testing.assert_array_equal(flipped, mirrored(plain))
    assert json.loads(out["flipped"]["stdout"])["flip_frames"] == len(plain)


def test_a_manifest_column_turns_the_stage_on_per_row(seam):
    out, work = seam
    assert out["batch"]["exit"] == 0, out["batch"]["stderr"]
    plain = read_png_frames(work / "plain")
    np.testing.assert_array_equal(read_png_frames(work / "b1"), mirrored(plain))  # flip_weights, from the manifest
    np.testing.assert_array_equal(read_png_frames(work / "b2"), plain)  # an empty cell: no stage


def test_the_renderer_keyword_runs_the_stage(seam):
    _, work = seam
    np.testing.assert_array_equal(np.load(work / "api.npy"), mirrored(read_png_frames(work / "plain")))


def test_enhance_runs_the_stage_after_the_enhancer(seam):
    out, work = seam
    assert out["enhanced_flipped"]["exit"] == 0, out["enhanced_flipped"]["stderr"]
    enhanced = read_png_frames(work / "enhanced")
    np.testing.assert_array_equal(read_png_frames(work / "enhanced_flipped"), mirrored(enhanced))
    report = json.loads(out["enhanced_flipped"]["stdout"])
    assert report["flip_frames"] == len(enhanced) and report["enhancer"] == "gfpgan-tiny"
