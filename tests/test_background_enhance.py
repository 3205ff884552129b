"""`--background-enhancer realesrgan` (SadTalker's `--background_enhancer realesrgan`) and `--enhancer
restoreformer` through the enhance stage: the CLI (`sfr enhance`, `sfr render`, `sfr batch`'s column), the
Renderer, exact tile reuse per clip (on and off: the same frames), and bad input refused before any model
loads. Tiny nets (`realesrgan-tiny`, `restoreformer-tiny`); the full-size parity is in test_realesrgan.py and
test_restoreformer.py."""

import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import read_png_frames
from sfr_cli.cli import sfr
from sfr_cli.models import ModelCache
from sfr_cli.stages import enhance as enhance_stage
from sfr_cli.tiling import TileUpsampler
from test_cli import assert_user_error

BG_FILE = "RealESRGAN_x2plus.pth"


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def weights(tiny_optional_enhancer_weights, tiny_enhancer_weights, tmp_path_factory):
    """One folder with every tiny enhancer file: gfpgan-tiny's, restoreformer-tiny's and realesrgan-tiny's."""
    folder = tmp_path_factory.mktemp("all-tiny-enhancers")
    shutil.copytree(tiny_optional_enhancer_weights, folder, dirs_exist_ok=True)
    shutil.copy(tiny_enhancer_weights / "GFPGANv1.4.pth", folder)
    return folder


@pytest.fixture
def no_stage_load(monkeypatch):
    """Fail the test if a stage's net loads: these errors must be found before."""

    def fail(*args, **kwargs):
        raise AssertionError("a stage's weights were loaded before the error was reported")

    monkeypatch.setattr(enhance_stage, "load_part", fail)


def tiny_upsampler(weights, **options):
    net = enhance_stage.load_part("background", "realesrgan-tiny", weights / BG_FILE)
    return TileUpsampler(net, **options)


def enhance(runner, frames, weights, out, *options, env=None):
    result = runner.invoke(sfr, ["enhance", "--input", str(frames), "--enhancer-dir", str(weights), "--frames-dir",
                                 str(out), "--device", "cpu", "--json", *options], env=env)
    assert result.exit_code == 0, result.output
    import json

    return read_png_frames(out), json.loads(result.stdout)


@pytest.mark.heavy
def test_background_alone_upscales_whole_frames_as_realesrganer(runner, reference_dir, weights, tmp_path):
    """`sfr enhance --enhancer none --background-enhancer realesrgan-tiny`: every frame is the tile runner's
    2x picture (RealESRGANer's steps; `--enhancer-upscale 1`: its outscale=1, 2x then Lanczos-4 down)."""
    inputs = reference_dir / "golden-crop" / "frames"
    frames, report = enhance(runner, inputs, weights, tmp_path / "a", "--enhancer", "none", "--background-enhancer",
                             "realesrgan-tiny")
    expected = tiny_upsampler(weights, reuse=False)(torch.from_numpy(read_png_frames(inputs))).numpy()
    np.testing.assert_array_equal(frames, expected)
    assert frames.shape == (4, 512, 512, 3)
    assert report["background_enhancer"] == "realesrgan-tiny" and "enhancer" not in report
    assert report["background_tiles_computed"] + report["background_tiles_reused"] == 4
    same_size, _ = enhance(runner, inputs, weights, tmp_path / "b", "--enhancer", "none", "--background-enhancer",
                           "realesrgan-tiny", "--enhancer-upscale", "1")
    down = tiny_upsampler(weights, reuse=False, out_scale=1)(torch.from_numpy(read_png_frames(inputs))).numpy()
    np.testing.assert_array_equal(same_size, down)
    assert same_size.shape == (4, 256, 256, 3)


