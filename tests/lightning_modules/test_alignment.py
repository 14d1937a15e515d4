"""AlignmentModule through `main.py fit`: SFT and DPO smoke runs, the DPO reference, checkpoints that hold the
trainable weights only and resume exactly, the exported adapter, label masking and the bad-pair errors.

Runs use the tiny LLaVA-NeXT-Video model (1-layer towers, width 32) on a 12-clip synthetic dataset; the
shared fixtures are in tests/conftest.py.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from probes import CrashAt, SeenBatches, StopAfter

from datamodules.answerability import (
    IGNORE_INDEX,
    SEGMENT_CHOSEN,
    SEGMENT_PAD,
    SEGMENT_PROMPT,
    SEGMENT_REJECTED,
    AnswerabilityDataModule,
    ChatCollator,
    EpochSeededSampler,
    Example,
)
from datamodules.records import RecordError, read_records
from datamodules.shapes.questions import template_vocabulary
from datamodules.video import read_video
from lightning_modules.alignment import AlignmentModule, warmup_cosine
from lightning_modules.tiny import TINY_CHAT_TEMPLATE, TinyArchitecture, build_tiny_processor
from lightning_modules.video_llm import VideoLLMConfig, load_video_llm

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected")  # TRL's names, logged under train/ and val/


@pytest.fixture(scope="module")
def processor():
    """The embedded tiny model's processor (its sizes do not matter to the collator beyond the frame size)."""
    return build_tiny_processor(template_vocabulary(), TinyArchitecture())


def items_of(data_dir: Path, ids: list[str] | None = None, split: str = "train", num_frames: int = 2):
    """(Example, frames) pairs of the records of `split` with the given ids (default: all)."""
    records, _ = read_records(data_dir / f"{split}.jsonl", data_dir)
    if ids is not None:
        by_id = {r.id: r for r in records}
        records = [by_id[i] for i in ids]
    return [
        (Example(r, str(data_dir / r.video), r.rejected, str(data_dir / f"{split}.jsonl")),
         read_video(data_dir / r.video, num_frames))
        for r in records
    ]


