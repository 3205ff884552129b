"""The engine with the tiny config: rewrites keep the math, batch size never changes a frame,
out-of-memory back-off loses nothing, precision rules hold."""

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_frames_close, to_uint8
from sfr_cli.checkpoints import Networks, load_networks, write_random_checkpoints
from sfr_cli.coeffs import camera_pose_sequence, prepare_semantics
from sfr_cli.config import CONFIG_DIR, load_config
from sfr_cli.engine import RENDER_STEPS, BatchPolicy, Engine, EngineOptions
from sfr_cli.errors import RenderError
from sfr_cli.nets.geometry import transform_keypoints
from sfr_cli.nets.generator import SPADEDecoder
from sfr_cli.nets.inference import UpsampledConv3x3, optimize_generator, optimize_kp_detector

FRAMES = 7


@pytest.fixture(scope="module")
def tiny_nets(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_ck")
    files = write_random_checkpoints(directory, load_config(CONFIG_DIR / "tiny.yaml"),
                                     load_config(CONFIG_DIR / "tiny_still.yaml"), seed=3)
    return load_networks(load_config(CONFIG_DIR / "tiny.yaml"), files)


@pytest.fixture(scope="module")
def job():
    rng = np.random.default_rng(7)
    driving = (rng.normal(size=(FRAMES, 70)) * 0.5).astype(np.float32)
    source_row = (rng.normal(size=70) * 0.5).astype(np.float32)
    image = rng.random((3, 256, 256), dtype=np.float32)
    return image, prepare_semantics(driving, source_row)


def render_all(nets, image, semantics, **options):
    engine = Engine(nets, EngineOptions(device="cpu", **options))
    source = engine.prepare_source(image, semantics.source_window())
    return engine, np.stack(list(engine.render(source, semantics)))


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_upsampled_conv_equals_conv_of_upsampled_map(factor):
    torch.manual_seed(factor)
    conv = torch.nn.Conv2d(5, 6, 3, padding=1)
    x = torch.randn(2, 5, 7, 9)
    want = conv(F.interpolate(x, scale_factor=factor))
    got = UpsampledConv3x3(conv, factor)(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.heavy
def test_inference_rewrites_keep_the_math(tiny_nets, job):
    image, semantics = job
    plain = tiny_nets
    fast = Networks(kp_detector=optimize_kp_detector(tiny_nets.kp_detector),
                    generator=optimize_generator(tiny_nets.generator), mapping=tiny_nets.mapping)
    img = torch.from_numpy(image)[None].expand(3, -1, -1, -1)
    with torch.no_grad():
        windows = torch.from_numpy(semantics.windows(0, 3))
        source_window = torch.from_numpy(semantics.source_window())[None].expand(3, -1, -1)
        results = []
        for nets in (plain, fast):
            kp = nets.kp_detector(img)
            kp_source = transform_keypoints(kp, nets.mapping(source_window))
            kp_driving = transform_keypoints(kp, nets.mapping(windows))
            results.append(nets.generator(img, kp_driving, kp_source)["prediction"])
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.generator.modules())
    assert results[0].std() > 0.01, "random weights should give frames that vary"
    # Judged as frames, by SadTalker's own batch-1-vs-2 noise (conftest.py): a float bound such as its
    # 4.4e-5 fits one machine only (an AVX2 CPU gives 5.2e-5 here), while any real change to the math
    # moves many values by many levels.
    assert_frames_close(to_uint8(results[1]), to_uint8(results[0]), "folded vs plain modules")


@pytest.mark.heavy
def test_optimized_engine_matches_plain_modules(tiny_nets, job):
    image, semantics = job
    _, plain = render_all(tiny_nets, image, semantics, batch_size=1, optimize=False)
    _, fast = render_all(tiny_nets, image, semantics, batch_size=1, optimize=True)
    assert_frames_close(fast, plain, "optimized engine vs plain modules")


@pytest.mark.heavy
def test_frames_do_not_depend_on_batch_size(tiny_nets, job):
    image, semantics = job
    _, reference = render_all(tiny_nets, image, semantics, batch_size=1)
    assert reference.shape == (FRAMES, 256, 256, 3) and reference.dtype == np.uint8
    for batch_size in (2, 3, 8):
        engine, frames = render_all(tiny_nets, image, semantics, batch_size=batch_size)
        assert engine.stats.batch_sizes == [min(batch_size, FRAMES - i) for i in range(0, FRAMES, batch_size)]
        np.testing.assert_array_equal(frames, reference)


@pytest.mark.heavy
def test_engine_leaves_the_callers_networks_as_they_were(tiny_nets, job):
    image, semantics = job
    before = {name: {k: v.clone() for k, v in getattr(tiny_nets, name).state_dict().items()}
              for name in ("kp_detector", "generator", "mapping")}
    grads = [p.requires_grad for p in tiny_nets.generator.parameters()]
    render_all(tiny_nets, image, semantics, batch_size=2, channels_last=True)
    assert isinstance(tiny_nets.generator.decoder, SPADEDecoder), "the caller's decoder was replaced"
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in tiny_nets.generator.modules())
    assert [p.requires_grad for p in tiny_nets.generator.parameters()] == grads
    for name, state in before.items():
        after = getattr(tiny_nets, name).state_dict()
        assert after.keys() == state.keys()
        for key, value in state.items():
            assert after[key].device.type == "cpu" and after[key].is_contiguous(), f"{name}.{key} moved or changed layout"
            torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=f"{name}.{key} was written")


