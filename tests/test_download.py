"""`sfr checkpoints download` against a local HTTP server on 127.0.0.1 (tests/weights_server.py) serving
tiny random weights under SadTalker's names: a full download, resume after an interruption (across runs and
within one), a 404, a truncated file, a stalled server, a file with the wrong keys, no network. Nothing
here reaches beyond 127.0.0.1."""

import io
import json
import socket
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import error_line
from sfr_cli.cli import sfr
from sfr_cli.download import RELEASES
from sfr_cli.errors import CheckpointError
from weights_server import WeightsServer

RENDERER = "SadTalker_V0.0.2_256.safetensors"
MAPPING = "mapping_00229-model.pth.tar"
ENHANCER_NAMES = ("GFPGANv1.4.pth", "detection_Resnet50_Final.pth", "parsing_parsenet.pth")


@pytest.fixture(scope="module")
def served(served_tiny_weights):
    return served_tiny_weights


def download(url, out_dir, *args, env=None):
    return CliRunner().invoke(sfr, ["checkpoints", "download", str(out_dir), "--config", "tiny", "--quiet",
                                    "--url", url, *args], env=env)


def leftovers(folder: Path):
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.mark.heavy
def test_full_download_then_nothing_to_fetch(tmp_path, served):
    out_dir = tmp_path / "SadTalker" / "checkpoints"
    with WeightsServer(served) as server:
        result = download(server.url, out_dir, "--enhancer")
        assert result.exit_code == 0, result.output
        assert result.output.strip() == str(out_dir)
        assert leftovers(out_dir) == sorted([RENDERER, MAPPING, "mapping_00109-model.pth.tar"])
        enhancer_dir = tmp_path / "SadTalker" / "gfpgan" / "weights"  # where SadTalker's script puts them
        assert leftovers(enhancer_dir) == sorted(ENHANCER_NAMES)
        for path in list(out_dir.iterdir()) + list(enhancer_dir.iterdir()):
            assert path.read_bytes() == served[path.name], path.name
        assert all(rng is None for _, rng in server.requests)
        fetched = len(server.requests)
        again = download(server.url, out_dir, "--enhancer")
        assert again.exit_code == 0, again.output
        assert len(server.requests) == fetched  # every file already there and checked: nothing fetched


@pytest.mark.heavy
def test_environment_variable_gives_the_base_url(tmp_path, served):
    with WeightsServer(served) as server:
        result = CliRunner().invoke(sfr, ["checkpoints", "download", str(tmp_path / "ck"), "--config", "tiny",
                                          "--quiet", "--layout", "pth"], env={"SFR_DOWNLOAD_URL": server.url})
        assert result.exit_code == 0, result.output
        assert {name for name, _ in server.requests} == {"facevid2vid_00189-model.pth.tar", MAPPING,
                                                         "mapping_00109-model.pth.tar"}


@pytest.mark.heavy
def test_an_interrupted_transfer_is_resumed_by_the_next_run(tmp_path, served):
    out_dir = tmp_path / "ck"
    cut = len(served[RENDERER]) // 3
    with WeightsServer(served) as server:
        server.faults[RENDERER] = [f"cut:{cut}"]
        line = error_line(download(server.url, out_dir, "--retries", "0"))
        assert RENDERER in line and f"{cut:,} bytes" in line and "resumes" in line
        assert (out_dir / (RENDERER + ".part")).stat().st_size == cut
        assert not (out_dir / RENDERER).exists()
        server.requests.clear()
        result = download(server.url, out_dir)
        assert result.exit_code == 0, result.output
        assert (RENDERER, f"bytes={cut}-") in server.requests
        assert (out_dir / RENDERER).read_bytes() == served[RENDERER]
        assert not (out_dir / (RENDERER + ".part")).exists()


@pytest.mark.heavy
def test_a_cut_transfer_is_retried_within_the_run_from_where_it_stopped(tmp_path, served):
    out_dir = tmp_path / "ck"
    with WeightsServer(served) as server:
        server.faults[MAPPING] = ["cut:1000"]
        result = download(server.url, out_dir, "--retries", "1")
        assert result.exit_code == 0, result.output
        assert [rng for name, rng in server.requests if name == MAPPING] == [None, "bytes=1000-"]
        assert (out_dir / MAPPING).read_bytes() == served[MAPPING]


def test_a_server_that_does_not_resume_restarts_the_file(tmp_path, served):
    out_dir = tmp_path / "ck"
    out_dir.mkdir()
    (out_dir / (MAPPING + ".part")).write_bytes(b"x" * 500)  # not even the file's bytes
    with WeightsServer(served) as server:
        server.faults[MAPPING] = ["norange"]
        result = download(server.url, out_dir)
        assert result.exit_code == 0, result.output
        assert (out_dir / MAPPING).read_bytes() == served[MAPPING]


def test_404_is_one_line_and_not_retried(tmp_path, served):
    out_dir = tmp_path / "ck"
    with WeightsServer(served) as server:
        server.faults[RENDERER] = ["404"]
        line = error_line(download(server.url, out_dir, "--retries", "3"))
        assert "HTTP 404" in line and RENDERER in line
        assert [name for name, _ in server.requests] == [RENDERER]
    assert leftovers(out_dir) == []


@pytest.mark.heavy
def test_a_truncated_file_is_not_kept(tmp_path, served):
    out_dir = tmp_path / "ck"
    with WeightsServer(served) as server:
        server.faults[MAPPING] = [f"truncate:{len(served[MAPPING]) // 2}"]
        line = error_line(download(server.url, out_dir))
        assert MAPPING in line and "truncated or corrupt" in line and "not kept" in line
    assert MAPPING not in leftovers(out_dir) and not any(".sfr-" in name or name.endswith(".part")
                                                         for name in leftovers(out_dir))


