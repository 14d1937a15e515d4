"""The video reader on real mp4 files written by the tests with PyAV: sampling, both backends, bad files."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
from transformers.video_utils import VideoMetadata

from datamodules.shapes.world import WorldConfig, sample_scene, write_clip
from datamodules.video import VideoError, read_clip, read_video, sample_indices

BACKENDS = ["decord", "pyav"]


def numbered_clip(path, frames: int, size: int = 32):
    """A clip whose frame k is a flat grey of level 20 k + 10, so a decoded frame tells its index."""
    levels = np.arange(frames) * 20 + 10
    clip = np.broadcast_to(levels[:, None, None, None], (frames, size, size, 3)).astype(np.uint8)
    write_clip(clip, path, fps=8)
    return path


def frame_indices(frames: np.ndarray) -> list[int]:
    return [int(round((frame.mean() - 10) / 20)) for frame in frames]


@pytest.fixture(scope="module")
def shapes_clip(tmp_path_factory):
    scene = sample_scene(random.Random(7), WorldConfig(frames=10, size=48, min_objects=3))
    path = tmp_path_factory.mktemp("clips") / "scene.mp4"
    write_clip(scene.render(), path, fps=8)
    return path, scene.render()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_frames", [1, 4, 10])
def test_reads_uniformly_sampled_frames(shapes_clip, backend, num_frames):
    path, rendered = shapes_clip
    frames = read_video(path, num_frames, backend=backend)
    assert frames.shape == (num_frames, 48, 48, 3) and frames.dtype == np.uint8
    expected = rendered[np.linspace(0, 9, num_frames).round().astype(int)]
    assert np.abs(frames.astype(int) - expected).mean() < 6  # lossy mpeg4, but the same pictures


def test_both_backends_agree(shapes_clip):
    path, _ = shapes_clip
    decord_frames, pyav_frames = read_video(path, 7, "decord"), read_video(path, 7, "pyav")
    assert decord_frames.shape == pyav_frames.shape
    assert np.abs(decord_frames.astype(int) - pyav_frames.astype(int)).max() <= 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_indices_span_the_whole_clip(tmp_path, backend):
    path = numbered_clip(tmp_path / "n.mp4", frames=12)
    assert frame_indices(read_video(path, 4, backend)) == [0, 4, 7, 11]
    assert frame_indices(read_video(path, 12, backend)) == list(range(12))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_clip_knows_its_frame_indices_and_frame_rate(tmp_path, backend):
    """`read_clip`: the frames `read_video` gives, the indices they were decoded from, the file's frame count
    and rate, and those as transformers' video metadata (sampled fps = 4 / 12 * 8)."""
    path = numbered_clip(tmp_path / "n.mp4", frames=12)
    clip = read_clip(path, 4, backend)
    assert frame_indices(clip.frames) == list(clip.indices) == [0, 4, 7, 11]
    assert (clip.total_frames, clip.fps) == (12, pytest.approx(8.0))
    assert np.array_equal(clip.frames, read_video(path, 4, backend))
    metadata = VideoMetadata(**clip.metadata())
    assert metadata.sampled_fps == pytest.approx(4 / 12 * 8) and metadata.duration == pytest.approx(1.5)
    assert (metadata.height, metadata.width) == (32, 32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_clip_repeats_frames(tmp_path, backend):
    path = numbered_clip(tmp_path / "short.mp4", frames=3)
    frames = read_video(path, 8, backend)
    assert frames.shape[0] == 8
    assert frame_indices(frames) == [0, 0, 1, 1, 1, 1, 2, 2]


def test_sample_indices():
    assert sample_indices(10, 4).tolist() == [0, 3, 6, 9]
    assert sample_indices(1, 3).tolist() == [0, 0, 0]
    assert sample_indices(100, 1).tolist() == [0]
    with pytest.raises(ValueError):
        sample_indices(0, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_file(tmp_path, backend):
    path = tmp_path / "missing.mp4"
    with pytest.raises(VideoError, match="no such video file") as info:
        read_video(path, 4, backend)
    assert str(path) in str(info.value) and info.value.path == str(path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_file(tmp_path, backend):
    path = tmp_path / "empty.mp4"
    path.touch()
    with pytest.raises(VideoError, match="empty") as info:
        read_video(path, 4, backend)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("damage", ["random", "truncated", "text"])
def test_undecodable_file(tmp_path, shapes_clip, backend, damage):
    good = shapes_clip[0].read_bytes()
    data = {
        "random": np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes(),
        "truncated": good[: len(good) // 2],
        "text": b"this is not a video\n" * 10,
    }[damage]
    path = tmp_path / f"{damage}.mp4"
    path.write_bytes(data)
    with pytest.raises(VideoError) as info:
        read_video(path, 4, backend)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)
    assert ("PyAV" in str(info.value)) and (("decord" in str(info.value)) == (backend == "decord"))


def test_falls_back_to_pyav_without_decord(shapes_clip, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # makes `import decord` raise ImportError
    frames = read_video(shapes_clip[0], 5)
    assert frames.shape == (5, 48, 48, 3)


def test_falls_back_to_pyav_when_decord_fails(shapes_clip, monkeypatch):
    import decord

    def refuse(*args, **kwargs):
        raise RuntimeError("decord cannot open this")

    monkeypatch.setattr(decord, "VideoReader", refuse)
    frames = read_video(shapes_clip[0], 3)
    assert frames.shape == (3, 48, 48, 3)


def test_bad_arguments(shapes_clip):
    with pytest.raises(ValueError, match="num_frames"):
        read_video(shapes_clip[0], 0)
    with pytest.raises(ValueError, match="backend"):
        read_video(shapes_clip[0], 4, backend="opencv")