def trainable_keys(module) -> set[str]:
    return {f"llm.{name}" for name, p in module.llm.named_parameters() if p.requires_grad}


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def record_rows(data_dir: Path, split: str = "train") -> list[dict]:
    return [json.loads(line) for line in (data_dir / f"{split}.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------- collator
def test_labels_cover_the_response_only(processor, synthetic_data):
    """sft and dpo rows: a label on each response token and the end of turn; prompt, video tokens and left
    padding are IGNORE_INDEX; dpo puts the chosen rows first, then the rejected rows."""
    rows = record_rows(synthetic_data)
    answerable = next(r for r in rows if r["answerable"])
    unanswerable = next(r for r in rows if not r["answerable"])
    items = items_of(synthetic_data, [answerable["id"], unanswerable["id"]])
    tokenizer = processor.tokenizer

    def check(batch, responses):
        assert batch["labels"].shape == batch["input_ids"].shape
        assert (batch["attention_mask"] == 0).any(), "rows of different lengths: some left padding"
        for row, response in enumerate(responses):
            labels, ids = batch["labels"][row], batch["input_ids"][row]
            expected = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            kept = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
            assert kept == list(range(len(labels) - len(expected), len(labels))), f"row {row}"
            assert labels[kept].tolist() == expected == ids[kept].tolist()
            assert tokenizer.unk_token_id not in ids.tolist()
        assert (batch["labels"][batch["input_ids"] == processor.video_token_id] == IGNORE_INDEX).all()
        assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()

    answers = [answerable["answer"], unanswerable["answer"]]
    check(ChatCollator(processor, "sft")(items), answers)
    dpo = ChatCollator(processor, "dpo")(items)
    assert dpo["input_ids"].shape[0] == 2 and dpo["ids"] == [answerable["id"], unanswerable["id"]]
    # One row a pair: [prompt][chosen][rejected]; the labels cover both responses, which end the row.
    pairs = zip(answers, (answerable, unanswerable), strict=True)
    check(dpo, [f"{answer} </s> {record['rejected']}" for answer, record in pairs])
    for row, record in enumerate((answerable, unanswerable)):
        segments = dpo["pair_segments"][row]
        rejected = len(tokenizer(record["rejected"], add_special_tokens=False)["input_ids"]) + 1
        chosen = len(tokenizer(record["answer"], add_special_tokens=False)["input_ids"]) + 1
        expected = [SEGMENT_CHOSEN] * chosen + [SEGMENT_REJECTED] * rejected
        assert segments[-chosen - rejected :].tolist() == expected
        assert (segments[dpo["attention_mask"][row] == 0] == SEGMENT_PAD).all()
        prompt = segments[: -chosen - rejected][dpo["attention_mask"][row][: -chosen - rejected] == 1]
        assert len(prompt) and (prompt == SEGMENT_PROMPT).all()


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


def test_over_long_prompt_is_an_error_naming_the_record(processor, synthetic_data):
    """max_length below the video tokens: a RecordError naming the file and the record, never a cut prompt."""
    items = items_of(synthetic_data)[:2]
    video_tokens = int((ChatCollator(processor, "generate")(items)["input_ids"] == processor.video_token_id)
                       .sum(dim=1).max())
    first = items[0][0].record.id
    for mode in ("sft", "dpo", "generate"):
        with pytest.raises(RecordError, match=rf"train\.jsonl: field 'question': record '{first}'"
                           rf".* over max_length={video_tokens - 1}"):
            ChatCollator(processor, mode, max_length=video_tokens - 1)(items)

    module = AnswerabilityDataModule(data_dir=str(synthetic_data), num_frames=2, batch_size=4, max_length=10,
                                     processor=processor)
    module.setup("fit")
    with pytest.raises(RecordError, match=r"train\.jsonl: field 'question': record 'v\d+-q\d+'.*length=10"):
        next(iter(module.train_dataloader()))


def test_a_template_the_tokenizer_merges_across_is_an_error(synthetic_data):
    """Response labels are placed by the token counts of the chat text up to each response; a template that
    glues the response to the prompt ("ASSISTANTred" is one word, unknown) breaks that, and the collator says
    so instead of labelling the wrong tokens."""
    processor = build_tiny_processor(template_vocabulary(), TinyArchitecture())
    processor.chat_template = TINY_CHAT_TEMPLATE.replace("ASSISTANT: ", "ASSISTANT").replace(
        "ASSISTANT:{% endif %}", "ASSISTANT{% endif %}")
    items = items_of(synthetic_data)[:2]
    with pytest.raises(ValueError, match="does not tokenize as a prefix of its conversation"):
        ChatCollator(processor, "sft")(items)
    ChatCollator(build_tiny_processor(template_vocabulary(), TinyArchitecture()), "sft")(items)


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


def test_the_synthetic_world_is_built_only_when_asked_and_only_into_an_empty_folder(processor, tmp_path):
    from datamodules.shapes.dataset import SyntheticDatasetError

    data = tmp_path / "data"
    settings = dict(data_dir=str(data), num_frames=2, synthetic_videos=4, processor=processor)
    AnswerabilityDataModule(**settings).prepare_data()
    assert not data.exists(), "not asked for: nothing built"
    module = AnswerabilityDataModule(**settings, synthetic=True)
    module.prepare_data()
    assert {p.name for p in data.iterdir()} >= {"train.jsonl", "val.jsonl", "test.jsonl", "synth.json"}
    train = (data / "train.jsonl").stat().st_mtime_ns
    module.prepare_data()
    assert (data / "train.jsonl").stat().st_mtime_ns == train, "a finished folder is used as it is"
    module.setup("fit")
    assert len(module.datasets["train"]) > 0

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.jsonl").write_bytes((data / "train.jsonl").read_bytes())
    with pytest.raises(SyntheticDatasetError, match="not empty and was not built by synth"):
        AnswerabilityDataModule(**{**settings, "data_dir": str(mine)}, synthetic=True).prepare_data()
    assert [p.name for p in mine.iterdir()] == ["train.jsonl"]


def test_an_interrupted_synthetic_build_is_refused_by_the_datamodule(processor, synthetic_data, tmp_path):
    import shutil

    from datamodules.shapes.dataset import SyntheticDatasetError

    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    manifest = json.loads((data / "synth.json").read_text())
    (data / "synth.json").write_text(json.dumps({**manifest, "complete": False}))
    module = AnswerabilityDataModule(data_dir=str(data), num_frames=2, processor=processor)
    with pytest.raises(SyntheticDatasetError, match="last synth build was interrupted.*rerun it to finish"):
        module.setup("fit")


def test_a_mix_that_leaves_no_records_is_an_error_naming_the_file(processor, synthetic_data, tmp_path):
    rows = [r for r in record_rows(synthetic_data) if not r["answerable"]]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    module = AnswerabilityDataModule(data_dir=str(tmp_path), train_file=str(train), val_file=None,
                                     video_root=str(synthetic_data), unanswerable_fraction=0.0, num_frames=2,
                                     processor=processor)
    with pytest.raises(RecordError, match=r"train\.jsonl: no records left for train_file after "
                       r"unanswerable_fraction=0\.0"):
        module.setup("fit")


# --------------------------------------------------------------------------------------------- fit
def test_fit_sft_smoke(tmp_path, cli_args, run_main, synthetic_data):
    """Full fine-tuning SFT for 2 steps: losses logged, a checkpoint of the trainable weights only (no frozen
    vision tower), and an exported model that loads by path and gives the module's logits."""
    cli = run_main(cli_args("fit", tmp_path, steps=2, extra=["--trainer.val_check_interval=2"]))
    module, trainer = cli.model, cli.trainer
    assert trainer.global_step == 2
    for key in ("train/loss", "val/loss"):
        assert torch.isfinite(trainer.callback_metrics[key]), key

    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert set(checkpoint["state_dict"]) == trainable_keys(module)
    assert not any("vision_tower" in key for key in checkpoint["state_dict"])

    exported = tmp_path / "hf_model"
    assert (exported / "model.safetensors").is_file() and (exported / "config.json").is_file()
    model, _ = load_video_llm(VideoLLMConfig(name_or_path=str(exported), num_frames=2))
    batch = ChatCollator(module.processor, "sft")(items_of(synthetic_data)[:2])
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**module._inputs(batch)).logits, module(batch))


