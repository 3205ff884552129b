"""RealESRGANer's tile geometry and sfr's exact tile reuse (`sfr_cli.tiling`), with the tiny RRDBNet.

The reference here is RealESRGANer.enhance's algorithm written out plainly, one frame at a time: the frame
to float `/ 255`, reflect-padded to even height and width, a black float output, each tile run alone with
its clamped context, cropped and placed, the pad cropped off, clamp, `* 255`, round. sfr's batched,
reusing upsampler must give the same bytes.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from sfr_cli.imaging.resize import resize_lanczos4
from sfr_cli.nets.rrdbnet import TINY_RRDBNET_CONFIG, RRDBNet
from sfr_cli.tiling import TileUpsampler, mod_pad, reflect_pad, tile_grid


@pytest.fixture(scope="module")
def tiny_net():
    from sfr_cli.nets.rrdbnet import random_state_dict

    net = RRDBNet(**TINY_RRDBNET_CONFIG)
    net.load_state_dict(random_state_dict(net, 39))
    return net.eval().requires_grad_(False)


@torch.no_grad()
def realesrganer_reference(net, frame: torch.Tensor, tile: int, tile_pad: int, scale: int = 2) -> torch.Tensor:
    """One `(H, W, 3) uint8` frame through RealESRGANer's steps (pre_pad 0) -> `(H*2, W*2, 3) uint8`."""
    img = frame.permute(2, 0, 1)[None].float() / 255.0
    height, width = img.shape[2:]
    pad_h, pad_w = (2 - height % 2) % 2, (2 - width % 2) % 2
    img = F.pad(img, (0, pad_w, 0, pad_h), mode="reflect")
    _, _, ph, pw = img.shape
    out = img.new_zeros(1, 3, ph * scale, pw * scale)
    for y in range(math.ceil(ph / tile)):
        for x in range(math.ceil(pw / tile)):
            sx, ex = x * tile, min(x * tile + tile, pw)
            sy, ey = y * tile, min(y * tile + tile, ph)
            psx, pex = max(sx - tile_pad, 0), min(ex + tile_pad, pw)
            psy, pey = max(sy - tile_pad, 0), min(ey + tile_pad, ph)
            result = net(img[:, :, psy:pey, psx:pex])
            cx, cy = (sx - psx) * scale, (sy - psy) * scale
            out[:, :, sy * scale:ey * scale, sx * scale:ex * scale] = \
                result[:, :, cy:cy + (ey - sy) * scale, cx:cx + (ex - sx) * scale]
    out = out[:, :, :height * scale, :width * scale].clamp(0, 1)
    return (out[0] * 255.0).round().to(torch.uint8).permute(1, 2, 0)


def random_frames(count, height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, height, width, 3), dtype=torch.uint8, generator=generator)


def paste_back_clip(count, height, width, box, seed=0):
    """A still picture with only `box` (x0, y0, x1, y1) changing from frame to frame, as paste-back frames."""
    frames = random_frames(1, height, width, seed).repeat(count, 1, 1, 1)
    x0, y0, x1, y1 = box
    frames[:, y0:y1, x0:x1] = random_frames(count, y1 - y0, x1 - x0, seed + 1)
    return frames


def test_tile_grid_is_realesrganers_on_the_golden_frames(reference_dir):
    meta = json.loads((reference_dir / "golden-bg" / "meta.json").read_text())
    for frame in meta["frames"]:
        width, height = frame["size_wh"]
        tiles = tile_grid(height, width)
        got = [dict(tile_xy=list(t.grid_xy), input_box_xyxy=list(t.input_box),
                    padded_input_box_xyxy=list(t.padded_box), output_box_xyxy=list(t.output_box),
                    crop_in_tile_output_xyxy=list(t.crop_box)) for t in tiles]
        assert got == frame["bg_tiles"], frame["frame"]


def test_reflect_pad_matches_torch_reflect_on_uint8_and_float():
    images = random_frames(2, 7, 5).permute(0, 3, 1, 2)
    assert mod_pad(7, 5, 2) == (1, 1) and mod_pad(8, 6, 2) == (0, 0) and mod_pad(7, 5, 1) == (1, 3)
    want = F.pad(images.float(), (0, 1, 0, 1), mode="reflect")
    assert torch.equal(reflect_pad(images, 1, 1).float(), want)
    assert torch.equal(reflect_pad(images.float(), 1, 1), want)


@pytest.mark.parametrize("height, width", [(70, 101), (64, 64), (33, 47)])
def test_tiles_equal_the_plain_realesrganer_steps(tiny_net, height, width):
    frames = random_frames(2, height, width, seed=height)
    upsampler = TileUpsampler(tiny_net, tile_px=32, pad_px=10, reuse=False)
    got = upsampler(frames)
    assert got.shape == (2, height * 2, width * 2, 3) and got.dtype == torch.uint8
    for b in range(2):
        assert torch.equal(got[b], realesrganer_reference(tiny_net, frames[b], 32, 10)), f"frame {b}"
    grid = len(tile_grid(height + height % 2, width + width % 2, 2, 32, 10))
    assert upsampler.tiles_computed == 2 * grid and upsampler.tiles_reused == 0


