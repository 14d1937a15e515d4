"""ChatCollator with the tiny model's processor: labels on the responses only, DPO pair rows and their
segments, over-long prompts and templates the tokenizer merges across are errors.

The records are those of the 12-clip synthetic dataset of tests/conftest.py.
"""

from __future__ import annotations

import pytest
from record_items import items_of, record_rows

from datamodules.answerability import AnswerabilityDataModule
from datamodules.batch_format import IGNORE_INDEX, Segment
from datamodules.collation import ChatCollator
from datamodules.records import RecordError
from datamodules.shapes.questions import template_vocabulary
from lightning_modules.tiny import TINY_CHAT_TEMPLATE, TinyArchitecture, build_tiny_processor

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


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
        expected = [Segment.CHOSEN] * chosen + [Segment.REJECTED] * rejected
        assert segments[-chosen - rejected :].tolist() == expected
        assert (segments[dpo["attention_mask"][row] == 0] == Segment.PAD).all()
        prompt = segments[: -chosen - rejected][dpo["attention_mask"][row][: -chosen - rejected] == 1]
        assert len(prompt) and (prompt == Segment.PROMPT).all()


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


@pytest.mark.parametrize("mode,renders", [("sft", 2), ("dpo", 3), ("generate", 2)])
def test_the_chat_template_renders_each_text_once(processor, synthetic_data, monkeypatch, mode, renders):
    """Chat-template renders per item of distinct questions (plus one probe of the end-of-turn token):
    SFT, the prompt and the conversation (which is also its last response's end: it was rendered twice
    before); DPO, the prompt once for the chosen and the rejected rows (it was rendered twice, and each
    conversation twice); generation, the prompt and the refusal opening. A second epoch renders nothing."""
    rows = record_rows(synthetic_data)
    chosen = list({row["question"]: row for row in rows if row["rejected"]}.values())[:6]
    items = items_of(synthetic_data, [row["id"] for row in chosen])
    calls = []
    original = processor.apply_chat_template

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(processor, "apply_chat_template", counted)
    collator = ChatCollator(processor, mode)
    collator(items)
    assert len(calls) == renders * len(items) + 1
    calls.clear()
    collator(items)
    assert len(calls) == 0