def test_dpo_lora_fit_logs_rewards_and_logps(lora_dpo_run):
    """LoRA DPO logs the loss, the rewards and both log-probs (train and val), to W&B too; the reference is
    the model with adapters disabled, not a copy."""
    metrics = lora_dpo_run.metrics
    stages = ("train", "val")
    for key in ("train/loss", "val/loss", *(f"{stage}/{k}" for stage in stages for k in DPO_METRICS)):
        assert key in metrics and metrics[key] == metrics[key], f"{key} missing or NaN: {sorted(metrics)}"
    assert 0.0 <= metrics["train/rewards/accuracies"] <= 1.0
    # margin = mean(chosen - rejected) in float32: equal to the difference of means up to rounding
    margin = metrics["train/rewards/chosen"] - metrics["train/rewards/rejected"]
    assert metrics["train/rewards/margins"] == pytest.approx(margin, rel=1e-4, abs=1e-5), dict(metrics)
    assert metrics["train/logps/chosen"] < 0 and metrics["train/logps/rejected"] < 0
    assert lora_dpo_run.cli.trainer.global_step == 3

    module = lora_dpo_run.cli.model
    assert module.uses_lora and module.reference is None, "LoRA: the reference is the adapters-disabled model"
    assert not any(name.startswith("reference.") for name, _ in module.named_parameters())

    runs = list((lora_dpo_run.out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, "one offline W&B run"
    logged = runs[0].read_bytes()
    for key in ("train/loss", *(f"train/{k}" for k in DPO_METRICS)):
        assert key.encode() in logged, f"{key} not in the W&B run"


def test_lora_checkpoint_holds_adapter_weights_only(lora_dpo_run):
    module = lora_dpo_run.cli.model
    checkpoint = load_checkpoint(lora_dpo_run.out / "checkpoints" / "last.ckpt")
    state = checkpoint["state_dict"]
    assert state and all("lora_" in key for key in state), [k for k in state if "lora_" not in k][:3]
    assert set(state) == trainable_keys(module)
    current = dict(module.named_parameters())
    for key, value in state.items():
        torch.testing.assert_close(value, current[key].detach(), rtol=0, atol=0)
    assert checkpoint["global_step"] == 3


def test_exported_adapter_loads_with_peft(lora_dpo_run, synthetic_data):
    """hf_model/ is a peft adapter: PeftModel.from_pretrained(base, folder) gives the module's logits."""
    from peft import PeftModel

    folder = lora_dpo_run.out / "hf_model"
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert not (folder / "model.safetensors").exists(), "the adapter, not a merged model"

    module = lora_dpo_run.cli.model.eval()
    base, _ = load_video_llm(VideoLLMConfig(name_or_path=str(lora_dpo_run.base), num_frames=2))
    with torch.no_grad():
        batch = ChatCollator(module.processor, "sft")(items_of(synthetic_data, split="val")[:3])
        inputs = module._inputs(batch)
        base_logits = base.eval()(**inputs).logits
        loaded = PeftModel.from_pretrained(base, folder).eval()
        torch.testing.assert_close(loaded(**inputs).logits, module(batch))
    assert not torch.allclose(base_logits, module(batch), atol=1e-6), "the adapter changed the model"


def test_full_finetuning_dpo_reference_is_a_frozen_copy(tmp_path, cli_args, run_main, tiny_base):
    """With the reference run in every step (precompute_ref_log_probs=False), full fine-tuning keeps a frozen
    copy of the initial model."""
    cli = run_main(cli_args("fit", tmp_path, objective="dpo", base=tiny_base, steps=2,
                            extra=["--model.init_args.lr=0.01", "--trainer.limit_val_batches=0",
                                   "--model.init_args.precompute_ref_log_probs=false"]))
    module = cli.model
    reference = module.reference
    assert reference is not None and reference is not module.llm
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    optimized = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in reference.parameters()}

    fresh, _ = load_video_llm(VideoLLMConfig(name_or_path=str(tiny_base), num_frames=2))
    fresh_state = fresh.state_dict()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(value, fresh_state[name], rtol=0, atol=0, msg=name)
    policy = dict(module.llm.named_parameters())
    assert any(not torch.equal(policy[n], fresh_state[n]) for n, p in policy.items() if p.requires_grad)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["state_dict"]
    assert set(state) == trainable_keys(module), "no reference weights in the checkpoint"


def dpo_pairs(datamodule, split: str) -> list[dict]:
    """Every pair of a split, collated as the training loader does, in batches."""
    loader = getattr(datamodule, f"{split}_dataloader")()
    dataset, collate = loader.dataset, loader.collate_fn
    return [collate([dataset[i] for i in range(start, min(start + 4, len(dataset)))])
            for start in range(0, len(dataset), 4)]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_reference_log_probs_are_computed_once_before_training(tmp_path, cli_args, run_main, tiny_base,
                                                                   lora):
    """precompute_ref_log_probs (the default): `fit` computes the reference log-probabilities of every
    training and validation pair before training, equal to the initial model's (the frozen copy's, then
    freed; or the adapters-disabled model's), in one cache file; the steps read them from it."""
    cli = run_main(cli_args("fit", tmp_path, objective="dpo", base=tiny_base, lora=lora, steps=2,
                            extra=["--model.init_args.lr=0.01"]))
    module = cli.model
    assert module.reference is None, "no reference model is kept for training"
    files = list((tmp_path / "reference_logps").glob("*.json"))
    assert len(files) == 1 and files[0] == module.reference_cache.path
    cached = json.loads(files[0].read_text())
    assert cached["identity"]["name_or_path"] == str(tiny_base) and cached["identity"]["num_frames"] == 2

    config = VideoLLMConfig(name_or_path=str(tiny_base), num_frames=2)
    initial = AlignmentModule(model=config, objective="dpo", precompute_ref_log_probs=False).eval()
    seen = 0
    for split in ("train", "val"):
        for batch in dpo_pairs(cli.datamodule, split):
            with torch.no_grad():
                expected, _ = initial.pair_logps(initial.llm, batch)
            half = len(batch["ids"])
            for row, (record, digest) in enumerate(zip(batch["ids"], batch["pair_digests"], strict=True)):
                entry = cached["pairs"][record]
                assert entry[0] == digest
                pair = [float(expected[row]), float(expected[half + row])]
                assert entry[1:] == pytest.approx(pair, abs=1e-5)
                seen += 1
    assert seen == len(cached["pairs"]) > 0

    if lora:
        return
    # a changed pair is not matched to its stale entry: the step refuses it, naming the pair and the file
    batch = dpo_pairs(cli.datamodule, "train")[0]
    batch["pair_digests"] = ["changed"] + batch["pair_digests"][1:]
    with pytest.raises(RuntimeError, match=f"pair {batch['ids'][0]!r}: the reference log-probability cache"):
        module.model_step(batch, "train")


def test_dpo_reference_pass_runs_in_the_training_precision(tmp_path, cli_args, run_main, tiny_base):
    """Under `precision: bf16-mixed` the reference pass runs in the steps' autocast, so that the cached
    log-probabilities are the initial policy's as the first step computes them; the cache is keyed by the
    precision."""
    cli = run_main(cli_args("fit", tmp_path, objective="dpo", base=tiny_base, lora=True, steps=1,
                            extra=["--trainer.precision=bf16-mixed", "--trainer.limit_val_batches=0"]))
    cached = json.loads(cli.model.reference_cache.path.read_text())
    assert cached["identity"]["precision"] == "bf16-mixed"

    config = VideoLLMConfig(name_or_path=str(tiny_base), num_frames=2)
    initial = AlignmentModule(model=config, objective="dpo", precompute_ref_log_probs=False).eval()
    batch = dpo_pairs(cli.datamodule, "train")[0]
    with torch.no_grad():
        full, _ = initial.pair_logps(initial.llm, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            mixed, _ = initial.pair_logps(initial.llm, batch)
    half = len(batch["ids"])
    entries = [cached["pairs"][record][1:] for record in batch["ids"]]
    got = torch.tensor([[chosen for chosen, _ in entries], [rejected for _, rejected in entries]]).flatten()
    assert not torch.allclose(full, mixed, atol=1e-3), "bf16 changes the log-probabilities"
    torch.testing.assert_close(got, mixed.float().reshape(2, half).flatten(), rtol=0, atol=1e-4)


def test_dpo_resume_reuses_the_cached_reference_and_matches_an_uninterrupted_run(tmp_path, cli_args,
                                                                                 run_main, tiny_base):
    """Full fine-tuning DPO with cached reference log-probabilities, one epoch of 4 batches checkpointed
    every 2: a run killed before step 3 and resumed from `last.ckpt` reuses the cache (the reference
    identity is the initial model's, not the restored weights') and ends with the uninterrupted run's
    weights."""

    def fit(out: Path, *callbacks: L.Callback, ckpt_path: Path | None = None):
        args = cli_args(None, out, objective="dpo", base=tiny_base, steps=-1,
                        extra=["--trainer.max_epochs=1", "--trainer.limit_train_batches=4",
                               "--trainer.val_check_interval=2", "--model.init_args.lr=0.01",
                               "--model.init_args.warmup_steps=1"])
        cli = run_main(args, run=False)
        cli.trainer.callbacks.extend(callbacks)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
        return {n: p.detach().clone() for n, p in cli.model.llm.named_parameters() if p.requires_grad}

    straight = fit(tmp_path / "straight")
    with pytest.raises(RuntimeError, match="killed"):
        fit(tmp_path / "resumed", CrashAt(2))
    files = list((tmp_path / "resumed" / "reference_logps").glob("*.json"))
    assert len(files) == 1, "the reference pass ran, and its cache was written, before the crash"
    written = files[0].stat().st_mtime_ns
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last)["global_step"] == 2
    final = fit(tmp_path / "resumed", ckpt_path=last)
    assert list((tmp_path / "resumed" / "reference_logps").glob("*.json")) == files, "the same identity"
    assert files[0].stat().st_mtime_ns == written, "nothing recomputed: the cache is not rewritten"
    for name in straight:
        torch.testing.assert_close(final[name], straight[name], msg=name)


def test_mid_epoch_resume_trains_on_the_batches_an_uninterrupted_run_does(tmp_path, cli_args, run_main,
                                                                          tiny_base):
    """One epoch of 4 batches, validated and checkpointed every 2: a run killed before step 3 and resumed
    from its step-2 `last.ckpt` trains steps 3-4 on batches 3-4 (not on batches 1-2 again) and ends with the
    uninterrupted run's adapters."""

    def args(out: Path, subcommand: str | None = "fit") -> list[str]:
        return cli_args(subcommand, out, base=tiny_base, lora=True, steps=-1,
                        extra=["--trainer.max_epochs=1", "--trainer.limit_train_batches=4",
                               "--trainer.val_check_interval=2", "--model.init_args.lr=0.01",
                               "--model.init_args.warmup_steps=1"])

    def fit(out: Path, *callbacks: L.Callback, ckpt_path: Path | None = None):
        cli = run_main(args(out, subcommand=None), run=False)
        cli.trainer.callbacks.extend(callbacks)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
        return {n: p.detach().clone() for n, p in cli.model.llm.named_parameters() if p.requires_grad}

    straight_batches, resumed_batches = SeenBatches(), SeenBatches()
    straight = fit(tmp_path / "straight", straight_batches)
    assert sorted(straight_batches.ids) == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="killed"):
        fit(tmp_path / "resumed", CrashAt(2))
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last)["global_step"] == 2, "a checkpoint at the mid-epoch validation"
    final = fit(tmp_path / "resumed", resumed_batches, ckpt_path=last)
    assert resumed_batches.ids == {2: straight_batches.ids[2], 3: straight_batches.ids[3]}
    for name in straight:
        torch.testing.assert_close(final[name], straight[name], msg=name)


