"""SadTalker's face-render data dict, built for the tests the way its `get_facerender_data`
(src/generate_facerender_batch.py) builds it, written from its documented behaviour (see
../shared/reference/README.md, "How SadTalker turns the golden inputs into frames"):

- `source_image`: the picture as float in [0, 1] (skimage's img_as_float32), resized to size x size by
  skimage's `transform.resize`, channels first, repeated over the batch: `(B, 3, S, S)`;
- `source_semantics`: the source's `coeff_3dmm[:1, :70]` (`:73` in full modes) repeated 27 times along a
  last axis, repeated over the batch: `(B, C, 27)`;
- `target_semantics_list`: the driving `coeff_3dmm[:, :70]`, expression columns scaled, in full modes the
  source's 3 crop columns appended, in still mode columns 64: replaced by the source's; frame i's window
  is frames i-13..i+13 clamped, transposed to `(C, 27)`; the last window repeated up to a multiple of the
  batch, then reshaped to `(B, N / B, C, 27)`;
- `yaw_c_seq` etc.: one held value, or a constant-rate sweep through the given degrees (np.arange per
  segment), cut or padded with its last value to N, padded like the windows, `(B, N / B)`.
"""

import os

import numpy as np
import scipy.io
import torch
from PIL import Image

SEMANTIC_RADIUS = 13


def camera_sweep(degrees, frame_count, batch_size):
    values = list(degrees)
    if len(values) == 1:
        sweep = [values[0]] * frame_count
    else:
        rate = sum(abs(b - a) for a, b in zip(values, values[1:])) / (frame_count - 1)
        sweep = []
        for a, b in zip(values, values[1:]):
            sweep += list(np.arange(a, b, rate * abs(b - a) / (b - a)))
        sweep = sweep[:frame_count] + [sweep[-1]] * max(0, frame_count - len(sweep))
    sweep += [sweep[-1]] * ((-frame_count) % batch_size)
    return torch.FloatTensor(np.array(sweep).reshape(batch_size, -1))


def facerender_data(coeff_path, pic_path, first_coeff_path, audio_path, batch_size, yaw=None, pitch=None, roll=None,
                    expression_scale=1.0, still_mode=False, preprocess="crop", size=256):
    from skimage import img_as_float32, transform

    image = transform.resize(img_as_float32(np.array(Image.open(pic_path))), (size, size, 3)).transpose(2, 0, 1)
    full = "full" in preprocess.lower()
    source = scipy.io.loadmat(first_coeff_path)["coeff_3dmm"][:1, :73 if full else 70]
    driving = scipy.io.loadmat(coeff_path)["coeff_3dmm"][:, :70].copy()
    driving[:, :64] = driving[:, :64] * expression_scale
    if full:
        driving = np.concatenate([driving, np.repeat(source[:, 70:], driving.shape[0], axis=0)], axis=1)
    if still_mode:
        driving[:, 64:] = np.repeat(source[:, 64:], driving.shape[0], axis=0)
    frame_count = driving.shape[0]
    windows = []
    for frame in range(frame_count):
        index = [min(max(i, 0), frame_count - 1) for i in range(frame - SEMANTIC_RADIUS, frame + SEMANTIC_RADIUS + 1)]
        windows.append(driving[index, :].T)
    windows += [windows[-1]] * ((-frame_count) % batch_size)
    windows = np.array(windows)
    data = {
        "source_image": torch.FloatTensor(image)[None].repeat(batch_size, 1, 1, 1),
        "source_semantics": torch.FloatTensor(np.repeat(source.T, 2 * SEMANTIC_RADIUS + 1, axis=1))[None]
        .repeat(batch_size, 1, 1),
        "target_semantics_list": torch.FloatTensor(windows.reshape(batch_size, -1, *windows.shape[-2:])),
        "frame_num": frame_count,
        "video_name": os.path.splitext(os.path.split(coeff_path)[-1])[0],
        "audio_path": audio_path,
    }
    for axis, degrees in (("yaw", yaw), ("pitch", pitch), ("roll", roll)):
        if degrees is not None:
            data[f"{axis}_c_seq"] = camera_sweep(degrees, frame_count, batch_size)
    return data