class StageCounter:
    """A stage hook that counts how often each stage runs."""

    def __init__(self):
        self.calls = dict.fromkeys(RENDER_STEPS, 0)

    def __call__(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1
        return contextlib.nullcontext()


@pytest.mark.heavy
def test_cpu_batch_policy_runs_motion_frame_by_frame_and_the_decoder_batched(tiny_nets, job):
    """The CPU half of BatchPolicy (the CUDA half: test_cuda_batch_policy_runs_the_whole_batch_at_once)."""
    image, semantics = job
    assert BatchPolicy.for_device(torch.device("cpu")) == BatchPolicy(motion_frames=1, auto_batch=1, launch_ahead=False)
    counter = StageCounter()
    engine = Engine(tiny_nets, EngineOptions(device="cpu", batch_size=4), step_hook=counter)
    source = engine.prepare_source(image, semantics.source_window())
    assert len(list(engine.render(source, semantics))) == FRAMES
    assert counter.calls == {"source": 1, "mapping_keypoints": FRAMES, "dense_motion": FRAMES, "decoder": 2,
                             "transfer": 2}
    assert Engine(tiny_nets, EngineOptions(device="cpu")).batch_size == 1  # auto on a CPU
    frames = engine.render(source, semantics)
    next(frames)  # a CPU hands out a batch's frames before it renders the next batch
    assert counter.calls["decoder"] == 3


def simulate_oom_above(monkeypatch, limit, calls):
    real = Engine.launch_batch

    def launch_batch(self, source, windows, *poses, **kwargs):
        calls.append(len(windows))
        if len(windows) > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(self, source, windows, *poses, **kwargs)

    monkeypatch.setattr(Engine, "launch_batch", launch_batch)


@pytest.mark.heavy
def test_out_of_memory_halves_the_batch_and_loses_no_frame(tiny_nets, job, monkeypatch):
    image, semantics = job
    yaw = camera_pose_sequence([0, 20, -10], FRAMES)
    engine = Engine(tiny_nets, EngineOptions(device="cpu", batch_size=1))
    source = engine.prepare_source(image, semantics.source_window())
    reference = np.stack(list(engine.render(source, semantics, yaw=yaw)))

    calls = []
    simulate_oom_above(monkeypatch, 2, calls)
    engine.batch_size = 8
    done = []
    frames = np.stack(list(engine.render(source, semantics, yaw=yaw, progress=done.append)))
    assert calls == [7, 4, 2, 2, 2, 1]  # 8 (7 frames left) -> 4 -> 2, then on at 2
    assert engine.stats.oom_retries == 2
    assert sum(done) == FRAMES
    np.testing.assert_array_equal(frames, reference)


def test_out_of_memory_at_batch_one_is_a_clear_error(tiny_nets, job, monkeypatch):
    image, semantics = job
    engine = Engine(tiny_nets, EngineOptions(device="cpu", batch_size=2))
    source = engine.prepare_source(image, semantics.source_window())
    calls = []
    simulate_oom_above(monkeypatch, 0, calls)
    with pytest.raises(RenderError, match="out of GPU memory .* batch size 1"):
        list(engine.render(source, semantics))
    assert calls == [2, 1]


def test_other_errors_are_never_retried(tiny_nets, job, monkeypatch):
    image, semantics = job
    engine = Engine(tiny_nets, EngineOptions(device="cpu", batch_size=4))
    source = engine.prepare_source(image, semantics.source_window())
    calls = []

    def broken(self, source, windows, *poses, **kwargs):
        calls.append(len(windows))
        raise RuntimeError("a real bug")

    monkeypatch.setattr(Engine, "launch_batch", broken)
    with pytest.raises(RuntimeError, match="a real bug"):
        list(engine.render(source, semantics))
    assert calls == [4]


@pytest.mark.heavy
def test_channels_last_decoder_as_on_cuda_gives_the_same_frames(tiny_nets, job):
    """CUDA runs the decoder in NHWC; the conversion must take (no 3D conv may be converted) and agree."""
    image, semantics = job
    _, reference = render_all(tiny_nets, image, semantics, batch_size=2)
    engine, frames = render_all(tiny_nets, image, semantics, batch_size=2, channels_last=True)
    assert engine.channels_last
    assert engine.decoder.fc.weight.is_contiguous(memory_format=torch.channels_last)
    assert_frames_close(frames, reference, "channels-last decoder vs contiguous")


def test_fp16_on_cpu_is_refused_clearly(tiny_nets):
    with pytest.raises(RenderError, match="fp16 needs a CUDA GPU"):
        Engine(tiny_nets, EngineOptions(device="cpu", precision="fp16"))


def test_cuda_without_gpu_is_a_clear_error(tiny_nets):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RenderError, match="no CUDA GPU"):
        Engine(tiny_nets, EngineOptions(device="cuda"))