def test_resume_matches_uninterrupted_run(tmp_path, cli_args, run_main, tiny_base):
    """2 epochs of 2 steps straight == interrupted after epoch 1, then `--ckpt_path last` (LoRA, a cosine
    schedule over the 4 steps, shuffled batches). The resumed run logs to W&B: `last` must still find the run
    folder's checkpoint, not look in a W&B folder.

    Lightning 2.6 misplaces an epoch-end resume of a max_steps-bounded run, hence max_epochs here."""
    import wandb

    def args(out: Path, subcommand: str | None = "fit", **kwargs) -> list[str]:
        return cli_args(subcommand, out, base=tiny_base, lora=True, steps=-1, **kwargs,
                        extra=["--trainer.max_epochs=2", "--trainer.limit_train_batches=2",
                               "--trainer.limit_val_batches=0", "--model.init_args.lr=0.01",
                               "--model.init_args.warmup_steps=1"])

    def adapters(module) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in module.llm.named_parameters() if p.requires_grad}

    straight = adapters(run_main(args(tmp_path / "straight")).model)

    interrupted = run_main(args(tmp_path / "resumed", subcommand=None), run=False)
    interrupted.trainer.callbacks.append(StopAfter(2))
    interrupted.trainer.fit(interrupted.model, datamodule=interrupted.datamodule)
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert interrupted.trainer.global_step == 2 and load_checkpoint(last)["global_step"] == 2
    halfway = adapters(interrupted.model)

    try:
        resumed = run_main(args(tmp_path / "resumed", logger=tmp_path / "wandb") + ["--ckpt_path=last"])
    finally:
        wandb.finish()
    assert Path(resumed.trainer.ckpt_path) == last
    assert resumed.trainer.global_step == 4
    final = adapters(resumed.model)
    assert straight.keys() == final.keys()
    assert any(not torch.allclose(halfway[n], straight[n]) for n in straight), "steps 3-4 moved the adapters"
    for name in straight:
        torch.testing.assert_close(final[name], straight[name], msg=name)


