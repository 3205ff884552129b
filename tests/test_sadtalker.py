"""sfr in SadTalker's place: `sfr_cli.sadtalker.AnimateFromCoeff` fed data dicts built as SadTalker's
get_facerender_data builds them (tests/sadtalker_data.py) from the golden inputs gives sfr's own frames
(crop mode with SadTalker's aspect resize, poses, still mode, expression scale; full mode pasted back with
SadTalker's crop_info), writes the video SadTalker returns; and `python -m sfr_cli.sadtalker` runs an
inference.py with SadTalker's interface, or says clearly why it cannot."""

import json
import re
import subprocess
import sys
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import assert_frames_close, error_line
from sadtalker_data import facerender_data
from sfr_cli.cli import sfr
from sfr_cli.errors import SadTalkerError
from sfr_cli.renderer import Renderer
from sfr_cli.sadtalker import AnimateFromCoeff, find_checkout

TINY = dict(config="tiny", device="cpu")


def sadtalker_paths(checkpoints: Path, mapping="mapping_00229-model.pth.tar"):
    """init_path()'s dict for the pth layout (SadTalker's YAML named, as it would be; the tests pass config=tiny)."""
    return {"free_view_checkpoint": str(checkpoints / "facevid2vid_00189-model.pth.tar"),
            "mappingnet_checkpoint": str(checkpoints / mapping), "facerender_yaml": "src/config/facerender.yaml"}


def frames_of(iterator):
    return np.stack(list(iterator))


@pytest.mark.heavy
@pytest.mark.parametrize("case", [
    dict(),
    dict(yaw=[0, 20, -10], pitch=[5], roll=[-10, 10], still_mode=True, expression_scale=1.5),
], ids=["plain", "poses-still-scaled"])
def test_crop_mode_gives_sfrs_frames(case, reference_dir, tiny_checkpoints):
    golden = reference_dir / "golden-crop"
    data = facerender_data(str(golden / "coeffs.mat"), str(golden / "source.png"), str(golden / "source_coeffs.mat"),
                           None, 2, **case)
    assert tuple(data["target_semantics_list"].shape) == (2, 2, 70, 27)
    crop_info = ((300, 306), (60, 40, 540, 520), (90, 80, 390, 386))  # SadTalker's (w, h) of the face box first
    animate = AnimateFromCoeff(sadtalker_paths(tiny_checkpoints), "cpu", config="tiny",
                               yaw=case.get("yaw"), pitch=case.get("pitch"), roll=case.get("roll"))
    got = frames_of(animate.frames(data, str(golden / "source.png"), crop_info, preprocess="crop"))
    assert got.shape == (4, 261, 256, 3)  # (256, int(256 * 306 / 300)): animate.py's aspect resize
    options = {key: case[key] for key in ("yaw", "pitch", "roll") if key in case}
    want = frames_of(Renderer(checkpoint_dir=tiny_checkpoints, **TINY).frames(
        coeffs=golden / "coeffs.mat", source=golden / "source.png", source_coeffs=golden / "source_coeffs.mat",
        still=case.get("still_mode", False), expression_scale=case.get("expression_scale", 1.0),
        crop_box=(0, 0, 300, 306), **options))
    assert_frames_close(got, want, f"AnimateFromCoeff vs sfr render, {case}")


@pytest.mark.heavy
def test_full_mode_pastes_back_with_sadtalkers_crop_info(reference_dir, tiny_checkpoints):
    golden = reference_dir / "golden-paste"
    meta = json.loads((golden / "meta.json").read_text())
    data = facerender_data(str(golden / "coeffs.mat"), str(golden / "source.png"), str(golden / "source_coeffs.mat"),
                           None, 2, preprocess="full")
    assert tuple(data["target_semantics_list"].shape) == (2, 2, 73, 27)
    animate = AnimateFromCoeff(sadtalker_paths(tiny_checkpoints, "mapping_00109-model.pth.tar"), "cpu", config="tiny")
    got = frames_of(animate.frames(data, str(golden / "original.png"), meta["crop_info"], preprocess="full"))
    assert got.shape == (3, 1024, 640, 3)
    want = frames_of(Renderer(checkpoint_dir=tiny_checkpoints, **TINY).frames(
        coeffs=golden / "coeffs.mat", source=golden / "source.png", source_coeffs=golden / "source_coeffs.mat",
        preprocess="full", paste_into=golden / "original.png", crop_box=tuple(meta["box_x1y1x2y2"])))
    assert_frames_close(got, want, "full mode pasted back")


