"""Networks, state-dict layout and checkpoint files: SadTalker's keys and shapes, strict and safe loading."""

import json
from pathlib import Path

import pytest
import torch

from sfr_cli.checkpoints import (MAPPING_CROP, MAPPING_FULL, RENDERER_PTH, build_networks, check_state_dict,
                                 find_checkpoints, load_networks, read_state_dicts, renderer_safetensors_name,
                                 write_random_checkpoints)
from sfr_cli.config import CONFIG_DIR, load_config
from sfr_cli.errors import CheckpointError

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
MANIFEST = REFERENCE / "state_dict_manifest.json"
needs_reference = pytest.mark.skipif(not MANIFEST.is_file(),
                                     reason="needs ../shared/reference (CI has it; a user's clone does not)")


def layout(state_dict):
    return {k: (list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in state_dict.items()}


def manifest_layout(part):
    return {k: (shape, dtype) for k, shape, dtype in json.loads(MANIFEST.read_text())[part]}


@needs_reference
@pytest.mark.slow  # builds the full-size model
@pytest.mark.parametrize("config_name, parts", [
    ("facerender.yaml", {"generator": "generator", "kp_detector": "kp_detector", "he_estimator": "he_estimator",
                         "mapping": "mapping_70"}),
    ("facerender_still.yaml", {"mapping": "mapping_73"}),
])
def test_modules_have_exactly_sadtalkers_keys_shapes_and_dtypes(config_name, parts):
    nets = build_networks(load_config(CONFIG_DIR / config_name), with_he_estimator=True)
    for attribute, part in parts.items():
        assert layout(getattr(nets, attribute).state_dict()) == manifest_layout(part), part


@pytest.fixture(scope="module")
def full_random(tmp_path_factory):
    directory = tmp_path_factory.mktemp("random_full")
    write_random_checkpoints(directory, load_config(CONFIG_DIR / "facerender.yaml"),
                             load_config(CONFIG_DIR / "facerender_still.yaml"), layout="safetensors", seed=5)
    return directory


@needs_reference
@pytest.mark.slow  # writes and loads full-size random weights (0.8 GB)
def test_random_checkpoints_for_default_configs_match_the_manifest(full_random):
    parts = read_state_dicts(full_random / renderer_safetensors_name(256))
    for part in ("generator", "kp_detector", "he_estimator"):
        assert layout(parts[part]) == manifest_layout(part), part
    assert layout(read_state_dicts(full_random / MAPPING_CROP)["mapping"]) == manifest_layout("mapping_70")
    assert layout(read_state_dicts(full_random / MAPPING_FULL)["mapping"]) == manifest_layout("mapping_73")
    for preprocess, name in (("crop", "facerender.yaml"), ("full", "facerender_still.yaml")):
        files = find_checkpoints(full_random, preprocess=preprocess)
        load_networks(load_config(CONFIG_DIR / name), files)  # strict: raises on any mismatch


@pytest.fixture()
def tiny_dir(tmp_path):
    write_random_checkpoints(tmp_path, load_config(CONFIG_DIR / "tiny.yaml"),
                             load_config(CONFIG_DIR / "tiny_still.yaml"), layout="pth", seed=1)
    return tmp_path


@pytest.mark.heavy
def test_random_weights_are_deterministic(tmp_path):
    configs = load_config(CONFIG_DIR / "tiny.yaml"), load_config(CONFIG_DIR / "tiny_still.yaml")
    write_random_checkpoints(tmp_path / "a", *configs, seed=4)
    write_random_checkpoints(tmp_path / "b", *configs, seed=4)
    write_random_checkpoints(tmp_path / "c", *configs, seed=5)
    a, b, c = (read_state_dicts(tmp_path / d / RENDERER_PTH)["generator"] for d in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["decoder.fc.weight"], c["decoder.fc.weight"])


def test_files_resolve_as_sadtalker_does(tiny_dir):
    files = find_checkpoints(tiny_dir, preprocess="crop")
    assert files.renderer.name == RENDERER_PTH and files.mapping.name == MAPPING_CROP and files.layout == "pth"
    assert find_checkpoints(tiny_dir, preprocess="extfull").mapping.name == MAPPING_FULL
    # a safetensors file for the size wins over the .pth.tar, as in SadTalker
    (tiny_dir / renderer_safetensors_name(512)).write_bytes(b"")
    assert find_checkpoints(tiny_dir, size_px=512).renderer.name == renderer_safetensors_name(512)
    assert find_checkpoints(tiny_dir, size_px=256).renderer.name == RENDERER_PTH
    explicit = find_checkpoints(tiny_dir, checkpoint=tiny_dir / RENDERER_PTH, mapping=tiny_dir / MAPPING_FULL)
    assert explicit.mapping.name == MAPPING_FULL


def test_missing_folder_and_files_are_named(tmp_path, tiny_dir):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        find_checkpoints(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="holds neither SadTalker_V0.0.2_256.safetensors nor"):
        find_checkpoints(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else None)
    (tiny_dir / MAPPING_CROP).unlink()
    with pytest.raises(CheckpointError, match=f"{MAPPING_CROP}: checkpoint file not found"):
        find_checkpoints(tiny_dir)


def test_seventy_three_coefficient_mapping_under_a_seventy_config_names_key_and_shapes(tiny_dir):
    files = find_checkpoints(tiny_dir, mapping=tiny_dir / MAPPING_FULL)
    with pytest.raises(CheckpointError) as info:
        load_networks(load_config(CONFIG_DIR / "tiny.yaml"), files)
    message = str(info.value)
    assert MAPPING_FULL in message and "first.0.weight" in message
    assert "[64, 73, 7]" in message and "[64, 70, 7]" in message and "73 coefficients" in message


def test_truncated_checkpoint_is_a_clear_error(tiny_dir):
    path = tiny_dir / RENDERER_PTH
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_state_dicts(path)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    write_random_checkpoints(tmp_path, load_config(CONFIG_DIR / "tiny.yaml"),
                             load_config(CONFIG_DIR / "tiny_still.yaml"), layout="safetensors")
    path = tmp_path / renderer_safetensors_name(256)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_state_dicts(path)


class Payload:
    """Unpickling this would create a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_objects_are_refused_never_run(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / RENDERER_PTH
    torch.save({"generator": {"w": torch.zeros(1)}, "evil": Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="code or objects that sfr will not run; sfr never runs code") as info:
        read_state_dicts(path)
    assert not marker.exists()
    message = str(info.value)
    assert "weights_only" not in message and "torch.load" not in message  # torch's advice is not for sfr's users
    assert "accepts SadTalker's SadTalker_V0.0.2_256.safetensors" in message and MAPPING_FULL in message


@pytest.mark.heavy
def test_non_finite_weights_are_refused(tiny_dir):
    path = tiny_dir / MAPPING_CROP
    data = torch.load(path, weights_only=True)
    data["mapping"]["fc_t.bias"][0] = float("nan")
    torch.save(data, path)
    with pytest.raises(CheckpointError, match="fc_t.bias holds NaN"):
        load_networks(load_config(CONFIG_DIR / "tiny.yaml"), find_checkpoints(tiny_dir))


def test_strict_check_names_missing_and_unexpected_keys():
    mapping = build_networks(load_config(CONFIG_DIR / "tiny.yaml")).mapping
    sd = dict(mapping.state_dict())
    sd.pop("fc_exp.bias")
    with pytest.raises(CheckpointError, match="missing 1 key.*'fc_exp.bias'"):
        check_state_dict(mapping, sd, "m.pth", "tiny.yaml")
    sd = dict(mapping.state_dict(), extra=torch.zeros(1))
    with pytest.raises(CheckpointError, match="'extra'"):
        check_state_dict(mapping, sd, "m.pth", "tiny.yaml")