@pytest.mark.heavy
def test_sadtalkers_400_px_tiles_on_a_frame_larger_than_one_tile(tiny_net):
    frame = random_frames(1, 420, 410, seed=3)
    got = TileUpsampler(tiny_net)(frame)
    assert torch.equal(got[0], realesrganer_reference(tiny_net, frame[0], 400, 10))


@pytest.mark.heavy
def test_reuse_gives_the_same_frames_and_computes_only_changed_tiles(tiny_net):
    # 96 x 128 frames, 32 px tiles: a 3 x 4 grid; the changing box lies inside tile (1, 1) and its context
    # reaches tiles (0..2, 0..2) whose padded inputs overlap it
    frames = paste_back_clip(6, 96, 128, box=(40, 40, 56, 56))
    reusing = TileUpsampler(tiny_net, tile_px=32, pad_px=10)
    plain = TileUpsampler(tiny_net, tile_px=32, pad_px=10, reuse=False)
    got = torch.cat([reusing(frames[:4]), reusing(frames[4:])])  # the kept tiles cross batches
    assert torch.equal(got, plain(frames))
    touched = [t for t in tile_grid(96, 128, 2, 32, 10)
               if t.padded_box[0] < 56 and t.padded_box[2] > 40 and t.padded_box[1] < 56 and t.padded_box[3] > 40]
    assert len(touched) == 9
    assert reusing.tiles_computed == 12 + 5 * len(touched)
    assert reusing.tiles_reused == 5 * (12 - len(touched))
    assert plain.tiles_computed == 6 * 12 and plain.tiles_reused == 0


def test_reuse_compares_with_the_previous_frame_only_and_a_reset_forgets(tiny_net):
    a, b = random_frames(1, 40, 40, seed=5), random_frames(1, 40, 40, seed=6)
    upsampler = TileUpsampler(tiny_net, tile_px=32, pad_px=10)  # 2 x 2 tiles
    out = upsampler(torch.cat([a, a, b, a]))
    assert (upsampler.tiles_computed, upsampler.tiles_reused) == (12, 4)  # a b a each computed, one a reused
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[3])
    upsampler(a)
    assert upsampler.tiles_reused == 8  # the last frame's tiles are kept across calls
    upsampler.reset()
    upsampler(a)
    assert upsampler.tiles_computed == 16
    upsampler(random_frames(1, 42, 40, seed=5))  # another size: nothing kept applies
    assert upsampler.tiles_computed == 20


def test_tiles_batched_across_frames_stay_within_float_rounding(tiny_net):
    from conftest import assert_frames_close

    frames = random_frames(3, 70, 101, seed=9)
    one = TileUpsampler(tiny_net, tile_px=32, pad_px=10, reuse=False)(frames)
    batched = TileUpsampler(tiny_net, tile_px=32, pad_px=10, reuse=False, tiles_per_call=8)(frames)
    assert_frames_close(batched.numpy(), one.numpy(), "tiles 8 per call vs 1")


def test_out_scale_1_is_the_2x_output_resized_with_lanczos4(tiny_net):
    frames = random_frames(2, 45, 66, seed=4)
    twice = TileUpsampler(tiny_net, tile_px=32)(frames)
    once = TileUpsampler(tiny_net, tile_px=32, out_scale=1)(frames)
    assert once.shape == frames.shape
    want = resize_lanczos4(twice.permute(0, 3, 1, 2).contiguous(), 45, 66).permute(0, 2, 3, 1)
    assert torch.equal(once, want)


def test_float_output_is_the_unclamped_tiled_output(tiny_net):
    frames = random_frames(1, 50, 70, seed=8)
    upsampler = TileUpsampler(tiny_net, tile_px=32)
    floats = upsampler.float_output(frames)
    assert floats.shape == (1, 3, 100, 140) and floats.dtype == torch.float32
    got = (floats.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(got, upsampler(frames))


def test_bad_frames_and_settings_are_refused(tiny_net):
    with pytest.raises(ValueError, match="uint8"):
        TileUpsampler(tiny_net)(torch.zeros(1, 8, 8, 3))
    with pytest.raises(ValueError, match="out_scale"):
        TileUpsampler(tiny_net, out_scale=3)
    with pytest.raises(ValueError, match="tiles_per_call"):
        TileUpsampler(tiny_net, tiles_per_call=0)


def test_frames_stay_where_they_are_and_output_is_uint8_rgb(tiny_net):
    frames = random_frames(1, 20, 30)
    out = TileUpsampler(tiny_net, tile_px=16)(frames)
    assert out.device == frames.device and out.dtype == torch.uint8