def test_bf16_on_a_card_without_native_bf16_is_refused_clearly(monkeypatch):
    """A T4 (compute capability 7.5) would run bf16 emulated; torch.cuda.is_bf16_supported() says yes there."""
    from sfr_cli.engine import check_precision

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(RenderError, match="Tesla T4 has no bf16 support; use fp16 or fp32"):
        check_precision("bf16", torch.device("cuda"))
    assert check_precision("fp16", torch.device("cuda")) == torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert check_precision("bf16", torch.device("cuda")) == torch.bfloat16


@pytest.mark.heavy
def test_bf16_keeps_keypoints_in_fp32_and_stays_close(tiny_nets, job):
    image, semantics = job
    _, reference = render_all(tiny_nets, image, semantics, batch_size=4)
    engine, frames = render_all(tiny_nets, image, semantics, batch_size=4, precision="bf16")
    source = engine.prepare_source(image, semantics.source_window())
    assert source.kp_source.dtype == source.kp_canonical.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in engine.mapping.parameters())
    mse = np.mean((frames.astype(np.float64) - reference.astype(np.float64)) ** 2)
    psnr = 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))
    assert psnr >= 30, f"bf16 PSNR against fp32 is {psnr:.1f} dB"


def test_batch_size_below_one_is_refused(tiny_nets):
    with pytest.raises(RenderError, match="at least 1"):
        Engine(tiny_nets, EngineOptions(device="cpu", batch_size=0))


@pytest.mark.heavy
def test_camera_pose_overrides_change_the_head(tiny_nets, job):
    image, semantics = job
    engine = Engine(tiny_nets, EngineOptions(device="cpu", batch_size=FRAMES))
    source = engine.prepare_source(image, semantics.source_window())
    plain = np.stack(list(engine.render(source, semantics)))
    turned = np.stack(list(engine.render(source, semantics, yaw=camera_pose_sequence([0, 40], FRAMES))))
    assert np.abs(plain.astype(int) - turned.astype(int)).mean() > 0.5
    with pytest.raises(RenderError, match="yaw sequence has 3 values for 7 frames"):
        list(engine.render(source, semantics, yaw=np.zeros(3, np.float32)))


def test_windows_mismatching_the_mapping_net_are_refused(tiny_nets, job):
    image, _ = job
    engine = Engine(tiny_nets, EngineOptions(device="cpu"))
    with pytest.raises(RenderError, match="73 columns but the mapping net takes 70"):
        engine.prepare_source(image, np.zeros((73, 27), np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cuda_frames_match_the_cpu(tiny_nets, job, precision):
    """On a GPU: fp32 frames agree with the CPU's; reduced precision stays close to them."""
    if precision == "bf16" and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("this GPU has no bf16")
    image, semantics = job
    _, reference = render_all(tiny_nets, image, semantics, batch_size=1)
    engine = Engine(tiny_nets, EngineOptions(device="cuda", precision=precision))
    source = engine.prepare_source(image, semantics.source_window())
    frames = np.stack(list(engine.render(source, semantics)))
    # the automatic CUDA batch fits the tiny model's 7 frames into one batch on any GPU
    assert engine.stats.batch_sizes == [FRAMES] and source.kp_source.dtype == torch.float32
    mse = np.mean((frames.astype(np.float64) - reference.astype(np.float64)) ** 2)
    psnr = 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))
    # bf16's 8-bit mantissa is looser than fp16's 11 bits (README: the measured figures)
    assert psnr >= {"fp32": 50, "fp16": 40, "bf16": 35}[precision], f"{precision}: {psnr:.1f} dB against the CPU's fp32"


@pytest.mark.gpu
def test_cuda_batch_policy_runs_the_whole_batch_at_once(tiny_nets, job):
    """The CUDA half of BatchPolicy: mapping, motion and decoder once per batch; frames agree across
    batch sizes within a level (cuDNN may pick other algorithms for other batch sizes)."""
    image, semantics = job
    assert BatchPolicy.for_device(torch.device("cuda")) == BatchPolicy(motion_frames=None, auto_batch=None, launch_ahead=True)
    counter = StageCounter()
    engine = Engine(tiny_nets, EngineOptions(device="cuda", batch_size=4), step_hook=counter)
    source = engine.prepare_source(image, semantics.source_window())
    batched = np.stack(list(engine.render(source, semantics)))
    assert counter.calls == {"source": 1, "mapping_keypoints": 2, "dense_motion": 2, "decoder": 2, "transfer": 2}
    single = Engine(tiny_nets, EngineOptions(device="cuda", batch_size=1))
    frames = np.stack(list(single.render(single.prepare_source(image, semantics.source_window()), semantics)))
    assert np.abs(batched.astype(int) - frames.astype(int)).max() <= 1
