"""Build the embedded synthetic dataset: shape clips rendered to mp4 plus train/val/test QA records.

Resumable and idempotent: every scene and question comes from (seed, video index), clips already on disk
are kept, and the record files are written atomically at the end.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm import tqdm

from datamodules.perturb import Perturbation
from datamodules.records import QARecord, atomic_write_text, summarize_records, write_jsonl, write_records
from datamodules.shapes.questions import (
    Fact,
    ShapesWriter,
    describe_item,
    general_items,
    synthetic_items,
    unwarranted_refusal,
    verify_items,
)
from datamodules.shapes.world import Scene, WorldConfig, sample_scene, write_clip

SPLITS = ("train", "val", "test")
# The base model's instruction-tuning file: every answerable training question and, per training clip, one
# general refusal (a question no clip can answer, see `general_records`); no question whose answerability
# depends on what the clip shows is refused in it.
INSTRUCT = "instruct.jsonl"
MANIFEST = "synth.json"
# Bump when scenes, questions or rendering change, so that an old folder is not silently mixed in.
GENERATOR_VERSION = 1


class SyntheticDatasetError(ValueError):
    """A user error building the synthetic dataset (bad settings, or a folder built with other ones)."""


def video_id(index: int) -> str:
    return f"v{index:06d}"


def scene_for(seed: int, index: int, world: WorldConfig) -> Scene:
    """The scene of video `index`: a function of (seed, index) alone, so any subset can be rebuilt."""
    try:
        return sample_scene(random.Random(f"shapes-scene:{seed}:{index}"), world)
    except RuntimeError as error:  # the frame is too small for the objects
        raise SyntheticDatasetError(f"{error}; use a larger --size") from None


def split_videos(
    num_videos: int, seed: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> list[str]:
    """The split of each video index: disjoint by video, shuffled by seed; val and test non-empty from 3."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        problem = f"split fractions must be three non-negative numbers summing to 1, got {fractions}"
        raise SyntheticDatasetError(problem)
    num_val, num_test = (int(num_videos * f) for f in fractions[1:])
    if num_videos >= 3:
        num_val, num_test = max(num_val, int(fractions[1] > 0)), max(num_test, int(fractions[2] > 0))
    order = list(range(num_videos))
    random.Random(f"shapes-split:{seed}").shuffle(order)
    splits = ["train"] * num_videos
    for position, index in enumerate(order):
        if position < num_val:
            splits[index] = "val"
        elif position < num_val + num_test:
            splits[index] = "test"
    return splits


def scene_records(
    scene: Scene, video: str, record_prefix: str, seed: int, index: int, describe: bool = False
) -> list[QARecord]:
    """The QA records of one scene: answerable, then unanswerable questions, each with `rejected` set; with
    `describe`, then the caption question ("What objects are in the video?", form "describe") and up to
    two qualifier checks ("Is the star small?", form "verify")."""
    rng = random.Random(f"shapes-questions:{seed}:{index}")
    items: list[Fact | Perturbation] = synthetic_items(scene, rng)
    if describe:
        items += [describe_item(scene), *verify_items(scene, rng)]
    written = ShapesWriter(f"{seed}:{index}").write(items)
    records = []
    for number, (item, text) in enumerate(zip(items, written, strict=True)):
        assert text is not None, "the template writer phrases every synthetic item"
        spec = item.slots["spec"]
        meta: dict[str, Any] = {
            "form": spec.form, "ref_kind": spec.ref.kind if spec.ref else None, "objects": len(scene.objects)
        }
        if isinstance(item, Fact):
            meta["fact"] = item.fact
            records.append(QARecord(
                id=f"{record_prefix}-q{number}", video=video, question=text.question, answer=text.answer,
                answerable=True, rejected=unwarranted_refusal(spec), source="shapes", meta=meta,
            ))
        else:
            assert isinstance(item, Perturbation)
            meta.update(ref_kind=item.slots["ref"].kind, true_fact=item.true_fact, false_fact=item.false_fact)
            records.append(QARecord(
                id=f"{record_prefix}-q{number}", video=video, question=text.question, answer=text.answer,
                answerable=False, category=item.category, missing_element=item.missing_element,
                rejected=item.slots["hallucination"], source="shapes", meta=meta,
            ))
    return records


def general_records(scene: Scene, video: str, record_prefix: str, seed: int, index: int) -> list[QARecord]:
    """The general refusals of one clip (`general_items`, form "sound", "speech", "camera" or a question
    form about an absent thing; meta "general": true): unanswerable whatever the clip shows."""
    items = general_items(scene, random.Random(f"shapes-general:{seed}:{index}"))
    written = ShapesWriter(f"{seed}:{index}").write(items)
    records = []
    for number, (item, text) in enumerate(zip(items, written, strict=True)):
        assert text is not None, "the template writer phrases every synthetic item"
        spec, ref = item.slots["spec"], item.slots["ref"]
        meta: dict[str, Any] = {
            "form": spec.form, "ref_kind": ref.kind if ref else None, "objects": len(scene.objects),
            "general": True, "true_fact": item.true_fact, "false_fact": item.false_fact,
        }
        records.append(QARecord(
            id=f"{record_prefix}-g{number}", video=video, question=text.question, answer=text.answer,
            answerable=False, category=item.category, missing_element=item.missing_element, source="shapes",
            meta=meta,
        ))
    return records


def _render(job: tuple[dict[str, Any], str, int]) -> None:
    scene, path, fps = job
    write_clip(Scene.from_dict(scene).render(), path, fps)