def test_a_pose_sequence_that_is_no_sweep_of_the_given_degrees_is_refused(reference_dir, tiny_checkpoints):
    golden = reference_dir / "golden-crop"
    data = facerender_data(str(golden / "coeffs.mat"), str(golden / "source.png"), str(golden / "source_coeffs.mat"),
                           None, 1, yaw=[0, 30])
    animate = AnimateFromCoeff(sadtalker_paths(tiny_checkpoints), "cpu", config="tiny", yaw=[0, 20])
    with pytest.raises(SadTalkerError, match="yaw_c_seq .* not a sweep of --input_yaw 0 20"):
        animate.clip(data, str(golden / "source.png"), ((256, 256), None, None))


def video_info(path: Path):
    """(frames, width, height, has audio) of an MP4, from ffmpeg's own reading of it."""
    result = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path), "-map", "0:v",
                             "-f", "null", "-"], capture_output=True, text=True)
    frames = int(result.stderr.rsplit("frame=", 1)[1].split()[0])
    width, height = map(int, re.search(r"Video: .*?, (\d+)x(\d+)", result.stderr).groups())
    return frames, width, height, "Audio:" in result.stderr


@pytest.mark.heavy
def test_generate_writes_the_video_sadtalker_returns(tmp_path, reference_dir, tiny_checkpoints,
                                                     tiny_enhancer_weights, monkeypatch):
    golden = reference_dir / "golden-crop"
    monkeypatch.setenv("SFR_ENHANCER_DIR", str(tiny_enhancer_weights))
    speech = reference_dir / "sample_speech_24k_mono.wav"
    data = facerender_data(str(golden / "coeffs.mat"), str(golden / "source.png"), str(golden / "source_coeffs.mat"),
                           str(speech), 2)
    animate = AnimateFromCoeff(sadtalker_paths(tiny_checkpoints), "cpu", config="tiny", quiet=True)
    plain = animate.generate(data, str(tmp_path), str(golden / "source.png"), ((256, 256), None, None))
    assert plain == str(tmp_path / "coeffs.mp4")
    assert video_info(Path(plain)) == (4, 256, 256, True)
    enhanced = animate.generate(data, str(tmp_path), str(golden / "source.png"), ((256, 256), None, None),
                                enhancer="gfpgan")
    assert enhanced == str(tmp_path / "coeffs_enhanced.mp4")
    assert video_info(Path(enhanced)) == (4, 512, 512, True)
    with pytest.raises(SadTalkerError, match="--enhancer codeformer"):
        animate.generate(data, str(tmp_path), str(golden / "source.png"), ((256, 256), None, None),
                         enhancer="codeformer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coeffs.mp4", "coeffs_enhanced.mp4"]


@pytest.mark.heavy
def test_generate_passes_restoreformer_and_realesrgan_through(tmp_path, reference_dir, tiny_checkpoints,
                                                              tiny_optional_enhancer_weights, monkeypatch):
    """SadTalker's `--enhancer RestoreFormer --background_enhancer realesrgan` reach sfr's stage (their tiny
    variants under the tiny config): faces restored on a Real-ESRGAN background, twice the size."""
    golden = reference_dir / "golden-crop"
    monkeypatch.setenv("SFR_ENHANCER_DIR", str(tiny_optional_enhancer_weights))
    data = facerender_data(str(golden / "coeffs.mat"), str(golden / "source.png"), str(golden / "source_coeffs.mat"),
                           str(reference_dir / "sample_speech_24k_mono.wav"), 2)
    animate = AnimateFromCoeff(sadtalker_paths(tiny_checkpoints), "cpu", config="tiny", quiet=True)
    options = animate.clip(data, str(golden / "source.png"), ((256, 256), None, None), enhancer="RestoreFormer",
                           background_enhancer="realesrgan")
    assert (options["enhancer"], options["background_enhancer"]) == ("restoreformer-tiny", "realesrgan-tiny")
    enhanced = animate.generate(data, str(tmp_path), str(golden / "source.png"), ((256, 256), None, None),
                                enhancer="RestoreFormer", background_enhancer="realesrgan")
    assert video_info(Path(enhanced)) == (4, 512, 512, True)
    with pytest.raises(SadTalkerError, match="--background_enhancer esrgan"):
        animate.clip(data, str(golden / "source.png"), ((256, 256), None, None), background_enhancer="esrgan")


# ---------------------------------------------------------------------------------------------------
# python -m sfr_cli.sadtalker with a stand-in checkout: SadTalker's file layout and inference.py's interface

