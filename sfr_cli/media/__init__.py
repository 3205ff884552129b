"""Files in and out, by what they do: `source` reads the source face, the paste-back pictures and frames that
already exist (`FrameSource`, for `sfr enhance`), `sinks` writes PNG frames and the one-pass ffmpeg MP4 (with audio), `writer` feeds one clip's sinks from a
thread (`ClipSinks`), `ffmpeg` finds, asks and starts ffmpeg. The names below are the
package's public surface (`from sfr_cli import media; media.Mp4Writer(...)`); each lives in one module.
"""

from .ffmpeg import AudioInfo, count_video_frames, find_ffmpeg, probe_audio
from .sinks import (MAX_FPS, MAX_SIDE_PX, MIN_FPS, Mp4Writer, PngFrameWriter, check_fps, check_frames_dir, check_mp4_name,
                    check_output_writable, existing_frames, is_frame_name)
from .source import FrameSource, frame_files, read_picture_uint8, read_source_image, resize_image, source_from_array
from .writer import ClipSinks, FrameWriterThread

__all__ = [
    "AudioInfo", "count_video_frames", "find_ffmpeg", "probe_audio",
    "MAX_FPS", "MAX_SIDE_PX", "MIN_FPS", "Mp4Writer", "PngFrameWriter", "check_fps", "check_frames_dir", "check_mp4_name",
    "check_output_writable",
    "existing_frames", "is_frame_name",
    "read_source_image", "resize_image", "source_from_array",
    "read_picture_uint8", "FrameSource", "frame_files",
    "ClipSinks", "FrameWriterThread",
]
