"""AnswerabilityDataModule: packed conversations, DPO pairs and their rejected responses, the mix, the
seeded subset and training order, and the errors for records that leave nothing to train on.

The records are those of the 12-clip synthetic dataset of tests/conftest.py.
"""

from __future__ import annotations

import ast
import inspect
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from record_items import record_rows, write_jsonl

from datamodules.answerability import AnswerabilityDataModule
from datamodules.batch_format import IGNORE_INDEX
from datamodules.collation import ChatCollator, Example
from datamodules.loading import EpochSeededSampler
from datamodules.records import RecordError

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_packed_conversations_label_every_answer_and_nothing_else(processor, synthetic_data):
    """turns_per_example=3: questions about one clip become turns of one conversation (the clip in the first);
    each answer and its end of turn is labelled, every question and the video tokens are not."""
    data = AnswerabilityDataModule(str(synthetic_data), unanswerable_fraction=None, num_frames=2,
                                   turns_per_example=3, processor=processor)
    data.setup("fit")
    train = data.datasets["train"]
    assert max(len(e.follow_ups) for e in train.examples) == 2
    assert all(f.video == e.record.video for e in train.examples for f in e.follow_ups)
    asked = sorted(r.id for e in train.examples for r in (e.record, *e.follow_ups))
    assert asked == sorted(r["id"] for r in record_rows(synthetic_data)), "every record once"
    items = [train[i] for i in range(len(train)) if train.examples[i].follow_ups][:3]
    collator = ChatCollator(processor, "sft")
    batch = collator(items)
    tokenizer = processor.tokenizer
    # A later epoch reads the conversations' spans from the collator's cache, in another batch order.
    again = collator(items[::-1])
    for key in ("input_ids", "labels"):
        assert torch.equal(again[key].flip(0), batch[key])

    def answer_tokens(answer: str) -> list[int]:
        return tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    for row, (example, _) in enumerate(items):
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        kept = labels != IGNORE_INDEX
        expected = []
        for record in (example.record, *example.follow_ups):
            expected += answer_tokens(record.answer)
        assert labels[kept].tolist() == expected == ids[kept].tolist()
        prompt_only = ChatCollator(processor, "generate")([items[row]])["input_ids"]
        video = processor.video_token_id
        assert (ids == video).sum() == (prompt_only == video).sum(), "one clip per conversation"
    first, frames = items[0]
    single = ChatCollator(processor, "sft")([(Example(first.record, first.video_path), frames)])["labels"][0]
    assert single[single != IGNORE_INDEX].tolist() == answer_tokens(first.record.answer)
    with pytest.raises(ValueError, match="turns_per_example must be 1 for DPO"):
        AnswerabilityDataModule(str(synthetic_data), objective="dpo", turns_per_example=2,
                                processor=processor).setup("fit")


def test_max_train_samples_is_a_seeded_subset_of_the_mix(synthetic_data, processor):
    """`max_train_samples` keeps a random subset of the mixed training set, the same for a seed, so that DPO's
    reference pass covers just the trained pairs; validation keeps all its records."""
    def train_ids(**kwargs):
        module = AnswerabilityDataModule(data_dir=str(synthetic_data), num_frames=2, processor=processor,
                                         unanswerable_fraction=0.4, **kwargs)
        module.setup("fit")
        return [e.record.id for e in module.datasets["train"].examples], len(module.datasets["val"])

    everything, val_items = train_ids()
    subset, subset_val_items = train_ids(max_train_samples=7)
    assert len(subset) == 7 and len(set(subset)) == 7
    assert set(subset) < set(everything)
    assert subset == sorted(subset, key=everything.index), "kept in the mix's order"
    assert train_ids(max_train_samples=7)[0] == subset
    assert train_ids(max_train_samples=7, seed=1)[0] != subset
    assert subset_val_items == val_items
    assert train_ids(max_train_samples=10**6)[0] == everything
    with pytest.raises(ValueError, match="max_train_samples must be at least 1"):
        train_ids(max_train_samples=0)


def test_training_order_depends_on_seed_and_epoch_only(synthetic_data, processor):
    """The shuffled order is a function of (seed, epoch), so a resumed run sees the batches of an
    uninterrupted one."""
    module = AnswerabilityDataModule(data_dir=str(synthetic_data), num_frames=2, processor=processor)
    module.setup("fit")
    sampler = module.train_dataloader().sampler
    assert isinstance(sampler, EpochSeededSampler)
    first = list(sampler)
    torch.manual_seed(123)  # the global RNG does not matter
    assert list(sampler) == first and sorted(first) == list(range(len(first)))
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_a_mix_that_leaves_no_records_is_an_error_naming_the_file(processor, synthetic_data, tmp_path):
    rows = [r for r in record_rows(synthetic_data) if not r["answerable"]]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    module = AnswerabilityDataModule(data_dir=str(tmp_path), train_file=str(train), val_file=None,
                                     video_root=str(synthetic_data), unanswerable_fraction=0.0, num_frames=2,
                                     processor=processor)
    with pytest.raises(RecordError, match=r"train\.jsonl: no records left for train_file after "
                       r"unanswerable_fraction=0\.0"):
        module.setup("fit")


