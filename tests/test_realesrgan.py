"""Real-ESRGAN x2plus (`sfr_cli.nets.rrdbnet` through `sfr_cli.tiling`): the state-dict layout, and the
full-size net against `golden-bg/` (realesrgan 0.3.0's RealESRGANer on the CPU, fp32, 400-px tiles)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sfr_cli.nets.rrdbnet import REALESRGAN_X2PLUS_CONFIG, TINY_RRDBNET_CONFIG, RRDBNet
from sfr_cli.tiling import tile_grid


def read_rgb(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def test_state_dict_is_the_manifests_realesrgan_x2plus_pth(reference_dir):
    manifest = json.loads((reference_dir / "enhancer_state_dict_manifest.json").read_text())
    assert manifest["optional_files"]["RealESRGAN_x2plus.pth"]["wrapper"] == "params_ema"
    with torch.device("meta"):
        state_dict = RRDBNet(**REALESRGAN_X2PLUS_CONFIG).state_dict()
    assert [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in state_dict.items()] == \
        manifest["RealESRGAN_x2plus.pth"]
    assert sum(v.numel() for v in state_dict.values()) == 16_703_171


def test_pixel_unshuffle_orders_channels_as_basicsr():
    """basicsr's pixel_unshuffle: view (b, c, h, 2, w, 2), permute to (b, c, 2, 2, h, w): channel c*4+dy*2+dx."""
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    want = x.view(2, 3, 2, 2, 3, 2).permute(0, 1, 3, 5, 2, 4).reshape(2, 12, 2, 3)
    assert torch.equal(F.pixel_unshuffle(x, 2), want)


def test_rrdbnet_doubles_the_size_and_refuses_odd_sizes():
    net = RRDBNet(**TINY_RRDBNET_CONFIG).eval()
    with torch.no_grad():
        assert net(torch.rand(2, 3, 10, 14)).shape == (2, 3, 20, 28)
    with pytest.raises(ValueError, match="multiples of 2"):
        net(torch.rand(1, 3, 9, 14))


class RecordingNet(nn.Module):
    """The net, keeping every call's input and output (to rebuild the float output of one frame)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = []

    def forward(self, x):
        out = self.net(x)
        self.calls.append((x, out))
        return out


@pytest.mark.slow
def test_full_size_background_is_the_goldens_bit_for_bit(realesrgan_reference_weights, reference_dir):
    """Frame 0 of `golden-bg/` (640 x 1024, six 400-px tiles): equal to upstream's `bg/000000.png` exactly (its
    noise floor is 0: bit-identical at 1 and 2 threads), and RRDBNet's output before the clamp has the
    golden's `rrdb_output_before_clamp` (counts outside [0, 1], channel means, std). One frame, about 40 s:
    that reuse changes no byte is shown on the tiny net (tests/test_tiling.py) against the plain steps.
    Through the enhance stage as `sfr enhance --enhancer none --background-enhancer realesrgan` plans and
    loads it (its background entry, the weights found and checked), the net wrapped to record its tiles."""
    from types import SimpleNamespace

    from sfr_cli.models import ModelCache
    from sfr_cli.stages import enhance

    golden = reference_dir / "golden-bg"
    meta = json.loads((golden / "meta.json").read_text())
    assert meta["noise_floor"]["bg_uint8"] == {"max_abs": 0.0, "frac_differing": 0.0}
    options = enhance.Options(background_enhancer="realesrgan", enhancer_dir=realesrgan_reference_weights)
    stage, = enhance.plan(options, SimpleNamespace(checkpoint_dir=None, precision="fp32"), 640, print)
    stage.load(torch.device("cpu"), ModelCache())
    tiles_runner = stage._background._tiles
    net = tiles_runner.net = RecordingNet(tiles_runner.net)
    frames = torch.from_numpy(read_rgb(golden / "frames" / "000000.png")[None].copy())
    out = stage(frames)[0].numpy()
    diff = np.abs(out.astype(np.int16) - read_rgb(golden / "bg" / "000000.png"))
    assert diff.max() == 0, f"bg/000000.png: max {diff.max()} levels on {np.mean(diff > 0):.2e} of values"
    report = stage.report()
    assert (report["background_tiles_computed"], report["background_tiles_reused"]) == (6, 0)

    # the float output, from the recorded tiles (one net call per tile, in the grid's order)
    floats = torch.empty(3, 2048, 1280)
    tiles = tile_grid(1024, 640)
    assert [tuple(x.shape[2:]) for x, _ in net.calls] == [t.padded_size for t in tiles]
    for tile, (_, tile_out) in zip(tiles, net.calls):
        cx0, cy0, cx1, cy1 = tile.crop_box
        ox0, oy0, ox1, oy1 = tile.output_box
        floats[:, oy0:oy1, ox0:ox1] = tile_out[0, :, cy0:cy1, cx0:cx1]
    stats = meta["frames"][0]["rrdb_output_before_clamp"]
    values = floats.numel()
    # the golden's fractions are counts over the frame's values: the same floats give the same counts
    assert int((floats < 0).sum()) == round(stats["frac_below_0"] * values)
    assert int((floats > 1).sum()) == round(stats["frac_above_1"] * values)
    # means and std are float summaries: equal up to their own summation order
    np.testing.assert_allclose(floats.double().mean((1, 2)).numpy(), stats["mean_rgb"], rtol=0, atol=1e-6)
    assert abs(float(floats.double().std(correction=0)) - stats["std"]) < 1e-6