@pytest.mark.heavy
def test_tile_reuse_on_and_off_give_the_same_frames(runner, reference_dir, weights, tmp_path):
    """A paste-back clip (640 x 1024, six 400-px tiles, the face box in four): with reuse the two tiles away
    from the box are computed once for the clip, without it every tile of every frame; the frames are the
    same bit for bit, and the faces pasted on the Real-ESRGAN background."""
    inputs = reference_dir / "golden-paste" / "full_frames"
    options = ("--enhancer", "gfpgan-tiny", "--background-enhancer", "realesrgan-tiny", "--batch-size", "2")
    reused, on = enhance(runner, inputs, weights, tmp_path / "on", *options)
    computed, off = enhance(runner, inputs, weights, tmp_path / "off", *options, env={"SFR_TILE_REUSE": "0"})
    np.testing.assert_array_equal(reused, computed)
    assert (on["background_tiles_computed"], on["background_tiles_reused"]) == (6 + 2 * 4, 2 * 2)
    assert (off["background_tiles_computed"], off["background_tiles_reused"]) == (18, 0)
    assert on["background_tile_reuse"] is True and off["background_tile_reuse"] is False
    assert on["enhancer_faces"] == off["enhancer_faces"] > 0
    background = tiny_upsampler(weights)(torch.from_numpy(read_png_frames(inputs))).numpy()
    lanczos = torch.nn.functional.interpolate(torch.from_numpy(read_png_frames(inputs)).permute(0, 3, 1, 2).float(),
                                              scale_factor=2, mode="nearest").permute(0, 2, 3, 1).numpy()
    # the faces are pasted on Real-ESRGAN's background: most of each frame is its pixels (the tiny detector's
    # faces cover the rest)
    assert np.mean(reused == background) > 0.6 > np.mean(np.abs(reused - lanczos) <= 1)


@pytest.mark.heavy
def test_reuse_never_crosses_clips(reference_dir, weights):
    """A stage's `load` starts a clip: the same picture in the next clip is computed again, not reused."""
    files = enhance_stage.find_background_weights("realesrgan-tiny", weights)
    stage = enhance_stage.BackgroundUpscaler("realesrgan-tiny", files)
    frames = torch.from_numpy(read_png_frames(reference_dir / "golden-paste" / "full_frames")[:1])
    models = ModelCache()
    stage.load(torch.device("cpu"), models)
    first = stage(frames)
    stage.load(torch.device("cpu"), models)
    again = stage(frames)
    assert torch.equal(first, again)
    assert (stage.report()["background_tiles_computed"], stage.report()["background_tiles_reused"]) == (6, 0)