# ------------------------------------------------------------------------------------- lr schedule
def hand_written_factor(step: int, warmup_steps: int, total: int) -> float:
    """The schedule AlignmentModule wrote by hand before it used transformers': linear warm-up from
    1/(warmup + 1), then cosine decay to 0 at `total`."""
    if step == 0:
        return 1 / (warmup_steps + 1)
    warmup = min(warmup_steps, total - 1)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@pytest.mark.parametrize(("warmup_steps", "total"), [(0, 10), (1, 4), (3, 10), (9, 10), (0, 1)])
def test_warmup_cosine_is_the_hand_written_schedule(warmup_steps, total):
    """transformers' get_cosine_schedule_with_warmup, one step ahead, gives the old factors at every step,
    from the start and from a resumed step."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    scheduler = warmup_cosine(optimizer, warmup_steps, total)
    for step in range(total):
        expected = hand_written_factor(step, warmup_steps, total)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * expected, abs=1e-12), step
        optimizer.step()
        scheduler.step()
    resumed = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    warmup_cosine(resumed, warmup_steps, total, step=total - 1)
    expected = hand_written_factor(total - 1, warmup_steps, total)
    assert resumed.param_groups[0]["lr"] == pytest.approx(0.1 * expected, abs=1e-12)


def test_fit_installs_the_schedule_at_the_first_step(lora_dpo_run):
    """The 3-step LoRA DPO run: transformers' schedule, one step ahead of the optimizer steps taken."""
    config = lora_dpo_run.cli.trainer.lr_scheduler_configs[0]
    assert isinstance(config.scheduler.lr_lambdas[0], functools.partial)
    assert config.scheduler.lr_lambdas[0].func.__module__ == "transformers.optimization"
    assert config.scheduler.last_epoch == lora_dpo_run.cli.trainer.global_step + 1 == 4
