"""The face enhancer stage (`--enhancer`), through the library: its frames, its options, its weights.

Tiny widths (`gfpgan-tiny`) everywhere but the golden parity test (full size, slow). The stage's parts are
held against OpenCV and the upstream golden in test_face_geometry.py, test_retinaface.py and
test_enhancer_nets.py; this file checks that the stage puts them together as SadTalker's enhancer does.
"""

import pickle
import shutil

import numpy as np
import pytest
import torch

from sfr_cli.stages import enhance as enhance_stage
from sfr_cli.errors import CheckpointError, ConfigError
from sfr_cli.enhance_jobs import EnhanceJob, prepare_enhance
from sfr_cli.imaging import face_blend
from sfr_cli.progress import SilentReporter
from sfr_cli.models import ModelCache
from sfr_cli.streaming import render_enhance

from conftest import read_png_frames  # noqa: F401


def lanczos_2x(frames: np.ndarray) -> np.ndarray:
    batch = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()
    return face_blend.upsample_background(batch, 2).permute(0, 2, 3, 1).numpy()


def enhance(input_dir, weights, out_dir, **options):
    """`sfr enhance --input input_dir --frames-dir out_dir` through the library; (frames, report)."""
    job = EnhanceJob.make(input=input_dir, frames_dir=out_dir, enhancer=options.pop("enhancer", "gfpgan-tiny"),
                     enhancer_dir=weights, device="cpu", **options)
    report = render_enhance(prepare_enhance(job), SilentReporter(), ModelCache())
    return read_png_frames(out_dir), report


@pytest.fixture(scope="module")
def golden_frames(reference_dir):
    return reference_dir / "golden-enhance" / "frames"


@pytest.mark.heavy
def test_faces_are_restored_and_a_frame_without_faces_is_the_lanczos_resize(golden_frames, tiny_enhancer_weights,
                                                                           tmp_path):
    frames, report = enhance(golden_frames, tiny_enhancer_weights, tmp_path / "out")
    inputs = read_png_frames(golden_frames)
    background = lanczos_2x(inputs)
    assert frames.shape == (4, 512, 512, 3)
    np.testing.assert_array_equal(frames[3], background[3])  # the flat frame: no face
    for index in range(3):  # a face each (the tiny detector finds 1-3): pasted over the background
        changed = np.any(frames[index] != background[index], axis=2)
        assert changed.mean() > 0.01, index
    assert report.stages["enhancer_faces"] >= 3 and report.stages["enhancer_noise_seed"] is None


@pytest.mark.heavy
def test_batch_size_does_not_change_the_frames(golden_frames, tiny_enhancer_weights, tmp_path):
    one, _ = enhance(golden_frames, tiny_enhancer_weights, tmp_path / "one", batch_size=1)
    three, _ = enhance(golden_frames, tiny_enhancer_weights, tmp_path / "three", batch_size=3)
    np.testing.assert_array_equal(one, three)


@pytest.mark.heavy
def test_upscale_1_keeps_the_frames_size(golden_frames, tiny_enhancer_weights, tmp_path):
    frames, _ = enhance(golden_frames, tiny_enhancer_weights, tmp_path / "out", enhancer_upscale=1)
    inputs = read_png_frames(golden_frames)
    assert frames.shape == inputs.shape
    np.testing.assert_array_equal(frames[3], inputs[3])
    assert np.any(frames[0] != inputs[0])


@pytest.mark.heavy
def test_random_noise_is_reproducible_from_its_seed(golden_frames, tiny_enhancer_weights, tmp_path):
    """Fresh noise per face from the seed, whatever the batching (a drawn seed is reported and replays:
    tests/test_cli_enhance.py)."""
    stored, _ = enhance(golden_frames, tiny_enhancer_weights, tmp_path / "stored")
    first, report = enhance(golden_frames, tiny_enhancer_weights, tmp_path / "a", enhancer_noise="random",
                            enhancer_seed=7)
    again, _ = enhance(golden_frames, tiny_enhancer_weights, tmp_path / "b", enhancer_noise="random",
                       enhancer_seed=7, batch_size=1)
    other, _ = enhance(golden_frames, tiny_enhancer_weights, tmp_path / "c", enhancer_noise="random",
                       enhancer_seed=8)
    assert report.stages["enhancer_noise_seed"] == 7
    np.testing.assert_array_equal(first, again)
    assert np.any(first != stored) and np.any(first != other)
    np.testing.assert_array_equal(first[3], stored[3])  # no face, no noise


