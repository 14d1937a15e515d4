"""Build the embedded synthetic dataset: shape clips rendered to mp4 plus train/val/test QA records.

Resumable and idempotent: every scene and question comes from (seed, video index), clips already on disk
are kept, and the record files are written atomically at the end. The builder writes only into an empty
folder or one it built (its manifest, `synth.json`); the manifest says how many clips the record files
cover and whether the last build finished, so an interrupted build is never read as a finished one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm import tqdm

from datamodules.errors import UserError
from datamodules.perturb import Perturbation
from datamodules.records import QARecord, atomic_write, summarize_records, write_jsonl, write_records
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
# Bump when scenes, questions, rendering or the manifest change, so that an old folder is not silently mixed
# in. Version 2 added the record files' settings (clip count, split fractions, described splits) and the
# `complete` flag to the manifest; version 3 the base model's instruct.jsonl; version 4 replaced the
# positional relations (left of, above) with touching, so its clips and records differ from every earlier one.
GENERATOR_VERSION = 4


class SyntheticDatasetError(UserError, ValueError):
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


def _read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        reason = getattr(error, "msg", error)
        problem = f"{path}: not a manifest of synth ({reason}); delete the folder to rebuild it"
        raise SyntheticDatasetError(problem) from None
    if not isinstance(manifest, dict):
        raise SyntheticDatasetError(f"{path}: not a manifest of synth; delete the folder to rebuild it")
    return manifest


def _synth_command(out_dir: Path, manifest: dict[str, Any]) -> str:
    """The `synth` command line that (re)builds the record files the manifest describes."""
    world, records = manifest["world"], manifest["records"]
    describe = ",".join(records["describe"]) or "none"
    return (f"python -m datamodules synth --out {out_dir} --num-videos {records['num_videos']} "
            f"--seed {manifest['seed']} --frames {world['frames']} --size {world['size']} "
            f"--fps {world['fps']} --split {','.join(format(f, 'g') for f in records['fractions'])} "
            f"--describe {describe}")


def check_synthetic_folder(folder: str | os.PathLike) -> dict[str, Any] | None:
    """For a folder built by `synth`, check that its last build finished with this generator; returns the
    manifest (None for any other folder). Raises `SyntheticDatasetError` saying what to run otherwise."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    if manifest is None:
        return None
    version = manifest.get("generator_version")
    if version != GENERATOR_VERSION:
        raise SyntheticDatasetError(
            f"{folder} was built by synth generator version {version}, not {GENERATOR_VERSION}: delete the "
            "folder and rerun the synth command to rebuild it"
        )
    if not manifest.get("complete") or not isinstance(manifest.get("records"), dict):
        raise SyntheticDatasetError(
            f"{folder}: its last synth build was interrupted, so its record files do not match its clips; "
            f"rerun it to finish: {_synth_command(folder, manifest)}"
        )
    return manifest