INFERENCE_PY = '''
import argparse, os, shutil
from src.utils.preprocess import CropAndExtract
from src.facerender.animate import AnimateFromCoeff
from src.generate_facerender_batch import get_facerender_data

parser = argparse.ArgumentParser()
for flag in ("--driven_audio", "--source_image", "--coeffs", "--first_coeffs", "--checkpoint_dir", "--result_dir"):
    parser.add_argument(flag)
parser.add_argument("--input_yaw", nargs="+", type=int, default=None)
parser.add_argument("--preprocess", default="crop")
args = parser.parse_args()
save_dir = os.path.join(args.result_dir, "2026_01_01_00.00.00")
os.makedirs(save_dir)
paths = {"free_view_checkpoint": os.path.join(args.checkpoint_dir, "facevid2vid_00189-model.pth.tar"),
         "mappingnet_checkpoint": os.path.join(args.checkpoint_dir, "mapping_00229-model.pth.tar"),
         "facerender_yaml": "src/config/facerender.yaml"}
animate_from_coeff = AnimateFromCoeff(paths, "cpu")
data = get_facerender_data(args.coeffs, args.source_image, args.first_coeffs, args.driven_audio, 2, args.input_yaw)
result = animate_from_coeff.generate(data, save_dir, args.source_image, ((256, 256), None, None),
                                     preprocess=args.preprocess)
shutil.move(result, save_dir + ".mp4")
print("The generated video is named:", save_dir + ".mp4")
'''


def stand_in_checkout(root: Path, preprocess_source: str = "class CropAndExtract:\n    pass\n") -> Path:
    files = {
        "inference.py": INFERENCE_PY,
        "src/utils/preprocess.py": preprocess_source,
        "src/utils/init_path.py": "",
        "src/test_audio2coeff.py": "",
        "src/generate_batch.py": "",
        "src/generate_facerender_batch.py": "from sadtalker_data import facerender_data as get_facerender_data\n",
        "src/facerender/animate.py": "raise RuntimeError('SadTalker\\'s own renderer was imported')\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root / "inference.py"


@pytest.mark.heavy
def test_the_runner_renders_inference_py_with_sfr(tmp_path, reference_dir, tiny_checkpoints):
    golden = reference_dir / "golden-crop"
    inference = stand_in_checkout(tmp_path / "SadTalker")
    results = tmp_path / "results"
    result = CliRunner().invoke(sfr, [
        "sadtalker", "--config", "tiny", "--quiet", str(inference), "--driven_audio",
        str(reference_dir / "sample_speech_24k_mono.wav"), "--source_image", str(golden / "source.png"),
        "--coeffs", str(golden / "coeffs.mat"), "--first_coeffs", str(golden / "source_coeffs.mat"),
        "--checkpoint_dir", str(tiny_checkpoints), "--result_dir", str(results), "--input_yaw", "0", "15"])
    assert result.exit_code == 0, result.output
    video = results / "2026_01_01_00.00.00.mp4"
    assert f"The generated video is named: {video}" in result.output
    assert video_info(video) == (4, 256, 256, True)
    assert "src" not in sys.modules and str(inference.parent) not in sys.path  # the checkout's imports are undone


def test_a_path_that_is_no_sadtalker_checkout_is_one_clear_error(tmp_path):
    (tmp_path / "inference.py").write_text("print('not SadTalker')\n")
    line = error_line(CliRunner().invoke(sfr, ["sadtalker", str(tmp_path / "inference.py"), "--driven_audio", "a"]))
    assert "not SadTalker's inference.py" in line and "src/facerender/animate.py" in line
    line = error_line(CliRunner().invoke(sfr, ["sadtalker", str(tmp_path / "missing.py")]))
    assert "no such file" in line
    with pytest.raises(SadTalkerError):
        find_checkout(tmp_path)


def test_sadtalker_code_that_fails_to_import_is_one_clear_error(tmp_path):
    inference = stand_in_checkout(tmp_path / "SadTalker", "import face_alignment_not_installed_here\n")
    line = error_line(CliRunner().invoke(sfr, ["sadtalker", str(inference)]))
    assert "src.utils.preprocess" in line and "face_alignment_not_installed_here" in line
    assert "requirements.txt" in line
    assert "src" not in sys.modules


def test_python_m_sfr_cli_sadtalker_is_the_same_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sfr_cli.sadtalker", str(tmp_path / "missing.py")],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 1 and result.stderr.startswith("Error: ") and "no such file" in result.stderr


def test_settings_that_cannot_work_are_refused_before_sadtalker_runs(tmp_path):
    inference = stand_in_checkout(tmp_path / "SadTalker", "raise RuntimeError('SadTalker ran')\n")
    line = error_line(CliRunner().invoke(sfr, ["sadtalker", "--precision", "fp16", str(inference), "--cpu"]))
    assert "fp16 needs a CUDA GPU" in line
    line = error_line(CliRunner().invoke(sfr, ["sadtalker", str(inference), "--enhancer", "codeformer"]))
    assert "--enhancer codeformer" in line and "gfpgan" in line
    with pytest.raises(SadTalkerError, match="sfr checkpoints download"):
        AnimateFromCoeff(sadtalker_paths(tmp_path), "cpu")
