"""RestoreFormer (`sfr_cli.nets.restoreformer`): its state-dict layout, its parts against plain
computations, and the full-size net against `golden-restoreformer/` (gfpgan 1.3.8's own output)."""

import json

import numpy as np
import pytest
import torch

from sfr_cli.nets.restoreformer import (RESTOREFORMER_CONFIG, TINY_RESTOREFORMER_CONFIG, MultiHeadAttnBlock,
                                        RestoreFormer, VectorQuantizer, restore_faces)


def read_rgb(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def as_faces(*arrays) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def tiny_restoreformer():
    from sfr_cli.nets.restoreformer import random_state_dict

    net = RestoreFormer(**TINY_RESTOREFORMER_CONFIG)
    net.load_state_dict(random_state_dict(net, 14))
    return net.eval().requires_grad_(False)


def test_state_dict_is_the_manifests_restoreformer_pth(reference_dir):
    manifest = json.loads((reference_dir / "enhancer_state_dict_manifest.json").read_text())
    assert manifest["optional_files"]["RestoreFormer.pth"]["wrapper"] == "params_ema"
    with torch.device("meta"):
        state_dict = RestoreFormer(**RESTOREFORMER_CONFIG).state_dict()
    assert [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in state_dict.items()] == \
        manifest["RestoreFormer.pth"]
    assert sum(v.numel() for v in state_dict.values()) == 72_680_003


def test_nearest_codes_are_the_argmin_of_squared_distances():
    generator = torch.Generator().manual_seed(0)
    quantizer = VectorQuantizer(64, 8)
    with torch.no_grad():
        quantizer.embedding.weight.copy_(torch.randn(64, 8, generator=generator) * 3)
    z = torch.randn(2, 8, 5, 6, generator=generator) * 3
    flat = z.permute(0, 2, 3, 1).reshape(-1, 1, 8).double()
    want = ((flat - quantizer.embedding.weight.double()[None]) ** 2).sum(-1).argmin(1).reshape(2, 5, 6)
    with torch.no_grad():
        quantized, codes = quantizer(z)
    assert torch.equal(codes, want)
    chosen = quantizer.embedding.weight[codes].permute(0, 3, 1, 2)
    torch.testing.assert_close(quantized, chosen, rtol=0, atol=1e-5)  # z + (e - z): one rounding from e


@pytest.mark.parametrize("cross", [False, True])
def test_attention_block_is_multi_head_attention(cross):
    torch.manual_seed(1)
    block = MultiHeadAttnBlock(32, head_size=4, norm_groups=8).eval()
    x, y = torch.randn(2, 32, 4, 5), torch.randn(2, 32, 4, 5)
    with torch.no_grad():
        got = block(x, y if cross else None)
        h = block.norm1(x)
        source = block.norm2(y) if cross else h
        heads = lambda t: t.reshape(2, 4, 8, 20).transpose(2, 3).double()  # (b, head, hw, att)
        q, k, v = heads(block.q(source)), heads(block.k(h)), heads(block.v(h))
        attended = torch.softmax(q @ k.transpose(2, 3) / 8 ** 0.5, dim=-1) @ v
        merged = attended.transpose(2, 3).reshape(2, 32, 4, 5).float()
        want = x + block.proj_out(merged)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.heavy
def test_tiny_restoreformer_restores_faces_batch_independently(tiny_restoreformer, reference_dir):
    from conftest import assert_frames_close

    folder = reference_dir / "golden-restoreformer" / "faces"
    faces = as_faces(read_rgb(folder / "000000_0.png"), read_rgb(folder / "000002_1.png"))
    restored, codes = restore_faces(tiny_restoreformer, faces, return_codes=True)
    assert restored.shape == faces.shape and restored.dtype == torch.uint8
    assert codes.shape == (2, 16, 16) and codes.dtype == torch.int64
    alone = restore_faces(tiny_restoreformer, faces[1:])
    assert_frames_close(restored[1:].numpy(), alone.numpy(), "face restored in a batch of 2 vs alone")
    # a restorer, not an identity, and not a constant
    assert restored.float().std() > 10 and not torch.equal(restored, faces)


def test_restoreformer_refuses_other_sizes(tiny_restoreformer):
    with pytest.raises(ValueError, match="512"):
        tiny_restoreformer(torch.zeros(1, 3, 256, 256))


@pytest.mark.slow
def test_full_size_restoreformer_matches_the_golden_codes_and_restored_face(restoreformer_reference_weights,
                                                                          reference_dir):
    """One face of `golden-restoreformer/` (upstream GFPGANer(arch='RestoreFormer') on these weights, 1 torch
    thread): from its aligned crop `faces/`, the codebook indices exactly and the restored crop within the
    golden's noise floor (1 level on 0.3 % of values, 1 vs 2 threads)."""
    from conftest import frame_gap

    from sfr_cli.stages.enhance import load_part

    golden = reference_dir / "golden-restoreformer"
    floor = json.loads((golden / "meta.json").read_text())["noise_floor"]["restored_uint8"]
    net = load_part("restorer", "restoreformer", restoreformer_reference_weights / "RestoreFormer.pth")
    restored, codes = restore_faces(net, as_faces(read_rgb(golden / "faces" / "000002_1.png")), return_codes=True)
    want_codes = np.load(golden / "codes" / "000002_1.npy")
    assert np.array_equal(codes[0].numpy(), want_codes.astype(np.int64))
    levels, share = frame_gap(restored.permute(0, 2, 3, 1).numpy(), read_rgb(golden / "restored" / "000002_1.png")[None])
    assert levels <= floor["max_abs"] and share <= floor["frac_differing"], (levels, share, floor)


@pytest.mark.slow
def test_golden_restoreformer_two_face_frame_through_the_stage(restoreformer_reference_weights, reference_dir,
                                                               tmp_path):
    """The frame of `golden-restoreformer/` with two faces through `sfr enhance --enhancer RestoreFormer`'s
    path (the enhance stage: detection, alignment, RestoreFormer, ParseNet mask, paste on the Lanczos
    background), on one torch thread as the golden was made: its `enhanced/` frame within the golden's own
    noise floor (`enhanced_uint8`: levels and share of values). About a minute."""
    import shutil

    from conftest import frame_gap, one_torch_thread, read_png_frames

    from sfr_cli.enhance_jobs import EnhanceJob, prepare_enhance
    from sfr_cli.models import ModelCache
    from sfr_cli.progress import SilentReporter
    from sfr_cli.streaming import render_enhance

    golden = reference_dir / "golden-restoreformer"
    floor = json.loads((golden / "meta.json").read_text())["noise_floor"]["enhanced_uint8"]
    (tmp_path / "in").mkdir()
    shutil.copy(golden / "frames" / "000002.png", tmp_path / "in")
    job = EnhanceJob.make(input=tmp_path / "in", frames_dir=tmp_path / "out", enhancer="RestoreFormer",
                          enhancer_dir=restoreformer_reference_weights, device="cpu")
    with one_torch_thread():
        report = render_enhance(prepare_enhance(job), SilentReporter(), ModelCache())
    assert (report.stages["enhancer"], report.stages["enhancer_faces"]) == ("restoreformer", 2)
    levels, share = frame_gap(read_png_frames(tmp_path / "out"), read_png_frames(golden / "enhanced")[2:3])
    print(f"RestoreFormer frame 2 vs golden: max {levels} level(s) on {100 * share:.4f} % of values")
    assert levels <= floor["max_abs"] and share <= floor["frac_differing"], (levels, share, floor)
