"""PyAV access to a video file, bounded before any work is done.

A small file can declare hundreds of full-resolution frames (tens of GB once decoded), so the
stream's frame count and frame size are checked against VideoLimits before any frame is decoded,
frames are counted by demuxing packets (never by decoding), each kept frame goes through the
caller's `keep` (a resize) the moment it is decoded, and a deadline stops work that runs long.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from PIL import Image

T = TypeVar("T")


@dataclass(frozen=True)
class VideoLimits:
    """Bounds on one source video; past any of them the video is refused with a ValueError."""
    max_source_frames: int = 100_000  # frames in the stream, declared or counted
    max_frame_pixels: int = 8192 * 8192  # width * height of one decoded frame
    timeout_s: float = 30.0  # counting and decoding together


@dataclass(frozen=True)
class StreamInfo:
    total_frames: int  # the header's count (what transformers samples from), else the packets
    packets: int  # frames the file really holds: at most this many can decode
    fps: float
    width: int
    height: int


class Deadline:
    def __init__(self, seconds: float):
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise ValueError(f"decoding the video took longer than {self.seconds:g} s")


@contextmanager
def open_video(src) -> Iterator:
    """A path or bytes -> an open PyAV container; FFmpeg and I/O errors become ValueError."""
    import av  # imported lazily: image-only deployments never load FFmpeg

    is_bytes = isinstance(src, (bytes, bytearray, memoryview))
    try:
        with av.open(io.BytesIO(bytes(src)) if is_bytes else os.fspath(src)) as container:
            yield container
    except (av.error.FFmpegError, OSError) as e:
        raise ValueError(f"could not decode video: {e}") from None


def _too_many(what: str, limits: VideoLimits) -> ValueError:
    return ValueError(f"the video {what} frames; the limit is {limits.max_source_frames}")


def _count_packets(container, stream, limits: VideoLimits, deadline: Deadline) -> int:
    # demuxing reads packets without decoding them; the cap and the deadline bound even this
    n = 0
    for packet in container.demux(stream):
        n += packet.size > 0 and not packet.is_discard  # the demuxer ends with an empty packet
        if n > limits.max_source_frames:
            raise _too_many(f"has more than {limits.max_source_frames}", limits)
        deadline.check()
    return n


def _frame_size(stream, limits: VideoLimits) -> tuple[int, int]:
    width, height = stream.width, stream.height
    if width <= 0 or height <= 0:
        raise ValueError(f"the video stream declares no frame size ({width}x{height})")
    if width * height > limits.max_frame_pixels:
        raise ValueError(f"video frames are {width}x{height} = {width * height} pixels; the limit is "
                         f"{limits.max_frame_pixels} per frame")
    return width, height


def stream_info(container, limits: VideoLimits, deadline: Deadline) -> StreamInfo:
    """The first video stream's frame count, rate and size, checked against the limits."""
    if not container.streams.video:
        raise ValueError("the container has no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise ValueError("the video stream has no frame rate")
    width, height = _frame_size(stream, limits)
    if stream.frames > limits.max_source_frames:
        raise _too_many(f"declares {stream.frames}", limits)
    packets = _count_packets(container, stream, limits, deadline)
    total = stream.frames or packets  # some containers (MKV, WebM) omit the count
    if total <= 0 or packets <= 0:
        raise ValueError("the video has no frames")
    return StreamInfo(int(total), packets, float(rate), width, height)


def decode_frames(container, info: StreamInfo, wanted: set[int], keep: Callable[[Image.Image], T],
                  deadline: Deadline) -> dict[int, T]:
    """keep(RGB frame) for each wanted frame index that decodes; only kept results stay in memory."""
    got: dict[int, T] = {}
    container.seek(0)
    last = max(wanted)
    for i, frame in enumerate(container.decode(video=0)):
        if i > last:
            break
        deadline.check()
        if i not in wanted:
            continue
        if (frame.width, frame.height) != (info.width, info.height):
            raise ValueError(f"video frame {i} is {frame.width}x{frame.height}, but the stream "
                             f"declares {info.width}x{info.height}; all frames must have one size")
        got[i] = keep(Image.fromarray(frame.to_ndarray(format="rgb24")))
    return got
