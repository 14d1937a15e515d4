"""The one video reader: `num_frames` frames sampled uniformly over a whole clip, as (T, H, W, 3) uint8
(`read_video`), or as a `Clip` that also gives their indices and the file's frame rate (`read_clip`).

decord is the default backend and PyAV the fallback (used when decord is missing or cannot open a file).
A missing, empty or undecodable file raises `VideoError` naming the file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.errors import UserError

BACKENDS = ("decord", "pyav")


class VideoError(UserError, ValueError):
    """A video file that cannot be read: the message names the file and says why."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self._init_args = (path, problem)
        self.path, self.problem = str(path), problem
        ValueError.__init__(self, f"{path}: {problem}")


def sample_indices(total: int, num_frames: int) -> np.ndarray:
    """`num_frames` indices spread uniformly over `total` frames, first and last included.

    A clip shorter than `num_frames` gets repeated indices, so every clip yields exactly `num_frames`.
    """
    if total < 1:
        raise ValueError(f"a clip needs at least one frame, got {total}")
    return np.linspace(0, total - 1, num_frames).round().astype(np.int64)


@dataclass(frozen=True)
class Clip:
    """Frames sampled from a video file, with where they sit in it."""

    frames: np.ndarray
    """(T, H, W, 3) uint8 RGB."""
    indices: tuple[int, ...]
    """The sampled frames' indices in the file."""
    total_frames: int
    """The file's frame count."""
    fps: float | None
    """The file's frame rate; None when the container does not give one."""

    def metadata(self) -> dict[str, Any]:
        """transformers' `VideoMetadata` fields, for a processor's `video_metadata`.

        Qwen2.5-VL spaces its frames' temporal positions by the sampled frame rate, len(indices) /
        total_frames * fps; without it the processor assumes 24 fps, which squeezes 8 frames sampled over a
        minute into a third of a second.
        """
        return {
            "total_num_frames": self.total_frames,
            "fps": self.fps,
            "frames_indices": list(self.indices),
            "duration": self.total_frames / self.fps if self.fps else None,
            "height": int(self.frames.shape[1]),
            "width": int(self.frames.shape[2]),
        }


def frame_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(height, width) of the file's video stream as its header gives it, read without decoding a frame (PyAV;
    about 0.2 ms a file); None for a file that cannot be opened, which `read_clip` then reports."""
    try:
        import av

        with av.open(str(path)) as container:
            context = container.streams.video[0].codec_context
            return int(context.height), int(context.width)
    except Exception:  # noqa: BLE001 - an unreadable file is read_clip's to report, with its reason
        return None


def read_video(path: str | os.PathLike, num_frames: int, backend: str = "decord") -> np.ndarray:
    """Read `num_frames` uniformly sampled frames of `path` as a (T, H, W, 3) uint8 RGB array."""
    return read_clip(path, num_frames, backend).frames


def read_clip(path: str | os.PathLike, num_frames: int, backend: str = "decord") -> Clip:
    """Read `num_frames` uniformly sampled frames of `path`, with their indices and the file's frame rate.

    With `backend="decord"`, PyAV takes over when decord is not installed or fails on the file; the
    error then names both reasons. With `backend="pyav"`, only PyAV is used.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    path = Path(path)
    if not path.is_file():
        raise VideoError(path, "no such video file")
    if path.stat().st_size == 0:
        raise VideoError(path, "the video file is empty")
    if backend == "decord":
        try:
            return _read_decord(path, num_frames)
        except (ImportError, VideoError) as error:
            decord_problem = error.problem if isinstance(error, VideoError) else f"decord: {error}"
        try:
            return _read_pyav(path, num_frames)
        except VideoError as error:
            raise VideoError(path, f"cannot decode ({decord_problem}; {error.problem})") from None
    return _read_pyav(path, num_frames)


def _read_decord(path: Path, num_frames: int) -> Clip:
    import decord  # imported here so that machines without a decord wheel still read through PyAV

    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
        total = len(reader)
        if total < 1:
            raise VideoError(path, "decord: the video has no frames")
        indices = sample_indices(total, num_frames)
        frames = reader.get_batch(indices.tolist()).asnumpy()
        fps = reader.get_avg_fps()
    except VideoError:
        raise
    except Exception as error:  # decord raises DECORDError / RuntimeError for unreadable streams
        raise VideoError(path, f"decord: {_first_line(error, path)}") from None
    return _clip(path, frames, num_frames, "decord", indices, total, fps)


def _read_pyav(path: Path, num_frames: int) -> Clip:
    """Decode with PyAV, converting only the sampled frames.

    The header's frame count is often missing or wrong, so the frames actually decoded are counted;
    when they differ from the header a second pass samples over the true count.
    """
    try:
        import av
    except ImportError as error:
        raise VideoError(path, f"PyAV is not installed ({error})") from None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(path, "PyAV: the file has no video stream")
            stream = container.streams.video[0]
            expected, rate = stream.frames, stream.average_rate or stream.guessed_rate
        total = expected if expected > 0 else _pyav_pass(av, path, None)[1]
        if total < 1:
            raise VideoError(path, "PyAV: the video has no frames")
        indices = sample_indices(total, num_frames)
        frames, decoded = _pyav_pass(av, path, indices)
        if decoded != total:
            if decoded < 1:
                raise VideoError(path, "PyAV: the video has no frames")
            total, indices = decoded, sample_indices(decoded, num_frames)
            frames, _ = _pyav_pass(av, path, indices)
    except VideoError:
        raise
    except Exception as error:  # av.error.FFmpegError and its subclasses
        raise VideoError(path, f"PyAV: {_first_line(error, path)}") from None
    return _clip(path, frames, num_frames, "PyAV", indices, total, rate)


def _pyav_pass(av, path: Path, indices: np.ndarray | None) -> tuple[np.ndarray | None, int]:
    """Decode the whole stream once: (the frames at `indices` in order, the number of frames decoded)."""
    wanted = {} if indices is None else {int(i): None for i in indices}
    count = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if count in wanted:
                wanted[count] = frame.to_ndarray(format="rgb24")
            count += 1
    if indices is None or any(wanted.get(int(i)) is None for i in indices):
        return None, count
    return np.stack([wanted[int(i)] for i in indices]), count


def _clip(
    path: Path,
    frames: np.ndarray | None,
    num_frames: int,
    backend: str,
    indices: np.ndarray,
    total: int,
    fps: Any,
) -> Clip:
    if frames is None or frames.ndim != 4 or frames.shape[0] != num_frames or frames.shape[-1] != 3:
        shape = None if frames is None else frames.shape
        raise VideoError(path, f"{backend}: decoded an unexpected array of shape {shape}")
    rate = float(fps or 0.0)
    return Clip(np.ascontiguousarray(frames, dtype=np.uint8), tuple(int(i) for i in indices), int(total),
                rate if math.isfinite(rate) and rate > 0 else None)


def _first_line(error: BaseException, path: Path) -> str:
    """The gist of a backend's error, without the file name that `VideoError` already gives."""
    lines = str(error).replace(f": '{path}'", "").strip().splitlines()
    return lines[0] if lines else type(error).__name__
