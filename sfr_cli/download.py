"""SadTalker's weight files fetched from their public release URLs: `sfr checkpoints download`.

The files and URLs are those SadTalker's own `scripts/download_models.sh` fetches (the renderer, both
mapping files, and for the face enhancer GFPGAN v1.4, RetinaFace-R50 and ParseNet into `gfpgan/weights`),
plus the two optional enhancers' files from the URLs SadTalker's `src/utils/face_enhancer.py` names
(`RestoreFormer.pth`, `RealESRGAN_x2plus.pth`). `$SFR_DOWNLOAD_URL` (or `--url`) replaces every file's
release folder with one base URL, `BASE/NAME`: a mirror, or a test's server on 127.0.0.1.

How one file arrives, so that nothing half-written or foreign is ever kept under its name:
- it is fetched into `NAME.part` beside its target; a `.part` left by an interrupted run (Ctrl-C, a lost
  connection, a Colab disconnect) is resumed with an HTTP Range request, or started over when the server
  does not resume;
- every read has a timeout, and a failed try (no connection, a stall, a cut-off transfer, a server error)
  is retried a few times, resuming where it stopped; a 404 or another refusal is not retried;
- the finished file is checked as loading checks it, before it gets its name: read with
  `torch.load(weights_only=True)` (or safetensors), no code run, every key and shape against the nets
  (`--config` gives their widths); only then is it renamed onto `NAME`. A file failing the check is removed.
- while it downloads, the target is claimed (`outputs.OutputClaim`), so two runs never write one file.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Protocol, Tuple

from . import __version__
from .errors import CheckpointError, DownloadError
from .outputs import OutputClaim, commit_path, remove_quietly, temporary_path

URL_ENV = "SFR_DOWNLOAD_URL"
PART_SUFFIX = ".part"
CHUNK_BYTES = 1 << 20
DEFAULT_TIMEOUT_SECONDS = 60.0
DEFAULT_RETRIES = 3
MAX_RETRY_WAIT_SECONDS = 8.0

# Release folders, as SadTalker's scripts/download_models.sh and src/utils/face_enhancer.py name them.
SADTALKER_RC = "https://github.com/OpenTalker/SadTalker/releases/download/v0.0.2-rc/"
SADTALKER_V002 = "https://github.com/Winfredy/SadTalker/releases/download/v0.0.2/"  # the script's older links
GFPGAN_V130 = "https://github.com/TencentARC/GFPGAN/releases/download/v1.3.0/"
GFPGAN_V134 = "https://github.com/TencentARC/GFPGAN/releases/download/v1.3.4/"
FACEXLIB_V010 = "https://github.com/xinntao/facexlib/releases/download/v0.1.0/"
FACEXLIB_V022 = "https://github.com/xinntao/facexlib/releases/download/v0.2.2/"
REALESRGAN_V021 = "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.1/"

CHECKPOINTS, ENHANCER = "checkpoints", "enhancer"  # the folder a file goes to


@dataclass(frozen=True)
class WeightFile:
    """One of SadTalker's weight files: its name, its public URL, what it holds (`kind`: renderer,
    mapping, or the enhancer part gfpgan, detector, parser, restoreformer, realesrgan) and its folder."""

    name: str
    url: str
    kind: str
    folder: str = CHECKPOINTS


def _release(folder_url: str, name: str, kind: str, folder: str = CHECKPOINTS) -> WeightFile:
    return WeightFile(name, folder_url + name, kind, folder)


RELEASES: Dict[str, WeightFile] = {f.name: f for f in (
    _release(SADTALKER_RC, "SadTalker_V0.0.2_256.safetensors", "renderer"),
    _release(SADTALKER_RC, "SadTalker_V0.0.2_512.safetensors", "renderer"),
    _release(SADTALKER_V002, "facevid2vid_00189-model.pth.tar", "renderer"),
    _release(SADTALKER_RC, "mapping_00229-model.pth.tar", "mapping"),
    _release(SADTALKER_RC, "mapping_00109-model.pth.tar", "mapping"),
    _release(GFPGAN_V130, "GFPGANv1.4.pth", "gfpgan", ENHANCER),
    _release(FACEXLIB_V010, "detection_Resnet50_Final.pth", "detector", ENHANCER),
    _release(FACEXLIB_V022, "parsing_parsenet.pth", "parser", ENHANCER),
    _release(GFPGAN_V134, "RestoreFormer.pth", "restoreformer", ENHANCER),
    _release(REALESRGAN_V021, "RealESRGAN_x2plus.pth", "realesrgan", ENHANCER),
)}

def choose_files(*, size_px: int = 256, layout: str = "safetensors", enhancer: bool = False,
                 restoreformer: bool = False, background_enhancer: bool = False) -> List[WeightFile]:
    """The files a setup needs: the renderer of `layout` (safetensors: SadTalker_V0.0.2_<size>; pth:
    facevid2vid_00189-model.pth.tar), both mapping files, and the enhancers' files asked for (RestoreFormer
    uses the same face detector and parser as GFPGAN)."""
    if layout not in ("safetensors", "pth"):
        raise CheckpointError(f"unknown checkpoint layout {layout!r}; use safetensors or pth")
    renderer = f"SadTalker_V0.0.2_{size_px}.safetensors" if layout == "safetensors" else "facevid2vid_00189-model.pth.tar"
    names = [renderer, "mapping_00229-model.pth.tar", "mapping_00109-model.pth.tar"]
    if enhancer:
        names.append("GFPGANv1.4.pth")
    if enhancer or restoreformer:
        names += ["detection_Resnet50_Final.pth", "parsing_parsenet.pth"]
    if restoreformer:
        names.append("RestoreFormer.pth")
    if background_enhancer:
        names.append("RealESRGAN_x2plus.pth")
    return [RELEASES[name] for name in names]


def default_enhancer_dir(checkpoint_dir) -> Path:
    """Where SadTalker's script puts the enhancer's files, and where sfr looks: `gfpgan/weights` beside
    the checkpoints folder."""
    return Path(checkpoint_dir).parent / "gfpgan" / "weights"


@dataclass(frozen=True)
class Download:
    file: WeightFile
    url: str
    target: Path

    @property
    def part(self) -> Path:
        return self.target.with_name(self.target.name + PART_SUFFIX)


def plan_downloads(files: List[WeightFile], checkpoint_dir, enhancer_dir=None,
                   base_url: Optional[str] = None) -> List[Download]:
    """Where each file comes from (its release URL, or `base_url`/NAME) and where it goes."""
    enhancer_dir = Path(enhancer_dir) if enhancer_dir is not None else default_enhancer_dir(checkpoint_dir)
    if base_url is not None and urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
        raise DownloadError(f"{base_url}: not an http(s) URL; give the base URL the files are under, "
                            f"e.g. http://127.0.0.1:8000/ (--url or ${URL_ENV})")
    plans = []
    for file in files:
        url = file.url if not base_url else base_url.rstrip("/") + "/" + urllib.parse.quote(file.name)
        folder = Path(checkpoint_dir) if file.folder == CHECKPOINTS else enhancer_dir
        plans.append(Download(file, url, folder / file.name))
    return plans


# ---------------------------------------------------------------------------------------------------
# The check before a file is kept


class WeightCheck:
    """Checks a weight file as loading would (keys, shapes, dtypes; no code run), against the nets of
    `config` (a built-in name or YAML path: its widths; tiny configs check the enhancers' files at their -tiny
    widths)."""

    def __init__(self, config: Optional[str] = None):
        from .config import config_pair, config_path, load_config

        self.config_70, self.config_73 = config_pair(load_config(config_path(config)))
        self.tiny = self.config_70.name.startswith("tiny")

    def __call__(self, file: WeightFile, path: Path) -> None:
        import torch

        from . import checkpoints
        from .stages import enhance

        if file.kind == "renderer":
            with torch.device("meta"):
                nets = checkpoints.build_networks(self.config_70)
            parts = checkpoints.read_state_dicts(path, parts=("generator", "kp_detector"))
            for part in ("generator", "kp_detector"):
                if part not in parts:
                    raise CheckpointError(f"{path}: no '{part}' state dict inside; is this {file.name}?")
                checkpoints.check_state_dict(getattr(nets, part), parts[part], f"{path} [{part}]", self.config_70.name)
        elif file.kind == "mapping":
            config = self.config_70 if file.name == checkpoints.MAPPING_CROP else self.config_73
            with torch.device("meta"):
                nets = checkpoints.build_networks(config)
            parts = checkpoints.read_state_dicts(path, parts=("mapping",))
            if "mapping" not in parts:
                raise CheckpointError(f"{path}: no 'mapping' state dict inside; is this {file.name}?")
            checkpoints.check_state_dict(nets.mapping, parts["mapping"], str(path), config.name)
        elif (found := enhance.weights_part(file.name)) is not None:  # the enhancers' files: loading's check
            part, names = found
            name = next(name for name in names if name.endswith("-tiny") == self.tiny)
            enhance.check_part(part, name, enhance.read_weights(part, path, name), path)
        else:
            raise CheckpointError(f"{path}: sfr has no check for {file.name}")


# ---------------------------------------------------------------------------------------------------
# The transfer


class TransferReporter(Protocol):
    def start(self, name: str, total_bytes: Optional[int], done_bytes: int = 0) -> None: ...
    def advance(self, count_bytes: int) -> None: ...
    def note(self, message: str) -> None: ...
    def finish(self) -> None: ...


class _Retry(Exception):
    """A failed try worth another (the connection, a stall, a cut-off transfer, a server error)."""


KEPT, DOWNLOADED = "kept", "downloaded"


def fetch(download: Download, check, reporter: TransferReporter, *, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
          retries: int = DEFAULT_RETRIES, overwrite: bool = False) -> str:
    """Fetch one file to `download.target` (see the module docstring); `check(file, path)` raises
    CheckpointError for a file that must not be kept. Returns KEPT (already there and it passes the check)
    or DOWNLOADED. Raises DownloadError (the partial file kept for the next run) or CheckpointError."""
    target = download.target
    if target.exists() and not overwrite:
        try:
            check(download.file, target)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}; it was there before this run: pass --overwrite to download it "
                                  "again") from exc
        reporter.note(f"{target}: already there (checked)")
        return KEPT
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"{target.parent}: cannot create the folder ({exc.strerror or exc})") from exc
    with OutputClaim(target):
        tries = retries + 1
        for attempt in range(1, tries + 1):
            try:
                _transfer(download, reporter, timeout_seconds)
                break
            except _Retry as exc:
                reporter.finish()
                if attempt == tries:
                    raise DownloadError(_failure(download, str(exc), tries)) from exc.__cause__
                wait = min(2.0 ** (attempt - 1), MAX_RETRY_WAIT_SECONDS)
                reporter.note(f"{download.file.name}: {exc}; trying again in {wait:g} s ({attempt} of {tries})")
                time.sleep(wait)
        reporter.finish()
        _keep(download, check, overwrite)
    return DOWNLOADED


def _keep(download: Download, check, overwrite: bool) -> None:
    """Check the complete `.part` under a temporary name with the target's suffix (the format follows the
    suffix), then rename it onto the target; a file failing the check is removed."""
    checking = temporary_path(download.target, download.target.suffix)
    os.replace(download.part, checking)
    try:
        try:
            check(download.file, checking)
        except CheckpointError as exc:
            message = str(exc).replace(str(checking), f"{download.file.name} from {download.url}")
            raise CheckpointError(f"{message}; the downloaded file was not kept") from exc
        commit_path(checking, download.target, overwrite=overwrite)
    finally:
        remove_quietly(checking)


CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def _transfer(download: Download, reporter: TransferReporter, timeout_seconds: float) -> None:
    """One try: the rest of `download.part` from the server, resumed where it holds bytes already."""
    part = download.part
    done = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"sfr/{__version__}"}
    if done:
        headers["Range"] = f"bytes={done}-"
    request = urllib.request.Request(download.url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout_seconds)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and done:  # the part may be complete already, or longer than the file now is
            total = _total_from_range(exc.headers.get("Content-Range"))
            if total == done:
                return
            remove_quietly(part)
            raise _Retry("the server's copy differs from the partial file; starting over") from exc
        if exc.code in (408, 429) or exc.code >= 500:
            raise _Retry(f"HTTP {exc.code} {exc.reason}") from exc
        raise DownloadError(f"{download.url}: HTTP {exc.code} {exc.reason}; the file is not there (a moved "
                            f"release, or a wrong --url/${URL_ENV})") from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _Retry(_reason(exc)) from exc
    with response:
        if response.status == 206:
            match = CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
            if not match or int(match.group(1)) != done:
                remove_quietly(part)
                raise _Retry("the server resumed at another byte than asked; starting over")
            total = None if match.group(3) == "*" else int(match.group(3))
            mode = "ab"
        else:
            if done:
                reporter.note(f"{download.file.name}: the server does not resume transfers; starting over")
            done, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        reporter.start(download.file.name, total, done)
        try:
            out = open(part, mode)
        except OSError as exc:
            raise DownloadError(f"{part}: cannot write ({exc.strerror or exc}); check the folder") from exc
        with out:
            while True:
                try:
                    chunk = response.read(CHUNK_BYTES)
                except (OSError, http.client.HTTPException) as exc:
                    raise _Retry(f"{_reason(exc)} after {done:,} bytes") from exc
                if not chunk:
                    break
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise DownloadError(f"{part}: cannot write ({exc.strerror or exc}); is the disk full?") from exc
                done += len(chunk)
                reporter.advance(len(chunk))
    if total is not None and done != total:
        raise _Retry(f"the connection closed at {done:,} of {total:,} bytes")


def _total_from_range(value: Optional[str]) -> Optional[int]:
    match = re.fullmatch(r"bytes \*/(\d+)", (value or "").strip())
    return int(match.group(1)) if match else None


def _reason(exc: BaseException) -> str:
    """A short cause for a failed try: 'no data for 60 s', 'connection refused', 'name not resolved' ..."""
    cause = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(cause, (socket.timeout, TimeoutError)):
        return "no data before the timeout"
    if isinstance(cause, socket.gaierror):
        return f"cannot resolve the server's name ({cause.strerror or cause})"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, http.client.IncompleteRead):
        return "the connection closed early"
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(cause) or type(cause).__name__


def _failure(download: Download, reason: str, tries: int) -> str:
    """The one-line error after the last try."""
    host = urllib.parse.urlsplit(download.url).netloc
    part = download.part
    kept = (f"; the {part.stat().st_size:,} bytes so far are kept in {part} and the next run resumes them"
            if part.exists() and part.stat().st_size else "")
    offline = ("; is this machine offline? Run the command again once it is online, or point --url/"
               f"${URL_ENV} at a mirror" if "resolve" in reason or "refused" in reason or "unreachable" in reason
               else "; check the connection and run the command again")
    return f"{download.file.name}: download from {host} failed after {tries} tr{'y' if tries == 1 else 'ies'} ({reason}){kept}{offline}"


def download_weights(downloads: List[Download], check, reporter: TransferReporter, **options) -> Dict[Path, str]:
    """Fetch every file in order; {target: KEPT or DOWNLOADED}. Stops at the first error (files done so far
    stay, each complete and checked)."""
    return {download.target: fetch(download, check, reporter, **options) for download in downloads}
