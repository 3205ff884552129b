"""Tiled upsampling with RealESRGANer's exact geometry, and exact reuse of tiles that did not change.

SadTalker's `--background_enhancer realesrgan` builds `RealESRGANer(scale=2, tile=400, tile_pad=10,
pre_pad=0)`. Per frame, what RealESRGANer.enhance does (and `TileUpsampler` does for a batch of frames):

1. the uint8 frame to float32 `/ 255` (RGB: RealESRGANer flips its BGR input to RGB itself, so the net
   sees RGB, and sfr's frames are RGB already);
2. reflect-padded at the bottom and right to a multiple of 2 in height and width (`mod_scale` for scale 2;
   4 for scale 1), no pre-pad;
3. cut into tiles of 400 x 400 px in row-major order (`tile_grid`), each read with 10 px of context on
   every side, clamped to the padded frame; each padded tile runs through the net alone;
4. each tile's output cropped back to its own 800 x 800 (2x) box and placed; the mod pad cropped off;
5. clamped to [0, 1], `* 255`, rounded half to even, uint8; for `outscale=1` that 2x picture is resized to
   the input's size with OpenCV's Lanczos-4 (`imaging.resize.resize_lanczos4`, exact).

A tile's output depends only on its padded input. Exact reuse: per grid position the last padded input
and its uint8 output are kept (one tile per position, so memory is bounded by the frame size, not the
clip's length); a frame whose padded tile is bit-identical (`torch.equal`-style, on the device) to the
previous frame's at that position takes the kept output instead of running the net. Paste-back frames keep
the picture outside the face box, so most tiles are computed once per clip. The frames are unchanged bit
for bit; `reuse=False` turns it off (tests, benchmarks).

Torch only, no file access, no device choice: tensors stay where the caller put them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

TILE_PX = 400  # SadTalker: RealESRGANer(tile=400)
TILE_PAD_PX = 10  # tile_pad=10
MOD_SCALE = {2: 2, 1: 4}  # RealESRGANer pads H and W to multiples of this (none for scale 4)

Box = Tuple[int, int, int, int]  # x0, y0, x1, y1 (end exclusive)


@dataclass(frozen=True)
class Tile:
    """One tile of RealESRGANer.tile_process, in its order: grid position `grid_xy`, the `input_box` it
    owns, the `padded_box` the net reads (context clamped to the padded frame), the `output_box` it fills
    in the upscaled frame and `crop_box`, the part of the net's output kept (in the tile's output)."""

    grid_xy: Tuple[int, int]
    input_box: Box
    padded_box: Box
    output_box: Box
    crop_box: Box

    @property
    def padded_size(self) -> Tuple[int, int]:
        """(height, width) of the padded input."""
        x0, y0, x1, y1 = self.padded_box
        return y1 - y0, x1 - x0


def mod_pad(height_px: int, width_px: int, scale: int) -> Tuple[int, int]:
    """RealESRGANer's reflect pad (bottom rows, right columns) making H and W multiples of `MOD_SCALE`."""
    mod = MOD_SCALE.get(scale)
    if mod is None:
        return 0, 0
    return (mod - height_px % mod) % mod, (mod - width_px % mod) % mod


def tile_grid(height_px: int, width_px: int, scale: int = 2, tile_px: int = TILE_PX,
              pad_px: int = TILE_PAD_PX) -> List[Tile]:
    """The tiles of a padded frame of `height_px` x `width_px`, row by row (RealESRGANer's order)."""
    tiles = []
    for gy in range(math.ceil(height_px / tile_px)):
        for gx in range(math.ceil(width_px / tile_px)):
            x0, y0 = gx * tile_px, gy * tile_px
            x1, y1 = min(x0 + tile_px, width_px), min(y0 + tile_px, height_px)
            px0, py0 = max(x0 - pad_px, 0), max(y0 - pad_px, 0)
            px1, py1 = min(x1 + pad_px, width_px), min(y1 + pad_px, height_px)
            cx0, cy0 = (x0 - px0) * scale, (y0 - py0) * scale
            tiles.append(Tile((gx, gy), (x0, y0, x1, y1), (px0, py0, px1, py1),
                              (x0 * scale, y0 * scale, x1 * scale, y1 * scale),
                              (cx0, cy0, cx0 + (x1 - x0) * scale, cy0 + (y1 - y0) * scale)))
    return tiles