def _claim_folder(out_dir: Path, settings: dict[str, Any]) -> None:
    """Check that the builder may write into `out_dir`: empty (or absent), or built by it with `settings`."""
    manifest = _read_manifest(out_dir)
    if manifest is None:
        if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
            raise SyntheticDatasetError(
                f"{out_dir} is not empty and was not built by synth (no {MANIFEST}): the synthetic dataset "
                "is built only into an empty folder or one synth built, never over other files; use another "
                "folder"
            )
        return
    version = manifest.get("generator_version")
    if version != GENERATOR_VERSION:
        raise SyntheticDatasetError(
            f"{out_dir} was built by synth generator version {version}, whose clips and records differ from "
            f"version {GENERATOR_VERSION}'s; use another --out folder or delete this one"
        )
    previous = {key: manifest.get(key) for key in settings if key != "generator_version"}
    wanted = {key: value for key, value in settings.items() if key != "generator_version"}
    if previous != wanted:
        changed = sorted(k for k in wanted if previous.get(k) != wanted.get(k))
        raise SyntheticDatasetError(
            f"{out_dir} was built with other settings (changed: {', '.join(changed)}); "
            "use another --out folder or delete this one"
        )


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
    training clip, `general_records`), DIR/scenes.jsonl (one line per video: {"video", "split", "scene"})
    and DIR/synth.json (the settings, the clip count and split the record files cover, and whether the
    build finished; a rerun with other world settings is refused, one with another clip count or split
    rewrites the record files). DIR must be empty or absent, or a folder built by this function: other files
    are never overwritten. Clips already rendered are skipped.
    `workers` processes render (default: the CPU count, in-process for small jobs). Each clip of a split in
    `describe` also gets the caption question (every object with all its attributes) and up to two
    qualifier checks ("Is the star small?"): dense supervision for training, which by default the
    evaluation splits leave out, so that they hold the question forms of the paper.
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
    settings = {"generator_version": GENERATOR_VERSION, "seed": seed, "world": asdict(world)}
    _claim_folder(out, settings)
    splits = split_videos(num_videos, seed, fractions)  # settings are checked before anything is written
    scenes = [scene_for(seed, index, world) for index in range(num_videos)]
    records_settings = {"num_videos": num_videos, "fractions": list(fractions), "describe": list(describe)}
    # Until the record files are written, the folder is marked unfinished: a reader refuses it.
    manifest = {**settings, "records": records_settings, "complete": False}
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    videos = out / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    for stale in videos.glob(".*.tmp"):  # left by an interrupted render (`atomic_write`)
        stale.unlink(missing_ok=True)

    paths = [videos / f"{video_id(index)}.mp4" for index in range(num_videos)]
    pending = [(scene, path) for scene, path in zip(scenes, paths, strict=True) if not path.exists()]
    jobs = [(scene.to_dict(), str(path), fps) for scene, path in pending]
    _render_all(jobs, progress, workers)

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
    atomic_write(out / MANIFEST, json.dumps({**manifest, "complete": True}, indent=2) + "\n")
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


def _ignore_interrupts() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _started() -> None:
    """A task that does nothing: its result says that a rendering process runs, with SIGINT ignored."""


def _render_all(jobs: list[tuple[dict[str, Any], str, int]], progress: bool, workers: int | None) -> None:
    """Render the clips, in `workers` processes for 64 clips or more.

    Ctrl-C (SIGINT, which a terminal sends to the whole foreground process group) is the parent's alone:
    the rendering processes start with SIGINT ignored (inherited from the parent, which ignores it while it
    starts them and until they run, so also during their start-up imports) and keep ignoring it. No clip is
    rendered before the parent takes Ctrl-C again, so it always stops the rendering (only a Ctrl-C in the
    second or so of start-up goes unheard). On an interrupt or an error the parent cancels the clips not
    started and waits for those being rendered (each writes through a temporary file), so no rendering
    process outlives this call.
    """
    workers = workers if workers is not None else (os.cpu_count() or 1)
    bar = tqdm(total=len(jobs), desc="rendering clips", unit="clip", disable=not progress or not jobs)
    with bar:
        if workers <= 1 or len(jobs) < 64:
            for job in jobs:
                _render(job)
                bar.update()
            return
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
        # "spawn" keeps worker start-up independent of whatever threads the caller holds.
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_ignore_interrupts)
        try:
            try:
                # One task per process, submitted at once, starts them all now (a process is started for a
                # task while none is idle); their results mean each runs its initializer's SIGINT setting.
                for future in [pool.submit(_started) for _ in range(workers)]:
                    future.result()
            finally:
                if main_thread:
                    signal.signal(signal.SIGINT, previous)
            for _ in pool.map(_render, jobs, chunksize=4):
                bar.update()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)


def format_summary(summary: dict[str, Any]) -> Iterable[str]:
    """Human-readable lines of a `build_synthetic_dataset` summary."""
    yield (f"{summary['videos']} videos in {summary['out_dir']} ({summary['rendered']} rendered now) "
           f"in {summary['seconds']:.1f} s")
    for split, counts in summary["splits"].items():
        categories = ", ".join(f"{name} {count}" for name, count in counts["categories"].items())
        yield (f"  {split:5s}: {counts['videos']} videos, {counts['records']} records "
               f"({counts['answerable']} answerable, {counts['unanswerable']} unanswerable: {categories})")
