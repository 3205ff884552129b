"""The background the face enhancer pastes its faces on, one entry each: SadTalker's Lanczos-4 resize, or
an upsampler net (`--background-enhancer realesrgan`, SadTalker's `--background_enhancer realesrgan`).

An entry is a class: `Entry(upscale, weights, tile_reuse)` (`weights`: its file as found, None for Lanczos),
`load(device, models)` binds it to the render device (an upsampler loads its net there, through the model
cache, and starts a clip: nothing reused from another), `__call__((B, 3, H, W) uint8) -> (B, 3, H*u, W*u)
uint8` on the same device (u = `upscale`), `report()` its counters. An upsampler's weights rules (its file,
the keys the file wraps its state dict under, the untrained net, random weights) are its `Upsampler` row in
`UPSAMPLERS`, beside it; `stages.enhance` finds, checks and loads the file with the face path's code.

Real-ESRGAN runs as RealESRGANer(scale=2, tile=400, tile_pad=10, pre_pad=0) does (`tiling.TileUpsampler`),
with exact tile reuse inside a clip (`SFR_TILE_REUSE=0` turns it off). `--enhancer-upscale 1`: its 2x
output resized to the input's size with Lanczos-4, as RealESRGANer's `outscale=1`. It runs in fp32.

Importing this module imports no torch: the entries import their nets when called.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from ..errors import ConfigError
from .restorers import TINY_SUFFIX, unwrap_state_dict

TILE_REUSE_ENV = "SFR_TILE_REUSE"  # 0: every tile of every frame computed (tests, benchmarks); 1 (default): reuse
CPU_TILES_PER_CALL = 1  # on a CPU one tile at a time keeps each tile's arithmetic RealESRGANer's
CUDA_TILES_PER_CALL = 8  # on CUDA tiles of one shape batched across a batch's frames (halved on out-of-memory)


@dataclass(frozen=True)
class Upsampler:
    """An upsampler net's rules: `name` (the `--background-enhancer` value; `<name>-tiny` the same net at
    test widths), `weights_file` (found where the face enhancer's files are), `wrappers` (the keys the
    file's state dict may sit under, tried in order), `build(tiny)` (the untrained net, no I/O),
    `random_state_dict(net, seed)` (random weights in the real file's values), `scale` (the net's)."""

    name: str
    weights_file: str
    wrappers: Tuple[str, ...]
    build: Callable[[bool], object]
    random_state_dict: Callable[[object, int], Dict]
    scale: int = 2
    about: str = ""

    def wrap(self, state_dict: Dict) -> Dict:
        return {self.wrappers[0]: state_dict}

    def unwrap(self, checkpoint: Dict) -> Dict:
        return unwrap_state_dict(checkpoint, self.wrappers, self.about)


def _build_rrdbnet(tiny: bool):
    from ..nets.rrdbnet import REALESRGAN_X2PLUS_CONFIG, TINY_RRDBNET_CONFIG, RRDBNet

    return RRDBNet(**(TINY_RRDBNET_CONFIG if tiny else REALESRGAN_X2PLUS_CONFIG))


def _rrdbnet_random(net, seed: int):
    from ..nets.rrdbnet import random_state_dict

    return random_state_dict(net, seed)


UPSAMPLERS: Dict[str, Upsampler] = {
    # RealESRGANer(scale=2, model=RRDBNet(num_feat=64, num_block=23, num_grow_ch=32, scale=2)), x2plus weights
    "realesrgan": Upsampler("realesrgan", "RealESRGAN_x2plus.pth", ("params_ema", "params"), _build_rrdbnet,
                            _rrdbnet_random, about="Real-ESRGAN"),
}

# The one list of `--background-enhancer` names.
BACKGROUND_ENHANCERS: Tuple[str, ...] = tuple(name for upsampler in UPSAMPLERS
                                              for name in (upsampler, upsampler + TINY_SUFFIX))


def upsampler_of(name: str) -> Tuple[Upsampler, bool]:
    """(its upsampler, tiny) for a `--background-enhancer` name; KeyError for an unknown one."""
    tiny = name.endswith(TINY_SUFFIX)
    return UPSAMPLERS[name[: -len(TINY_SUFFIX)] if tiny else name], tiny


def tile_reuse() -> bool:
    """`$SFR_TILE_REUSE`: unset or 1 reuses unchanged tiles, 0 computes every tile; ConfigError otherwise."""
    value = os.environ.get(TILE_REUSE_ENV, "1").strip()
    if value not in ("0", "1"):
        raise ConfigError(f"${TILE_REUSE_ENV}={value!r}: use 1 (reuse unchanged tiles, the default) or 0 (compute "
                          "every tile)")
    return value == "1"


class LanczosBackground:
    """SadTalker's default background: OpenCV's Lanczos-4 resize (u = 2) or the frames themselves (u = 1).
    No weights."""

    name = "lanczos"

    def __init__(self, upscale: int, weights=None, tile_reuse: bool = True):
        self.upscale = upscale

    def load(self, device, models) -> None:
        """No weights."""

    def report(self) -> Dict[str, object]:
        return {}

    def __call__(self, frames):
        from ..imaging import face_blend

        return face_blend.upsample_background(frames, self.upscale)


class UpsampledBackground:
    """An upsampler net's background (`name` in `BACKGROUND_ENHANCERS`), tiled as RealESRGANer tiles, with
    exact tile reuse across the frames of the clip since `load` (one kept tile per grid position)."""

    def __init__(self, name: str, upscale: int, weights, tile_reuse: bool = True):
        self.name = name
        self.upscale = upscale
        self.weights = weights
        self.tile_reuse = tile_reuse
        self._tiles = None

    def load(self, device, models) -> None:
        """The net on `device` (once per process and file: the model cache) and a fresh tile runner: this
        stage's clip starts, no tile of another clip is reused."""
        from ..tiling import TileUpsampler
        from .enhance import load_part

        key = ("background", self.name, str(self.weights), str(device))
        net = models.stage_model(key, lambda: load_part("background", self.name, self.weights).to(device))
        upsampler = upsampler_of(self.name)[0]
        self._device = device
        self._tiles = TileUpsampler(net, scale=upsampler.scale, out_scale=self.upscale, reuse=self.tile_reuse,
                                    tiles_per_call=CUDA_TILES_PER_CALL if device.type == "cuda" else CPU_TILES_PER_CALL)

    def report(self) -> Dict[str, object]:
        tiles = self._tiles
        return {"background_enhancer": self.name, "background_tiles_computed": tiles.tiles_computed if tiles else 0,
                "background_tiles_reused": tiles.tiles_reused if tiles else 0, "background_tile_reuse": self.tile_reuse}

    def __call__(self, frames):
        """`(B, 3, H, W) uint8` -> `(B, 3, H*u, W*u) uint8`; a CUDA out-of-memory error halves the tiles per
        call and runs the batch again (a kept tile is only replaced once a batch completes)."""
        from ..engine import OUT_OF_MEMORY, attempt, halve_after_oom

        while True:
            result = attempt(self._tiles, frames.permute(0, 2, 3, 1))
            if result is not OUT_OF_MEMORY:
                return result.permute(0, 3, 1, 2)
            self._tiles.tiles_per_call = halve_after_oom(self._tiles.tiles_per_call, self._device,
                                                         "upsampling one background tile; free the GPU or use "
                                                         "--device cpu")


# The background slot: SadTalker's Lanczos resize, and one entry per upsampler (its rules in `UPSAMPLERS`).
BACKGROUNDS: Dict[str, Callable] = {
    "lanczos": lambda name, upscale, weights, reuse: LanczosBackground(upscale),
    "realesrgan": UpsampledBackground,
}


def make_background(name: Optional[str], upscale: int, weights=None, tile_reuse: bool = True):
    """The background entry for `name` (a `--background-enhancer` value; None: Lanczos), frames upscaled
    by `upscale`, its weights file `weights` as found."""
    base = LanczosBackground.name if name is None else name[: -len(TINY_SUFFIX)] if name.endswith(TINY_SUFFIX) else name
    return BACKGROUNDS[base](name, upscale, weights, tile_reuse)