def reflect_pad(images: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """`F.pad(images, (0, pad_w, 0, pad_h), 'reflect')` for any dtype (uint8 included): row H + i is row
    H - 2 - i (the edge itself is not repeated). images: `(B, C, H, W)`."""
    if pad_h == 0 and pad_w == 0:
        return images
    _, _, height, width = images.shape
    if pad_h >= height or pad_w >= width:
        raise ValueError(f"reflect pad of {pad_h} x {pad_w} needs a frame larger than {height} x {width}")

    def index(size: int, pad: int) -> torch.Tensor:
        i = torch.arange(size + pad, device=images.device)
        return torch.where(i < size, i, 2 * (size - 1) - i)

    return images.index_select(2, index(height, pad_h)).index_select(3, index(width, pad_w))


def to_uint8(output: torch.Tensor) -> torch.Tensor:
    """RealESRGANer's float output -> uint8: float32, clamp to [0, 1], `* 255.0`, round half to even."""
    return (output.float().clamp(0, 1) * 255.0).round().to(torch.uint8)


class TileUpsampler:
    """RealESRGANer.enhance for batches of frames, with exact tile reuse across the frames of one clip.

    `net`: the upsampler (`nets.rrdbnet.RRDBNet`, `scale` 2) on the frames' device, in eval mode; it runs in
    the dtype of its parameters (float32 is the reference). `out_scale`: 2 (the net's own: no resize) or 1
    (RealESRGANer's `outscale=1`: the 2x output resized back with Lanczos-4). `tiles_per_call`: padded tiles
    of one shape run through the net together, at most this many at a time (tiles of the same grid position
    in several frames have the same shape; on a CPU 1 keeps each tile's arithmetic upstream's).

    Call it on each batch of a clip in order; `reset()` before another clip. `tiles_computed` and
    `tiles_reused` count tiles over the upsampler's life.
    """

    def __init__(self, net: torch.nn.Module, *, scale: int = 2, out_scale: int = 2, tile_px: int = TILE_PX,
                 pad_px: int = TILE_PAD_PX, reuse: bool = True, tiles_per_call: int = 1):
        if out_scale not in (scale, 1):
            raise ValueError(f"out_scale must be the net's scale ({scale}) or 1, got {out_scale}")
        if tiles_per_call < 1:
            raise ValueError(f"tiles_per_call must be at least 1, got {tiles_per_call}")
        self.net = net
        self.scale = scale
        self.out_scale = out_scale
        self.tile_px = tile_px
        self.pad_px = pad_px
        self.reuse = reuse
        self.tiles_per_call = tiles_per_call
        self.tiles_computed = 0
        self.tiles_reused = 0
        self._kept: Dict[Tuple[int, int], Tuple[torch.Tensor, torch.Tensor]] = {}  # grid_xy -> (input, output)
        self._kept_size: Optional[Tuple[int, int]] = None

    def reset(self) -> None:
        """Forget the kept tiles (a new clip starts)."""
        self._kept.clear()
        self._kept_size = None

    def output_size(self, width_px: int, height_px: int) -> Tuple[int, int]:
        return width_px * self.out_scale, height_px * self.out_scale

    def padded_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """`(B, H, W, 3) uint8` frames -> `(B, 3, Hp, Wp) uint8`, reflect-padded as RealESRGANer pads."""
        if frames.dim() != 4 or frames.shape[3] != 3 or frames.dtype != torch.uint8:
            raise ValueError(f"frames must be (B, H, W, 3) uint8, got {tuple(frames.shape)} {frames.dtype}")
        images = frames.permute(0, 3, 1, 2)
        return reflect_pad(images, *mod_pad(images.shape[2], images.shape[3], self.scale)).contiguous()

    @torch.no_grad()
    def float_output(self, frames: torch.Tensor) -> torch.Tensor:
        """The net's tiled output before the clamp, `(B, 3, H * scale, W * scale) float32` (RealESRGANer's
        `post_process()` result); no reuse. For checking against upstream's intermediate values."""
        padded = self.padded_frames(frames)
        height, width = frames.shape[1:3]
        out = None
        for tile in tile_grid(padded.shape[2], padded.shape[3], self.scale, self.tile_px, self.pad_px):
            x0, y0, x1, y1 = tile.padded_box
            result = self._run(padded[:, :, y0:y1, x0:x1], tile)
            if out is None:
                out = result.new_empty(padded.shape[0], 3, padded.shape[2] * self.scale, padded.shape[3] * self.scale)
            ox0, oy0, ox1, oy1 = tile.output_box
            out[:, :, oy0:oy1, ox0:ox1] = result
        return out[:, :, : height * self.scale, : width * self.scale]

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        """`(B, H, W, 3) uint8` RGB frames -> `(B, H * s, W * s, 3) uint8` (s = `out_scale`), on their device."""
        padded = self.padded_frames(frames)
        count, _, pad_h, pad_w = padded.shape
        height, width = frames.shape[1:3]
        if self._kept_size != (pad_h, pad_w):
            self.reset()
            self._kept_size = (pad_h, pad_w)
        out = padded.new_empty(count, 3, pad_h * self.scale, pad_w * self.scale)
        tiles = tile_grid(pad_h, pad_w, self.scale, self.tile_px, self.pad_px)
        # per tile, the frames whose input changed (computed), and for every frame the frame it copies from
        to_compute: List[Tuple[Tile, List[int]]] = []
        sources: List[List[int]] = []
        for tile in tiles:
            x0, y0, x1, y1 = tile.padded_box
            inputs = padded[:, :, y0:y1, x0:x1]
            same = self._same_as_previous(tile, inputs)
            source, changed = [], []
            for b in range(count):
                if same[b]:
                    source.append(source[-1] if b > 0 else -1)  # -1: the kept tile
                else:
                    source.append(b)
                    changed.append(b)
            sources.append(source)
            to_compute.append((tile, changed))
        results = self._compute(padded, to_compute)
        for tile, source in zip(tiles, sources):
            ox0, oy0, ox1, oy1 = tile.output_box
            for b, src in enumerate(source):
                if src == b:
                    tile_out = results[(tile.grid_xy, b)]
                    self.tiles_computed += 1
                else:
                    tile_out = self._kept[tile.grid_xy][1] if src < 0 else results[(tile.grid_xy, src)]
                    self.tiles_reused += 1
                out[b, :, oy0:oy1, ox0:ox1] = tile_out
            if self.reuse:
                x0, y0, x1, y1 = tile.padded_box
                last = source[-1]
                if last >= 0:  # else the kept tile stays (the clip's last frames reused it)
                    self._kept[tile.grid_xy] = (padded[count - 1, :, y0:y1, x0:x1].clone(),
                                                results[(tile.grid_xy, last)])
        out = out[:, :, : height * self.scale, : width * self.scale]
        if self.out_scale != self.scale:
            from .imaging.resize import resize_lanczos4

            out = resize_lanczos4(out, int(height * self.out_scale), int(width * self.out_scale))
        return out.permute(0, 2, 3, 1)

    def _same_as_previous(self, tile: Tile, inputs: torch.Tensor) -> List[bool]:
        """Per frame: is its padded tile bit-identical to the previous frame's (the kept one for frame 0)?
        One comparison per tile position on the device, one transfer of B booleans."""
        if not self.reuse:
            return [False] * inputs.shape[0]
        kept = self._kept.get(tile.grid_xy)
        if kept is None:
            return [False] + (inputs[1:] == inputs[:-1]).flatten(1).all(1).tolist()
        previous = torch.cat([kept[0][None], inputs[:-1]])
        return (inputs == previous).flatten(1).all(1).tolist()

    def _compute(self, padded: torch.Tensor, to_compute) -> Dict[Tuple[Tuple[int, int], int], torch.Tensor]:
        """The uint8 output tiles `(3, 2h, 2w)` of every (tile, frame) to compute, keyed by (grid_xy, frame):
        tiles of one padded shape batched, `tiles_per_call` at a time."""
        by_shape: Dict[Tuple[int, int], List[Tuple[Tile, int]]] = {}
        for tile, frames in to_compute:
            for b in frames:
                by_shape.setdefault(tile.padded_size, []).append((tile, b))
        results = {}
        for jobs in by_shape.values():
            for start in range(0, len(jobs), self.tiles_per_call):
                chunk = jobs[start: start + self.tiles_per_call]
                batch = torch.stack([padded[b, :, t.padded_box[1]:t.padded_box[3], t.padded_box[0]:t.padded_box[2]]
                                     for t, b in chunk])
                outputs = to_uint8(self._run(batch, chunk[0][0]))
                for (tile, b), output in zip(chunk, outputs):
                    results[(tile.grid_xy, b)] = output.clone() if len(chunk) > 1 else output
        return results

    def _run(self, tiles_uint8: torch.Tensor, tile: Tile) -> torch.Tensor:
        """Padded tiles `(N, 3, h, w) uint8` -> the net's output cropped to the tile, `(N, 3, ., .) float32`."""
        dtype = next(self.net.parameters()).dtype
        x = (tiles_uint8.to(torch.float32) / 255.0).to(dtype)
        cx0, cy0, cx1, cy1 = tile.crop_box
        return self.net(x)[:, :, cy0:cy1, cx0:cx1].float()