# ------------------------------------------------------------------------------------------ bad pairs
def dpo_module(processor, data_dir: Path, train: Path, **kwargs) -> AnswerabilityDataModule:
    return AnswerabilityDataModule(
        data_dir=str(train.parent), train_file=train.name, val_file=None, test_file=None,
        video_root=str(data_dir), objective="dpo", num_frames=2, processor=processor, **kwargs,
    )


def test_dpo_record_without_rejected_response_is_an_error(processor, synthetic_data, tmp_path):
    rows = record_rows(synthetic_data)
    rows[3]["rejected"] = None
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(RecordError) as error:
        dpo_module(processor, synthetic_data, train).setup("fit")
    assert error.value.path == str(train) and error.value.field == "rejected"
    assert f"record {rows[3]['id']!r} has no rejected response" in str(error.value)


def test_rejected_predictions_must_cover_every_record(processor, synthetic_data, tmp_path):
    """A predictions file missing an id, or with an id of no record: an error naming the file and the id."""
    rows = record_rows(synthetic_data)
    unanswerable = [r["id"] for r in rows if not r["answerable"]]
    train = write_jsonl(tmp_path / "train.jsonl", rows)

    missing = write_jsonl(tmp_path / "missing.jsonl", [{"id": i, "response": "red"}
                                                       for i in unanswerable[1:]])
    with pytest.raises(RecordError) as error:
        dpo_module(processor, synthetic_data, train, rejected_predictions=str(missing)).setup("fit")
    assert error.value.path == str(missing) and error.value.field == "id"
    assert f"no prediction for record {unanswerable[0]!r}" in str(error.value)

    extra = [{"id": i, "response": "red"} for i in unanswerable] + [{"id": "nowhere-q9", "response": "red"}]
    unknown = write_jsonl(tmp_path / "unknown.jsonl", extra)
    with pytest.raises(RecordError, match=r"unknown\.jsonl: field 'id': prediction 'nowhere-q9' matches no"):
        dpo_module(processor, synthetic_data, train, rejected_predictions=str(unknown)).setup("fit")

    complete = write_jsonl(tmp_path / "complete.jsonl", extra[:-1])
    module = dpo_module(processor, synthetic_data, train, rejected_predictions=str(complete))
    module.setup("fit")
    examples = module.datasets["train"].examples
    assert {e.record.id: e.rejected for e in examples if not e.record.answerable} == dict.fromkeys(
        unanswerable, "red")
    assert all(e.rejected == e.record.rejected for e in examples if e.record.answerable)


def test_pairs_without_preference_are_dropped_before_the_mix(processor, synthetic_data, tmp_path, caplog):
    """On-policy rejected responses for every record: where the prediction is the gold answer there is no
    preference, and the pair is dropped before mixing, so the trained pairs have the configured share of
    unanswerable records; the log names the file and the count."""
    rows = record_rows(synthetic_data)
    answerable = [r for r in rows if r["answerable"]]
    right = {r["id"] for r in answerable[: len(answerable) // 2]}  # "f0" answers half of them right
    predictions = write_jsonl(tmp_path / "predictions.jsonl", [
        {"id": r["id"], "response": r["answer"] if r["id"] in right else "a wrong answer"} for r in rows])
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    module = dpo_module(processor, synthetic_data, train, rejected_predictions=str(predictions),
                        rejected_predictions_for="all", unanswerable_fraction=0.5)
    with caplog.at_level(logging.WARNING):
        module.setup("fit")
    examples = module.datasets["train"].examples
    assert module.skipped_pairs == len(right)
    assert f"train.jsonl: skipped {len(right)} pairs whose rejected response is the" in caplog.text
    assert not any(e.record.id in right for e in examples)
    assert all(e.rejected == "a wrong answer" for e in examples)
    kept_answerable = sum(e.record.answerable for e in examples)
    assert kept_answerable == min(len(answerable) - len(right), len(rows) - len(answerable))
    assert kept_answerable == len(examples) - kept_answerable  # the configured 0.5, not the files' share


# ------------------------------------------------------------------------------------------ boundaries
def test_the_datamodule_knows_nothing_of_the_synthetic_world():
    """Importing the DataModule (with its collation and loading) loads no module of the synthetic world, and
    importing the batch format loads nothing outside the standard library; `data_dir` has no default."""
    probe = ("import sys, datamodules.batch_format; print(sorted(m.split('.')[0] for m in sys.modules)); "
             "import datamodules.answerability; "
             "print(sorted(m for m in sys.modules if m.startswith('datamodules.shapes')))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    format_imports, shapes_modules = (ast.literal_eval(line) for line in done.stdout.splitlines())
    assert not set(format_imports) & {"torch", "numpy", "lightning"}, format_imports
    assert shapes_modules == []
    parameters = inspect.signature(AnswerabilityDataModule).parameters
    assert parameters["data_dir"].default is inspect.Parameter.empty
    assert not [name for name in parameters if name.startswith("synthetic")]