def _check_manifest(out_dir: Path, settings: dict[str, Any]) -> None:
    path = out_dir / MANIFEST
    if path.is_file():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            problem = f"{path}: invalid JSON ({error.msg}); delete the folder to rebuild it"
            raise SyntheticDatasetError(problem) from None
        if previous != settings:
            changed = sorted(k for k in settings | previous if previous.get(k) != settings.get(k))
            raise SyntheticDatasetError(
                f"{out_dir} was built with other settings (changed: {', '.join(changed)}); "
                "use another --out folder or delete this one"
            )
    else:
        atomic_write_text(path, json.dumps(settings, indent=2) + "\n")


def build_synthetic_dataset(
    out_dir: str | os.PathLike,
    num_videos: int,
    seed: int,
    frames: int = 16,
    size: int = 64,
    fps: int = 8,
    progress: bool = True,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    workers: int | None = None,
    describe: Iterable[str] = ("train",),
) -> dict[str, Any]:
    """Render `num_videos` clips and write their QA records; returns a summary (see `summarize_records`).

    Writes DIR/videos/{id}.mp4, DIR/{train,val,test}.jsonl (split by video), DIR/instruct.jsonl (the
    base model's training file: the answerable records of train.jsonl and one general refusal per
    training clip, `general_records`), DIR/scenes.jsonl (one line
    per video: {"video", "split", "scene"}) and DIR/synth.json (the settings; a rerun with other
    settings is refused). Clips already rendered are skipped. `workers` processes render (default:
    the CPU count, in-process for small jobs). Each clip of a split in `describe` also gets the caption
    question (every object with all its attributes) and up to two qualifier checks ("Is the star small?"):
    dense supervision for training, which by default the evaluation splits leave out, so that they hold
    the question forms of the paper.
    """
    describe = tuple(describe)
    if unknown := sorted(set(describe) - set(SPLITS)):
        raise SyntheticDatasetError(f"describe: unknown split(s) {', '.join(unknown)}; choose from {SPLITS}")
    for name, value, least in (("num_videos", num_videos, 1), ("frames", frames, 1), ("size", size, 32),
                               ("fps", fps, 1)):
        if value < least:
            raise SyntheticDatasetError(f"{name} must be at least {least}, got {value}")
    started = time.perf_counter()
    out = Path(out_dir)
    world = WorldConfig(frames=frames, fps=fps, size=size)
    _check_manifest(out, {"generator_version": GENERATOR_VERSION, "seed": seed, "world": asdict(world)})
    videos = out / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    for stale in videos.glob(".*.tmp.mp4"):  # left by an interrupted render
        stale.unlink(missing_ok=True)

    scenes = [scene_for(seed, index, world) for index in range(num_videos)]
    paths = [videos / f"{video_id(index)}.mp4" for index in range(num_videos)]
    pending = [(scene, path) for scene, path in zip(scenes, paths, strict=True) if not path.exists()]
    jobs = [(scene.to_dict(), str(path), fps) for scene, path in pending]
    _render_all(jobs, progress, workers)

    splits = split_videos(num_videos, seed, fractions)
    by_split: dict[str, list[QARecord]] = {split: [] for split in SPLITS}
    instruct: list[QARecord] = []
    scene_rows = []
    for index, (scene, split) in enumerate(zip(scenes, splits, strict=True)):
        video = f"videos/{video_id(index)}.mp4"
        records = scene_records(scene, video, video_id(index), seed, index, split in describe)
        by_split[split] += records
        if split == "train":
            instruct += [r for r in records if r.answerable]
            instruct += general_records(scene, video, video_id(index), seed, index)
        scene_rows.append({"video": video, "split": split, "scene": scene.to_dict()})
    for split, records in by_split.items():
        write_records(out / f"{split}.jsonl", records)
    write_records(out / INSTRUCT, instruct)
    write_jsonl(out / "scenes.jsonl", scene_rows)
    return {
        "out_dir": str(out),
        "videos": num_videos,
        "rendered": len(jobs),
        "seconds": round(time.perf_counter() - started, 2),
        "splits": {
            split: {"videos": splits.count(split), **summarize_records(records)}
            for split, records in by_split.items()
        },
    }


def _render_all(jobs: list[tuple[dict[str, Any], str, int]], progress: bool, workers: int | None) -> None:
    workers = workers if workers is not None else (os.cpu_count() or 1)
    bar = tqdm(total=len(jobs), desc="rendering clips", unit="clip", disable=not progress or not jobs)
    with bar:
        if workers <= 1 or len(jobs) < 64:
            for job in jobs:
                _render(job)
                bar.update()
            return
        # "spawn" keeps worker start-up independent of whatever threads the caller holds.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for _ in pool.map(_render, jobs, chunksize=16):
                bar.update()


def format_summary(summary: dict[str, Any]) -> Iterable[str]:
    """Human-readable lines of a `build_synthetic_dataset` summary."""
    yield (f"{summary['videos']} videos in {summary['out_dir']} ({summary['rendered']} rendered now) "
           f"in {summary['seconds']:.1f} s")
    for split, counts in summary["splits"].items():
        categories = ", ".join(f"{name} {count}" for name, count in counts["categories"].items())
        yield (f"  {split:5s}: {counts['videos']} videos, {counts['records']} records "
               f"({counts['answerable']} answerable, {counts['unanswerable']} unanswerable: {categories})")