@pytest.mark.heavy
def test_renderer_frames_run_the_enhancer_after_paste_back(reference_dir, tiny_checkpoints, tiny_enhancer_weights):
    """The Renderer's frames with `enhancer` are the enhancer on the frames it yields without: one path."""
    from sfr_cli import Renderer
    from sfr_cli.stages.enhance import FaceEnhancer

    golden = reference_dir / "golden-crop"
    renderer = Renderer(checkpoint_dir=tiny_checkpoints, config="tiny", device="cpu", batch_size=2)
    clip = dict(coeffs=golden / "coeffs.mat", source=golden / "source.png", source_coeffs=golden / "source_coeffs.mat")
    plain = np.stack(list(renderer.frames(**clip)))
    enhanced = np.stack(list(renderer.frames(**clip, enhancer="gfpgan-tiny", enhancer_dir=tiny_enhancer_weights)))
    stage = FaceEnhancer("gfpgan-tiny", enhance_stage.find_weights("gfpgan", tiny_enhancer_weights))
    stage.load(torch.device("cpu"), ModelCache())
    alone = stage(torch.from_numpy(plain)).numpy()
    assert enhanced.shape == (len(plain), 512, 512, 3)
    np.testing.assert_array_equal(enhanced, alone)


# ---------------------------------------------------------------------------------------------------
# Weights: found where SadTalker puts them, checked before any model loads, never run


def test_weights_are_found_where_sadtalkers_download_script_puts_them(tiny_enhancer_weights, tmp_path, monkeypatch):
    monkeypatch.delenv(enhance_stage.ENHANCER_DIR_ENV, raising=False)
    root = tmp_path / "SadTalker"
    (root / "checkpoints").mkdir(parents=True)
    shutil.copytree(tiny_enhancer_weights, root / "gfpgan" / "weights")
    assert enhance_stage.find_weights("gfpgan", None, root / "checkpoints").restorer == root / "gfpgan" / "weights" / \
        "GFPGANv1.4.pth"
    shutil.rmtree(root / "gfpgan")
    shutil.copytree(tiny_enhancer_weights, root / "checkpoints", dirs_exist_ok=True)
    assert enhance_stage.find_weights("gfpgan", None, root / "checkpoints").parser.parent == root / "checkpoints"


def test_missing_weights_name_the_files_and_the_folders_searched(tmp_path, tiny_enhancer_weights, monkeypatch):
    monkeypatch.delenv(enhance_stage.ENHANCER_DIR_ENV, raising=False)
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tiny_enhancer_weights / "GFPGANv1.4.pth", partial)
    with pytest.raises(CheckpointError) as caught:
        enhance_stage.find_weights("gfpgan", None, partial)
    message = str(caught.value)
    for name in enhance_stage.weights_files("gfpgan"):
        assert name in message
    assert str(partial) in message and str(tmp_path / "gfpgan" / "weights") in message
    assert "lacks detection_Resnet50_Final.pth, parsing_parsenet.pth" in message


def broken_copy(source, tmp_path, name, write):
    folder = tmp_path / "broken"
    shutil.copytree(source, folder)
    write(folder / name)
    return folder


class Payload:  # pickled by reference: loading it would import and run code
    def __reduce__(self):
        return (print, ("code from a checkpoint ran",))


@pytest.mark.parametrize("case,name,write,expected", [
    ("truncated", "GFPGANv1.4.pth", lambda p: p.write_bytes(p.read_bytes()[: 4096]), "truncated or corrupt"),
    ("not a GFPGAN file", "GFPGANv1.4.pth", lambda p: torch.save({"generator": {}}, p), "'params_ema' or 'params'"),
    ("code inside", "parsing_parsenet.pth", lambda p: p.write_bytes(pickle.dumps({"x": Payload()})),
     "never runs code"),
    ("a key missing", "detection_Resnet50_Final.pth",
     lambda p: torch.save(dict(list(torch.load(p, weights_only=True).items())[1:]), p), "missing 1 key"),
])
def test_bad_weights_are_refused_before_any_model_loads(golden_frames, tiny_enhancer_weights, tmp_path, capsys, case,
                                                        name, write, expected):
    folder = broken_copy(tiny_enhancer_weights, tmp_path, name, write)
    with pytest.raises(CheckpointError, match=expected):
        prepare_enhance(EnhanceJob.make(input=golden_frames, frames_dir=tmp_path / "out", enhancer="gfpgan-tiny",
                                   enhancer_dir=folder, device="cpu"))
    assert "code from a checkpoint ran" not in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_tiny_weights_for_the_full_enhancer_say_which_enhancer_they_fit(tiny_enhancer_weights):
    files = enhance_stage.find_weights("gfpgan", tiny_enhancer_weights)
    with pytest.raises(CheckpointError, match="weights of the gfpgan-tiny enhancer: pass --enhancer gfpgan-tiny"):
        enhance_stage.check_weights("gfpgan", files)


