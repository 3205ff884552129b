"""Measure the choices in ``sfr_cli/media`` against what imageio / imageio-ffmpeg offer for the same job.

    python scripts/measure_media.py [--frames 750]

Prints, for 256 px frames: PNG writing through Pillow and through imageio (and whether the bytes are
the same); counting an MP4's frames by remux (sfr's ``count_video_frames``) and by
``imageio_ffmpeg.count_frames_and_secs`` (which decodes); and what ``imageio_ffmpeg.write_frames``
does when the caller fails mid-clip (how long it waits, whether a file is left) against
``Mp4Writer.abort``. Best of several runs; a loaded machine stretches every figure alike.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
from PIL import Image

from sfr_cli import media

SIZE_PX = 256
DISTINCT_FRAMES = 20
ABORT_AFTER_FRAMES = 200


def best_seconds(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return min(times)


def test_frames() -> list:
    """Render-like frames: smooth gradients with some noise, `(H, W, 3) uint8`."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, SIZE_PX, dtype=np.float32)
    frames = []
    for index in range(DISTINCT_FRAMES):
        base = ramp[None, :, None] + ramp[:, None, None] * 0.2 + index
        frames.append(np.clip(base + rng.normal(0, 4, (SIZE_PX, SIZE_PX, 3)), 0, 255).astype(np.uint8))
    return frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=750, help="frames in the clip that is counted")
    args = parser.parse_args()
    frames = test_frames()
    folder = Path(tempfile.mkdtemp(prefix="sfr-measure-"))

    def pillow_pngs():
        for i, frame in enumerate(frames):
            Image.fromarray(frame, "RGB").save(folder / f"pil{i}.png", compress_level=3)

    def imageio_pngs():
        for i, frame in enumerate(frames):
            iio.imwrite(folder / f"iio{i}.png", frame, extension=".png", compress_level=3)

    pil_s, iio_s = best_seconds(pillow_pngs, 5), best_seconds(imageio_pngs, 5)
    same = all((folder / f"pil{i}.png").read_bytes() == (folder / f"iio{i}.png").read_bytes()
               for i in range(len(frames)))
    print(f"PNG, {len(frames)} frames: Pillow {pil_s:.3f} s, imageio {iio_s:.3f} s, same bytes: {same}")

    clip = folder / "clip.mp4"
    with media.Mp4Writer(clip, width_px=SIZE_PX, height_px=SIZE_PX, fps=25) as writer:
        for index in range(args.frames):
            writer.write(frames[index % len(frames)])
    exe = media.find_ffmpeg()
    remux_s = best_seconds(lambda: media.count_video_frames(clip, exe), 3)
    decode_s = best_seconds(lambda: imageio_ffmpeg.count_frames_and_secs(str(clip)), 3)
    print(f"count {args.frames} frames: remux {remux_s:.3f} s ({media.count_video_frames(clip, exe)}), "
          f"imageio_ffmpeg.count_frames_and_secs {decode_s:.3f} s "
          f"({imageio_ffmpeg.count_frames_and_secs(str(clip))[0]})")

    partial = folder / "write_frames.mp4"
    generator = imageio_ffmpeg.write_frames(str(partial), (SIZE_PX, SIZE_PX), fps=25, macro_block_size=1,
                                            codec="libx264", quality=None, output_params=["-crf", "18"])
    generator.send(None)
    for index in range(ABORT_AFTER_FRAMES):
        generator.send(frames[index % len(frames)])
    started = time.perf_counter()
    try:
        generator.throw(RuntimeError("the render failed"))
    except RuntimeError:
        pass
    wf_s, wf_left = time.perf_counter() - started, partial.exists() and os.path.getsize(partial) > 0
    writer = media.Mp4Writer(folder / "ours.mp4", width_px=SIZE_PX, height_px=SIZE_PX, fps=25)
    for index in range(ABORT_AFTER_FRAMES):
        writer.write(frames[index % len(frames)])
    started = time.perf_counter()
    writer.abort()
    ours_s = time.perf_counter() - started
    ours_left = [p.name for p in folder.iterdir() if p.name.startswith(("ours", ".ours"))]
    print(f"failure after {ABORT_AFTER_FRAMES} frames: write_frames returns after {wf_s:.3f} s, partial file "
          f"left: {wf_left}; Mp4Writer.abort {ours_s:.3f} s, files left: {ours_left or 'none'}")


if __name__ == "__main__":
    main()