@pytest.mark.heavy
def test_render_and_batch_take_the_background_enhancer(runner, reference_dir, tiny_checkpoints, weights, tmp_path):
    """`sfr render --background-enhancer` without a face enhancer: whole rendered frames 2x; `sfr batch`'s
    `background_enhancer` column, a row's `none` turning the batch's default off; the Renderer keyword."""
    from sfr_cli import Renderer

    golden = reference_dir / "golden-crop"
    clip = ["--coeffs", str(golden / "coeffs.mat"), "--source", str(golden / "source.png"), "--source-coeffs",
            str(golden / "source_coeffs.mat"), "--config", "tiny", "--checkpoint-dir", str(tiny_checkpoints),
            "--device", "cpu", "--enhancer-dir", str(weights)]
    result = runner.invoke(sfr, ["render", *clip, "--frames-dir", str(tmp_path / "plain")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(sfr, ["render", *clip, "--frames-dir", str(tmp_path / "big"), "--background-enhancer",
                                 "realesrgan-tiny"])
    assert result.exit_code == 0, result.output
    plain = read_png_frames(tmp_path / "plain")
    big = read_png_frames(tmp_path / "big")
    np.testing.assert_array_equal(big, tiny_upsampler(weights)(torch.from_numpy(plain)).numpy())

    renderer = Renderer(checkpoint_dir=tiny_checkpoints, config="tiny", device="cpu")
    api = np.stack(list(renderer.frames(coeffs=golden / "coeffs.mat", source=golden / "source.png",
                                        source_coeffs=golden / "source_coeffs.mat",
                                        background_enhancer="realesrgan-tiny", enhancer_dir=weights)))
    np.testing.assert_array_equal(api, big)

    manifest = tmp_path / "clips.csv"
    row = f"{golden / 'coeffs.mat'},{golden / 'source.png'},{golden / 'source_coeffs.mat'}"
    manifest.write_text(f"coeffs,source,source_coeffs,frames_dir,background_enhancer\n{row},rows_default,\n"
                        f"{row},rows_off,none\n")
    result = runner.invoke(sfr, ["batch", str(manifest), "--config", "tiny", "--checkpoint-dir", str(tiny_checkpoints),
                                 "--enhancer-dir", str(weights), "--device", "cpu", "--quiet",
                                 "--background-enhancer", "realesrgan-tiny"])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(read_png_frames(tmp_path / "rows_default"), big)
    np.testing.assert_array_equal(read_png_frames(tmp_path / "rows_off"), plain)


@pytest.mark.heavy
def test_restoreformer_runs_the_same_face_path(runner, reference_dir, weights, tmp_path):
    """`--enhancer restoreformer-tiny` runs the face path (detector, paste) with another restorer; `--enhancer-noise random` is noted as not applying; SadTalker's spelling
    `RestoreFormer` names the full-size restorer (whose file these tiny weights are not)."""
    inputs = reference_dir / "golden-enhance" / "frames"
    gfpgan, g = enhance(runner, inputs, weights, tmp_path / "g", "--enhancer", "gfpgan-tiny")
    restored, r = enhance(runner, inputs, weights, tmp_path / "r", "--enhancer", "restoreformer-tiny")
    assert r["enhancer"] == "restoreformer-tiny" and r["enhancer_faces"] > 0 and g["enhancer_faces"] > 0
    assert restored.shape == gfpgan.shape == (4, 512, 512, 3) and not np.array_equal(gfpgan, restored)
    result = runner.invoke(sfr, ["enhance", "--input", str(inputs), "--enhancer", "restoreformer-tiny",
                                 "--enhancer-dir", str(weights), "--frames-dir", str(tmp_path / "n"), "--device", "cpu",
                                 "--enhancer-noise", "random"])
    assert result.exit_code == 0, result.output
    assert "--enhancer-noise random ignored: the restoreformer enhancer draws no noise" in result.stderr
    result = runner.invoke(sfr, ["enhance", "--input", str(inputs), "--enhancer", "RestoreFormer", "--enhancer-dir",
                                 str(weights), "--frames-dir", str(tmp_path / "s"), "--device", "cpu"])
    assert_user_error(result, None, "restoreformer-tiny")
    assert not (tmp_path / "s").exists()


@pytest.mark.heavy
def test_precision_other_than_fp32_is_noted_once(runner, reference_dir, tiny_checkpoints, weights, tmp_path):
    """Real-ESRGAN stays fp32 under `--precision bf16` (not yet shown within 40 dB of fp32), said once."""
    golden = reference_dir / "golden-crop"
    result = runner.invoke(sfr, ["render", "--coeffs", str(golden / "coeffs.mat"), "--source", str(golden / "source.png"),
                                 "--source-coeffs", str(golden / "source_coeffs.mat"), "--config", "tiny",
                                 "--checkpoint-dir", str(tiny_checkpoints), "--device", "cpu", "--precision", "bf16",
                                 "--enhancer-dir", str(weights), "--background-enhancer", "realesrgan-tiny",
                                 "--frames-dir", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert result.stderr.count("background enhancer runs in fp32") == 1, result.stderr


# ---------------------------------------------------------------------------------------------------
# Bad input: refused before any model loads


def test_unknown_background_enhancer_is_a_usage_error(runner, reference_dir, weights, tmp_path):
    result = runner.invoke(sfr, ["enhance", "--input", str(reference_dir / "golden-crop" / "frames"),
                                 "--background-enhancer", "esrgan", "--frames-dir", str(tmp_path / "o")])
    assert_user_error(result, tmp_path, "esrgan", "realesrgan", exit_code=2)


@pytest.mark.parametrize("case", ["missing", "other variant", "truncated", "another net", "reuse switch"])
def test_bad_background_weights_are_refused_before_any_model_loads(runner, reference_dir, weights, tmp_path,
                                                                    no_stage_load, case):
    folder = tmp_path / "w"
    shutil.copytree(weights, folder)
    name, env, needles = "realesrgan-tiny", None, []
    if case == "missing":
        (folder / BG_FILE).unlink()
        needles = [BG_FILE, str(folder), "--enhancer-dir"]
    elif case == "other variant":
        name, needles = "realesrgan", ["pass --background-enhancer realesrgan-tiny"]
    elif case == "truncated":
        data = (folder / BG_FILE).read_bytes()
        (folder / BG_FILE).write_bytes(data[: len(data) // 2])
        needles = ["truncated or corrupt", BG_FILE]
    elif case == "another net":
        shutil.copy(folder / "RestoreFormer.pth", folder / BG_FILE)
        needles = [BG_FILE, "realesrgan-tiny background enhancer"]
    else:
        env, needles = {"SFR_TILE_REUSE": "yes"}, ["$SFR_TILE_REUSE='yes'", "use 1"]
    result = runner.invoke(sfr, ["enhance", "--input", str(reference_dir / "golden-crop" / "frames"),
                                 "--enhancer", "gfpgan-tiny", "--background-enhancer", name, "--enhancer-dir",
                                 str(folder), "--frames-dir", str(tmp_path / "o"), "--device", "cpu"], env=env)
    assert_user_error(result, None, *needles)
    assert not (tmp_path / "o").exists()


def test_out_of_memory_halves_the_tiles_per_call_and_keeps_the_frames(reference_dir, weights):
    """The background's back-off is the engine's (`engine.halve_after_oom`): a net call over more than one
    tile running out of memory is retried with half as many tiles per call, the frames and counts the
    same; at one tile a RenderError."""
    from sfr_cli.errors import RenderError

    files = enhance_stage.find_background_weights("realesrgan-tiny", weights)
    frames = torch.from_numpy(read_png_frames(reference_dir / "golden-crop" / "frames"))
    models = ModelCache()

    def stage(per_call, limit=None):
        upscaler = enhance_stage.BackgroundUpscaler("realesrgan-tiny", files)
        upscaler.load(torch.device("cpu"), models)
        tiles = upscaler._background._tiles
        tiles.tiles_per_call = per_call
        if limit is not None:
            net = tiles.net

            class Small(torch.nn.Module):  # a device holding `limit` tiles at most
                def forward(self, x):
                    calls.append(x.shape[0])
                    if x.shape[0] > limit:
                        raise torch.cuda.OutOfMemoryError("simulated")
                    return net(x)

            tiles.net = Small()
            tiles.net.parameters = net.parameters
        return upscaler

    calls = []
    expected = stage(1)(frames)
    halving = stage(4, limit=1)
    np.testing.assert_array_equal(halving(frames).numpy(), expected.numpy())
    assert max(calls) == 4 and halving._background._tiles.tiles_per_call == 1, calls
    assert halving.report()["background_tiles_computed"] == 4
    with pytest.raises(RenderError, match="out of GPU memory on cpu upsampling one background tile"):
        stage(1, limit=0)(frames)


def test_checkpoints_inspect_knows_the_new_files(runner, weights):
    for name, fits in (("RestoreFormer.pth", "--enhancer restoreformer-tiny"),
                       (BG_FILE, "--background-enhancer realesrgan-tiny")):
        result = runner.invoke(sfr, ["checkpoints", "inspect", str(weights / name)])
        assert result.exit_code == 0, result.output
        assert fits in result.stdout, result.stdout
