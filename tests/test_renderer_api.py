"""Issue 17, point 7: the Python API takes what a notebook user passes (lists and arrays of coefficients,
arrays for source_coeffs, str or Path, a PIL image as the face) and refuses anything else with an SfrError
naming the argument and what it takes, never a bare TypeError."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sfr_cli.errors import SfrError

from conftest import DEMO_COEFFS, SOURCE


@pytest.fixture(scope="module")
def renderer(tiny_checkpoints):
    from sfr_cli import Renderer

    return Renderer(checkpoint_dir=tiny_checkpoints, config="tiny", device="cpu", batch_size=2)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api")
    np.save(folder / "clip.npy", np.load(DEMO_COEFFS)[:3])
    np.save(folder / "own.npy", np.load(DEMO_COEFFS)[7:9])
    return folder


def frames_of(renderer, coeffs, source=SOURCE, **options):
    return np.stack(list(renderer.frames(coeffs=coeffs, source=source, **options)))


@pytest.mark.heavy
def test_lists_arrays_and_paths_of_coefficients_give_the_same_frames(renderer, clip):
    rows = np.load(clip / "clip.npy")
    want = frames_of(renderer, clip / "clip.npy")
    assert want.shape == (3, 256, 256, 3)
    for coeffs in (str(clip / "clip.npy"), rows, rows.tolist(), tuple(map(tuple, rows.tolist())),
                   rows.astype(np.float64)):
        np.testing.assert_array_equal(frames_of(renderer, coeffs), want)


@pytest.mark.heavy
def test_source_coeffs_as_a_path_an_array_a_row_or_a_list_give_the_same_frames(renderer, clip):
    own = np.load(clip / "own.npy")
    want = frames_of(renderer, clip / "clip.npy", source_coeffs=clip / "own.npy")
    assert not np.array_equal(want, frames_of(renderer, clip / "clip.npy")), "source_coeffs must matter"
    for source_coeffs in (str(clip / "own.npy"), own, own[0], own[0].tolist(), own.tolist()):
        np.testing.assert_array_equal(frames_of(renderer, clip / "clip.npy", source_coeffs=source_coeffs), want)


@pytest.mark.heavy
def test_a_pil_image_is_a_source(renderer, clip):
    with Image.open(SOURCE) as image:
        picture = image.convert("RGB")
        np.testing.assert_array_equal(frames_of(renderer, clip / "clip.npy", source=picture),
                                      frames_of(renderer, clip / "clip.npy", source=np.asarray(picture)))


@pytest.mark.parametrize("options, needles", [
    (dict(coeffs=3), ["coeffs: got int 3", "a .mat/.npy path", "array or list of rows"]),
    (dict(coeffs=None), ["coeffs: got NoneType"]),
    (dict(coeffs=["a.npy", "b.npy"]), ["coeffs: got a list of 2 path(s)", "one clip", "sfr batch"]),
    (dict(coeffs=[[0.0] * 70, [0.0] * 3]), ["coeffs: cannot be read as an array"]),
    (dict(coeffs=[["x"] * 70]), ["coeffs: an array of <U1 values"]),
    (dict(coeffs=[[0.0] * 64]), ["64 columns per frame"]),
    (dict(source_coeffs={"exp": 1}), ["source_coeffs: got dict", "(70|73,)"]),
    (dict(source_coeffs=[0.0] * 12), ["12 columns per frame"]),
    (dict(source=42), ["source: got int 42", "an image path", "(H, W, 3) RGB array"]),
    (dict(source=np.zeros((4, 4))), ["source array of shape (4, 4)"]),
    (dict(audio=7), ["audio: got int 7", "a path (str or Path)"]),
    (dict(yaw=object()), ["yaw: got object", "degrees"]),
    (dict(yaw="0,left"), ["yaw: "]),
])
def test_what_the_api_cannot_take_is_an_sfr_error_naming_the_argument(renderer, clip, tmp_path, options, needles):
    call = dict(coeffs=clip / "clip.npy", source=SOURCE, output=tmp_path / "x.mp4")
    call.update(options)
    with pytest.raises(SfrError) as caught:
        renderer.render(**call)
    for needle in needles:
        assert needle in str(caught.value), str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_a_bad_path_type_for_the_renderer_itself_is_an_sfr_error():
    from sfr_cli import Renderer

    with pytest.raises(SfrError, match="checkpoint_dir: got int 5"):
        Renderer(checkpoint_dir=5)
    assert Renderer(checkpoint_dir=Path("x")).settings["checkpoint_dir"] == Path("x")
