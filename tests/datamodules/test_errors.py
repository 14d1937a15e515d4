"""User errors: one base class, picklable with their message, and readable back out of a DataLoader worker."""

from __future__ import annotations

import pickle

import pytest
from torch.utils.data import DataLoader

from datamodules.collation import Example
from datamodules.errors import USER_ERRORS, UserError, user_error_message
from datamodules.loading import ExampleDataset
from datamodules.records import QARecord, RecordError
from datamodules.shapes.dataset import SyntheticDatasetError
from datamodules.sources.common import AnnotationError
from datamodules.video import VideoError


@pytest.mark.parametrize(
    "error",
    [
        RecordError("train.jsonl", 4, "question", "is empty"),
        AnnotationError("anns.json", "item 3", "vid", "missing"),
        VideoError("videos/a.mp4", "the video file is empty"),
        SyntheticDatasetError("data was built with other settings (changed: seed)"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_every_user_error_derives_from_one_base_and_pickles_whole(error):
    assert isinstance(error, UserError) and isinstance(error, USER_ERRORS)
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error) and str(again) == str(error)
    assert vars(again) == vars(error)
    assert user_error_message(again) == str(error)


def test_other_errors_are_not_user_errors_and_a_cause_is_followed():
    assert user_error_message(ValueError("a bug")) is None
    wrapped = "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call):\n"
    assert user_error_message(RuntimeError(wrapped + "ValueError: x")) is None
    try:
        try:
            raise VideoError("a.mp4", "no such video file")
        except VideoError as error:
            raise ValueError("Does not validate against any of the Union subtypes") from error
    except ValueError as error:
        assert user_error_message(error) == "a.mp4: no such video file"
    try:
        try:
            raise VideoError("a.mp4", "no such video file")
        except VideoError:
            raise ValueError("a bug while handling it") from None
    except ValueError as error:
        assert user_error_message(error) is None, "only an explicit cause is followed"


def corrupt_examples(tmp_path) -> list[Example]:
    video = tmp_path / "broken.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    record = QARecord(id="r1", video="broken.mp4", question="Q?", answer="A", answerable=True)
    return [Example(record, str(video))] * 4


def test_a_video_error_in_a_dataloader_worker_reads_back_as_its_one_line(tmp_path):
    examples = corrupt_examples(tmp_path)
    loader = DataLoader(ExampleDataset(examples, num_frames=2), batch_size=2, num_workers=2,
                        collate_fn=list)
    with pytest.raises(Exception) as info:
        next(iter(loader))
    assert "in DataLoader worker process" in str(info.value), "torch wraps the worker's error"
    message = user_error_message(info.value)
    assert message is not None and message.startswith(f"{examples[0].video_path}: cannot decode")
    assert "\n" not in message