def test_unknown_enhancer_options_are_refused(golden_frames, tiny_enhancer_weights, tmp_path):
    for options, expected in ((dict(enhancer="codeformer"), "unknown enhancer"),
                              (dict(enhancer_upscale=3), "--enhancer-upscale 3"),
                              (dict(enhancer_noise="fresh"), "--enhancer-noise 'fresh'")):
        job = EnhanceJob.make(input=golden_frames, frames_dir=tmp_path / "out", enhancer_dir=tiny_enhancer_weights,
                         device="cpu", **{"enhancer": "gfpgan-tiny", **options})
        with pytest.raises(ConfigError, match=expected):
            prepare_enhance(job)


# ---------------------------------------------------------------------------------------------------
# Parity with the upstream enhancer (full size)


@pytest.mark.slow
def test_golden_enhance_full_size(reference_dir, enhancer_reference_weights, tmp_path):
    """SadTalker's enhancer (GFPGANer + FaceRestoreHelper, upstream code) on the golden frames: the same
    faces, frames at most 4 levels apart on at most 0.5 % of values (the upstream run's own noise: 2
    threads against 1 moved its frames up to 2 levels on 0.2 %), the no-face frame exact."""
    golden = reference_dir / "golden-enhance"
    frames, report = enhance(golden / "frames", enhancer_reference_weights, tmp_path / "out", enhancer="gfpgan")
    expected = read_png_frames(golden / "enhanced")
    assert report.stages["enhancer_faces"] == 4  # 1, 1, 2 and 0 faces
    diff = np.abs(frames.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= 4 and np.count_nonzero(diff) / diff.size <= 0.005, (diff.max(), np.count_nonzero(diff) / diff.size)
    np.testing.assert_array_equal(frames[3], lanczos_2x(read_png_frames(golden / "frames"))[3])


def test_weights_checked_once_while_unchanged_and_again_once_changed(tiny_enhancer_weights, tmp_path, monkeypatch):
    """A batch checks each row twice: unchanged files are read once; a file changed since is read again."""
    folder = tmp_path / "weights"
    shutil.copytree(tiny_enhancer_weights, folder)
    files = enhance_stage.find_weights("gfpgan", folder)
    reads = []
    original = enhance_stage.read_state_dicts
    monkeypatch.setattr(enhance_stage, "read_state_dicts", lambda e, f: reads.append(f) or original(e, f))
    for _ in range(3):
        enhance_stage.check_weights("gfpgan-tiny", files)
    assert len(reads) == 1
    files.restorer.write_bytes(files.restorer.read_bytes()[: 4096])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        enhance_stage.check_weights("gfpgan-tiny", files)


@pytest.mark.heavy
def test_out_of_memory_halves_the_faces_per_call_and_loses_no_face(golden_frames, tiny_enhancer_weights, monkeypatch):
    """The enhancer's back-off is the engine's (`engine.halve_after_oom`): a restorer call over one face
    running out of memory is retried with half as many, the frames the same; at one face a RenderError."""
    import dataclasses

    from sfr_cli.errors import RenderError
    from sfr_cli.models import ModelCache
    from sfr_cli.stages import restorers
    from sfr_cli.stages.enhance import FaceEnhancer

    frames = torch.from_numpy(read_png_frames(golden_frames))
    files = enhance_stage.find_weights("gfpgan-tiny", tiny_enhancer_weights)
    models = ModelCache()

    def stage(per_call):
        enhancer = FaceEnhancer("gfpgan-tiny", files)
        enhancer.load(torch.device("cpu"), models)
        enhancer._faces_per_call = per_call
        return enhancer

    expected = stage(1)(frames)
    gfpgan = restorers.RESTORERS["gfpgan"]
    calls = []

    def restore_small(net, faces, noise, limit=1):
        calls.append(faces.shape[0])
        if faces.shape[0] > limit:
            raise torch.cuda.OutOfMemoryError("simulated")
        return gfpgan.restore(net, faces, noise)

    monkeypatch.setitem(restorers.RESTORERS, "gfpgan", dataclasses.replace(gfpgan, restore=restore_small))
    halving = stage(4)
    np.testing.assert_array_equal(halving(frames).numpy(), expected.numpy())
    assert max(calls) > 1 and halving._faces_per_call == 1, calls  # ran out, halved down to one face a call
    monkeypatch.setitem(restorers.RESTORERS, "gfpgan", dataclasses.replace(
        gfpgan, restore=lambda net, faces, noise: restore_small(net, faces, noise, limit=0)))
    with pytest.raises(RenderError, match="out of GPU memory on cpu enhancing one face"):
        stage(1)(frames)