@pytest.mark.heavy
def test_a_stalled_server_times_out(tmp_path, served):
    out_dir = tmp_path / "ck"
    with WeightsServer(served) as server:
        server.faults[RENDERER] = ["stall"]
        line = error_line(download(server.url, out_dir, "--timeout", "0.5", "--retries", "0"))
        assert "no data before the timeout" in line and RENDERER in line
    assert not (out_dir / RENDERER).exists()


@pytest.mark.heavy
def test_a_file_with_the_wrong_keys_is_not_kept(tmp_path, served):
    wrong = dict(served)
    mapping = torch.load(io.BytesIO(served[MAPPING]), weights_only=True)
    renamed = {("fc_yaw_renamed." + k[len("fc_yaw."):] if k.startswith("fc_yaw.") else k): v
               for k, v in mapping["mapping"].items()}
    buffer = io.BytesIO()
    torch.save({"mapping": renamed}, buffer)
    wrong[MAPPING] = buffer.getvalue()
    out_dir = tmp_path / "SadTalker" / "checkpoints"
    with WeightsServer(wrong) as server:
        line = error_line(download(server.url, out_dir))
        assert MAPPING in line and "fc_yaw" in line and "not kept" in line
        assert not (out_dir / MAPPING).exists()
    with WeightsServer({**served, "parsing_parsenet.pth": served["GFPGANv1.4.pth"]}) as server:  # another file
        line = error_line(download(server.url, out_dir, "--enhancer"))
        assert "parsing_parsenet.pth" in line and "not kept" in line
    assert not (tmp_path / "SadTalker" / "gfpgan" / "weights" / "parsing_parsenet.pth").exists()


@pytest.mark.heavy
def test_a_code_carrying_file_is_refused(tmp_path, served):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    hostile = dict(served)
    hostile[MAPPING] = pickle.dumps({"mapping": Payload()}, protocol=2)
    with WeightsServer(hostile) as server:
        line = error_line(download(server.url, tmp_path / "ck"))
    assert "never runs code" in line and "this must never run" not in line


def test_no_network_is_one_clear_line(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    line = error_line(download(f"http://127.0.0.1:{port}/", tmp_path / "ck", "--retries", "0"))
    assert "connection refused" in line and "offline" in line


@pytest.mark.heavy
def test_an_existing_bad_file_is_named_and_kept_until_overwrite(tmp_path, served):
    out_dir = tmp_path / "ck"
    out_dir.mkdir()
    (out_dir / MAPPING).write_bytes(b"not a checkpoint")
    with WeightsServer(served) as server:
        line = error_line(download(server.url, out_dir))
        assert MAPPING in line and "--overwrite" in line
        assert (out_dir / MAPPING).read_bytes() == b"not a checkpoint"
        result = download(server.url, out_dir, "--overwrite")
        assert result.exit_code == 0, result.output
        assert (out_dir / MAPPING).read_bytes() == served[MAPPING]


def test_a_base_url_must_be_http(tmp_path):
    line = error_line(download("ftp://example.invalid/", tmp_path / "ck"))
    assert "http" in line


def test_release_urls_are_the_public_release_files():
    for name, file in RELEASES.items():
        assert file.url.startswith("https://github.com/") and "/releases/download/" in file.url
        assert file.url.endswith("/" + name)


def test_optional_files_are_checked_against_the_nets_the_manifest_describes(reference_dir):
    """RestoreFormer.pth and RealESRGAN_x2plus.pth as the reference manifest lists them fit sfr's nets under
    loading's check (`stages.enhance.check_part`), and a renamed key does not."""
    from sfr_cli.stages import enhance

    manifest = json.loads((reference_dir / "enhancer_state_dict_manifest.json").read_text())
    for name, (part, net) in {"RestoreFormer.pth": ("restorer", "restoreformer"),
                              "RealESRGAN_x2plus.pth": ("background", "realesrgan")}.items():
        state_dict = {key: torch.empty(shape, device="meta") for key, shape, _ in manifest[name]}
        enhance.check_part(part, net, state_dict, Path(name))  # passes
        first = next(iter(state_dict))
        state_dict["renamed." + first] = state_dict.pop(first)
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            enhance.check_part(part, net, state_dict, Path(name))


def test_an_optional_enhancers_file_is_checked_as_loading_checks_it(tiny_optional_enhancer_weights, tmp_path):
    """RestoreFormer.pth and RealESRGAN_x2plus.pth go through the enhance stage's one reader and check (at
    the -tiny widths for a tiny config): the tiny files pass; another net's weights and a file without the
    params_ema/params wrapper are named."""
    from sfr_cli.download import WeightCheck

    check = WeightCheck("tiny")
    for name in ("RestoreFormer.pth", "RealESRGAN_x2plus.pth"):
        check(RELEASES[name], tiny_optional_enhancer_weights / name)
        path = tmp_path / name
        torch.save({"params": {"conv_first.weight": torch.zeros(2, 3, 3, 3)}}, path)
        with pytest.raises(CheckpointError, match=f"{name}: .*(missing|has shape)"):
            check(RELEASES[name], path)
        torch.save({"conv_first.weight": torch.zeros(2, 3, 3, 3)}, path)
        with pytest.raises(CheckpointError, match=f"'params_ema' or 'params'.*is this {name}"):
            check(RELEASES[name], path)
