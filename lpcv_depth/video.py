"""Video in and out through PyAV (the `video` extra), whose wheel carries its own FFmpeg: nothing
to install on the system, the same decoders and encoders on every machine.

Frames are read as PIL images, so `predict` prepares them with the same function as every photo
(images.prepare_contract_image). Imported lazily: without the extra, a MissingDependencyError
names the command that installs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

from lpcv_depth.errors import LpcvError, MissingDependencyError
from lpcv_depth.pins import pinned

__all__ = ["VIDEO_SUFFIXES", "VIDEO_INSTALL", "VideoReadError", "VideoInfo", "probe_video", "read_frames",
           "VideoWriter", "count_frames"]

VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v"})
VIDEO_INSTALL = "pip install -e '.[video]'"
# H.264 in yuv420p plays in every browser and player; its frame sides must be even.
_CODEC, _PIXEL_FORMAT = "libx264", "yuv420p"


class VideoReadError(LpcvError):
    """A video cannot be opened or decoded."""


def _av():
    try:
        import av
    except ImportError as err:
        raise MissingDependencyError(f"reading and writing videos needs PyAV ({pinned('av')}), which is not "
                                     f"installed: {err}", hint=VIDEO_INSTALL) from err
    return av


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    codec: str
    width: int
    height: int
    fps: Fraction
    frames: int | None  # as the container declares it; None when it does not

    def describe(self) -> dict:
        return {"codec": self.codec, "width": self.width, "height": self.height, "fps": float(self.fps),
                "frames": self.frames}


def _open(path: Path):
    av = _av()
    try:
        container = av.open(os.fspath(path))
    except (av.FFmpegError, OSError, ValueError) as err:
        raise VideoReadError(f"cannot open video {path}: {err}",
                             hint="check that the file is a complete video (mp4, mov, avi); re-encode it with "
                                  "`ffmpeg -i IN -c:v libx264 OUT.mp4` if another player shows it") from err
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"{path} has no video stream", hint="pass a video file with a picture track")
    return container


def _unsupported(path: Path, codec: str, err: Exception | None = None) -> VideoReadError:
    reason = f" ({err})" if err is not None else ""
    return VideoReadError(f"cannot decode video {path}: its codec ({codec}) has no decoder in PyAV's FFmpeg{reason}",
                          hint=f"re-encode it to H.264, e.g. `ffmpeg -i {path.name} -c:v libx264 "
                               f"{path.stem}_h264.mp4`, and pass that file")


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """The video's codec, size and frame rate; a codec PyAV cannot decode is refused here, before any work."""
    av, path = _av(), Path(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        # FFmpeg opens a stream of a codec it has no decoder for without a codec context.
        if stream.codec_context is None:
            raise _unsupported(path, "unknown to FFmpeg")
        codec = stream.codec_context.name
        try:
            av.codec.Codec(codec, "r")
        except (av.FFmpegError, ValueError) as err:
            raise _unsupported(path, codec, err) from err
        fps = stream.average_rate or stream.base_rate or Fraction(30)
        return VideoInfo(path, codec, stream.codec_context.width, stream.codec_context.height, Fraction(fps),
                         stream.frames or None)
    finally:
        container.close()


def read_frames(path: str | os.PathLike, *, every: int = 1, max_frames: int | None = None) -> Iterator[tuple[int, "object"]]:
    """(frame index, PIL RGB image) of every `every`-th frame, at most `max_frames` of them."""
    av, path = _av(), Path(path)
    container = _open(path)
    kept = 0
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            if max_frames is not None and kept >= max_frames:
                break
            if index % every:
                continue
            kept += 1
            yield index, frame.to_image()
    except av.FFmpegError as err:
        raise VideoReadError(f"cannot decode video {path} after {kept} frame(s): {err}",
                             hint="the file is damaged or truncated; re-encode or re-download it") from err
    finally:
        container.close()


class VideoWriter:
    """An H.264 MP4 written frame by frame from (H, W, 3) uint8 arrays of one size."""

    def __init__(self, path: str | os.PathLike, fps: Fraction | float):
        self.av = _av()
        self.path = Path(path)
        self.fps = Fraction(fps).limit_denominator(1001)
        self.container = self.av.open(os.fspath(self.path), mode="w")
        self.stream = None
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        height, width = rgb.shape[:2]
        if self.stream is None:
            self.stream = self.container.add_stream(_CODEC, rate=self.fps)
            self.stream.width, self.stream.height = width - width % 2, height - height % 2
            self.stream.pix_fmt = _PIXEL_FORMAT
        rgb = np.ascontiguousarray(rgb[:self.stream.height, :self.stream.width])
        frame = self.av.VideoFrame.from_ndarray(rgb, format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self.stream is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
        self.container.close()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def count_frames(path: str | os.PathLike) -> int:
    """Frames in a video, counted by decoding it (containers may not declare a count)."""
    return sum(1 for _ in read_frames(path))
