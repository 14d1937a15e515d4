"""`test` and `predict` scoring at one vision pass and one prefill per model and item (issue 29).

Equality: on every family's tiny checkpoint, `AlignmentModule.test_step` gives the responses of a plain
`generate` call with the pixels (token for token) and the refusal likelihoods of a full forward pass over
[prompt][refusal opening] with the video (within 1e-4, fp32), for the model after alignment and, paired, for
the model before it (adapters disabled); LoRA and full fine-tuning. Counting: the vision tower's calls, the
language model's prefill tokens and the video processor's clips, per batch of `test` (paired and unpaired)
and `predict`.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from tiny_families import EXTRA_WORDS, FAMILIES

from datamodules.batch_format import IGNORE_INDEX
from datamodules.collation import ChatCollator, Example
from datamodules.records import REFUSAL_OPENING, QARecord
from datamodules.shapes.questions import template_vocabulary
from datamodules.shapes.world import sample_scene
from lightning_modules.alignment import AlignmentModule
from lightning_modules.losses import sequence_logps
from lightning_modules.video_llm import LoraSettings, VideoLLMConfig, model_inputs, vision_modules

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

VOCABULARY = template_vocabulary() + EXTRA_WORDS
RECORDS = [
    QARecord("a", "a.mp4", "what colour is the circle?", "the circle is red.", True),
    QARecord("b", "b.mp4", "is the small star touching the big square moving left?",
             "the question is unanswerable because there is no star in the video.", False,
             category="object", missing_element="star"),
]
families = pytest.mark.parametrize("family", list(FAMILIES))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    built: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in built:
            built[family] = str(FAMILIES[family](tmp_path_factory.mktemp(family), VOCABULARY))
        return built[family]

    return get


@pytest.fixture(scope="module")
def items() -> list[tuple[Example, np.ndarray]]:
    """Two examples whose prompts differ in length (a left-padded batch), with real rendered frames."""
    clips = [sample_scene(random.Random(seed)).render()[[0, 5, 10, 15]] for seed in (0, 1)]
    return [(Example(record, record.video), clip) for record, clip in zip(RECORDS, clips, strict=True)]


def build(path: str, lora: bool) -> AlignmentModule:
    """The tiny model, LoRA adapters (if any) moved off zero so that f1 differs from f0."""
    torch.manual_seed(0)
    settings = LoraSettings(r=4, alpha=8) if lora else None
    module = AlignmentModule(model=VideoLLMConfig(name_or_path=path, num_frames=4, lora=settings),
                             max_new_tokens=8)
    with torch.no_grad():
        for name, parameter in module.llm.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    return module.eval()


@torch.no_grad()
def reference(module: AlignmentModule, batch: dict) -> tuple[list[str], torch.Tensor]:
    """The scoring before issue 29: `generate` with the pixels, then the refusal likelihood from a full
    forward pass (video included) over each prompt followed by its opening's tokens."""
    inputs = model_inputs(batch)
    output = module.llm.generate(**inputs, generation_config=module.greedy_generation_config())
    texts = module.processor.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:],
                                                    skip_special_tokens=True)
    opening = batch["refusal_ids"]
    assert (opening != IGNORE_INDEX).all(), "the tiny tokenizer gives every row the same opening"
    rows = dict(inputs)
    rows["input_ids"] = torch.cat([inputs["input_ids"], opening], dim=1)
    rows["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(opening)], dim=1)
    if "mm_token_type_ids" in rows:
        rows["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(opening)], dim=1)
    labels = torch.cat([torch.full_like(inputs["input_ids"], IGNORE_INDEX), opening], dim=1)
    logps, counts = sequence_logps(module.llm(**rows, use_cache=False).logits, labels)
    return [t.strip() for t in texts], logps / counts


def scored_rows(module: AlignmentModule, batch: dict) -> list[dict]:
    module.evaluator.reset()
    module.test_step(batch, 0)
    return module.evaluator.rows


def assert_scores(rows: list[dict], model: str | None, expected: tuple[list[str], torch.Tensor]) -> None:
    got = [row[model] if model else row for row in rows]
    assert [g["response"] for g in got] == expected[0]
    likelihood = torch.tensor([g["refusal_likelihood"] for g in got])
    torch.testing.assert_close(likelihood, expected[1].float(), rtol=0, atol=1e-4)


@families
@pytest.mark.parametrize("lora,paired", [(True, True), (True, False), (False, False)],
                         ids=["lora-paired", "lora-unpaired", "full"])
def test_test_step_scores_equal_generate_and_a_full_forward(family, lora, paired, checkpoint, items):
    module = build(checkpoint(family), lora)
    module.hparams.paired = paired
    batch = ChatCollator(module.processor, "generate")(items)
    after = reference(module, batch)
    rows = scored_rows(module, batch)
    if not paired:
        assert_scores(rows, None, after)
        return
    with module.llm.disable_adapter():
        before = reference(module, batch)
    assert before != after, "the adapters change the model"
    assert_scores(rows, "after", after)
    assert_scores(rows, "before", before)


def test_adapters_on_the_projector_keep_two_vision_passes(checkpoint, items):
    """`modules_to_save` on the projector: f0 and f1 see different video features, each computed."""
    torch.manual_seed(0)
    settings = LoraSettings(r=4, alpha=8, modules_to_save=["multi_modal_projector"])
    module = AlignmentModule(model=VideoLLMConfig(name_or_path=checkpoint("llava_next_video"), num_frames=4,
                                                  lora=settings), max_new_tokens=8).eval()
    assert not module.adapters_spare_vision()
    with torch.no_grad():
        projector = module.llm.get_base_model().model.multi_modal_projector
        for name, parameter in projector.named_parameters():
            if "modules_to_save" in name:
                parameter.mul_(3.0)
    batch = ChatCollator(module.processor, "generate")(items)
    expected = reference(module, batch)
    with module.llm.disable_adapter():
        before = reference(module, batch)
    assert not torch.allclose(expected[1], before[1], atol=1e-4), "the projector's copy changes the scores"
    counter = count_vision(module)
    rows = scored_rows(module, batch)
    assert counter["calls"] == 2
    assert_scores(rows, "after", expected)
    assert_scores(rows, "before", before)


def count_vision(module: AlignmentModule) -> dict[str, int]:
    counter = {"calls": 0}
    for tower in vision_modules(module.llm):
        tower.register_forward_hook(lambda *_: counter.__setitem__("calls", counter["calls"] + 1))
    return counter


def count_prefill(module: AlignmentModule) -> list[int]:
    """Tokens per row of each language-model call of more than one position (the prefills; greedy decoding's
    steps run one position each)."""
    lengths: list[int] = []
    model = module.llm.get_base_model() if module.uses_lora else module.llm

    def hook(_module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and embeds.shape[1] > 1:
            lengths.append(embeds.shape[1])

    model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    return lengths


def count_clips(processor) -> list[int]:
    """The number of clips the processor's video processor is given, per call."""
    clips: list[int] = []
    video_processor = processor.video_processor
    preprocess = video_processor.preprocess

    def counting(videos, *args, **kwargs):
        clips.append(len(videos))
        return preprocess(videos, *args, **kwargs)

    video_processor.preprocess = counting
    return clips


@pytest.mark.parametrize("family", ["llava_next_video", "qwen2_5_vl"])
@pytest.mark.parametrize("paired", [True, False], ids=["paired", "unpaired"])
def test_test_step_runs_one_vision_pass_and_one_prefill_per_model(family, paired, checkpoint, items):
    """Per batch: the clips processed once, the vision tower run once (f0 and f1 share it), and each model's
    prefill is the prompt once plus the refusal opening's tokens after it (but its last)."""
    module = build(checkpoint(family), lora=True)
    module.hparams.paired = paired
    clips = count_clips(module.processor)
    batch = ChatCollator(module.processor, "generate")(items)
    assert clips == [len(items)], "each clip processed once"
    vision, prefill = count_vision(module), count_prefill(module)
    scored_rows(module, batch)
    models = 2 if paired else 1
    width, opening = batch["input_ids"].shape[1], batch["refusal_ids"].shape[1]
    assert vision["calls"] == 1
    assert prefill == [width, opening - 1] * models


def test_predict_step_runs_one_vision_pass_and_one_prefill(checkpoint, items):
    module = build(checkpoint("llava_next_video"), lora=True)
    clips = count_clips(module.processor)
    batch = ChatCollator(module.processor, "generate")(items)
    vision, prefill = count_vision(module), count_prefill(module)
    rows = module.predict_step(batch, 0)
    assert [row["id"] for row in rows] == ["a", "b"]
    assert clips == [len(items)] and vision["calls"] == 1
    assert prefill == [batch["input_ids"].shape[1]]


def test_refusal_opening_is_counted_in_context():
    """A SentencePiece-style tokenizer as Llama-2's (a "▁" prepended to the text, spaces as "▁", pieces that
    start at a "▁"): `" " + opening` tokenized alone starts with a lone "▁" token, one more than the opening
    has after the prompt's "ASSISTANT:"; scoring that count would take in the end-of-turn token."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import LlavaNextVideoProcessor, PreTrainedTokenizerFast

    from lightning_modules.tiny import TINY_CHAT_TEMPLATE, TinyArchitecture, build_tiny_processor

    spm = Tokenizer(models.BPE(unk_token="<unk>"))
    spm.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    corpus = [f"USER:\n{r.question} ASSISTANT: {r.answer}" for r in RECORDS] * 20
    corpus += [f"ASSISTANT: {REFUSAL_OPENING} because"] * 20
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<video>", "<image>"]
    spm.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    spm.normalizer = normalizers.Prepend("▁")  # Llama-2's legacy normalizer, then split before each "▁"
    spm.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    spm.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    named = {"video_token": "<video>", "image_token": "<image>"}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=spm, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>", padding_side="left",
                                        extra_special_tokens=named)
    tiny = build_tiny_processor(VOCABULARY, TinyArchitecture(image_size=32, patch_size=8))
    processor = LlavaNextVideoProcessor(
        video_processor=tiny.video_processor, image_processor=tiny.image_processor, tokenizer=tokenizer,
        chat_template=TINY_CHAT_TEMPLATE, patch_size=8, vision_feature_select_strategy="default",
        video_token="<video>", image_token="<image>", num_additional_image_tokens=1,
    )
    clip = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    collator = ChatCollator(processor, "generate")
    batch = collator([(Example(RECORDS[0], "a.mp4"), clip)])
    opening = batch["refusal_ids"][0].tolist()
    alone = tokenizer(" " + REFUSAL_OPENING, add_special_tokens=False)["input_ids"]
    assert len(alone) == len(opening) + 1 and alone[0] == tokenizer.convert_tokens_to_ids("▁"), alone
    prompt = collator.prompt(RECORDS[0].question)
    whole = tokenizer(prompt + " " + REFUSAL_OPENING)["input_ids"]
    assert whole == tokenizer(prompt)["input_ids"] + opening
    assert tokenizer.decode(opening).strip() == REFUSAL_OPENING


def test_a_second_test_reuses_f0_responses_and_likelihoods_from_a_paired_file(checkpoint, items, tmp_path):
    """`before_predictions` naming an earlier paired `test`'s predictions: f0 is not scored again (one vision
    pass, one prefill per item), and its rows, AUROC's likelihoods included, are the file's."""
    import json

    module = build(checkpoint("llava_next_video"), lora=True)
    batch = ChatCollator(module.processor, "generate")(items)
    first = scored_rows(module, batch)
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in first))
    module.hparams.before_predictions = str(path)
    module.on_test_epoch_start()
    vision, prefill = count_vision(module), count_prefill(module)
    module.test_step(batch, 0)
    assert vision["calls"] == 1 and len(prefill) == 2, "f1 alone is scored"
    assert module.evaluator.rows == first
    assert module.evaluator.results()["before"]["answerability_auroc"] == pytest.approx(first_auroc(first))


def first_auroc(rows: list[dict]) -> float:
    """f0's AUROC from paired rows: P(likelihood of an unanswerable item > an answerable one's)."""
    u = [r["before"]["refusal_likelihood"] for r in rows if not r["answerable"]]
    a = [r["before"]["refusal_likelihood"] for r in rows if r["answerable"]]
    return sum((x > y) + 0.5 * (x == y) for x in u for y in a) / (len(u) * len(a))


def test_before_predictions_with_likelihoods_on_some_rows_only_is_an_error(tmp_path):
    from datamodules.records import RecordError
    from lightning_modules.evaluation import read_before

    path = tmp_path / "f0.jsonl"
    path.write_text('{"id": "a", "response": "x", "refusal_likelihood": -1.0}\n'
                    '{"id": "b", "response": "y"}\n')
    with pytest.raises(RecordError, match=r"f0.jsonl: field 'refusal_likelihood': record 'b'"):
        read_before(path)
    path.write_text('{"id": "a", "before": {"response": 3}, "after": {"response": "x"}}\n')
    with pytest.raises(RecordError, match=r"field 'before.response': record 'a'"):
        read_before(path)


def test_generation_order_cuts_the_padding_of_frame_sized_video_tokens(checkpoint, tmp_path):
    """Qwen2-VL sizes a clip's video tokens by its frames (here 2 tokens for 32 px frames, 8 for 64 px): in
    the file's order, where small and large clips alternate, every batch of two pads its small-clip prompt;
    in `generation_order` the large clips come first, each clip's questions together, and only the
    questions' lengths pad.
    Counted in padded prompt positions over the batches of the generation collator; the batches hold the
    same items, each once."""
    from transformers import AutoProcessor

    from datamodules.loading import generation_order
    from datamodules.shapes.world import write_clip
    from datamodules.video import read_clip

    processor = AutoProcessor.from_pretrained(checkpoint("qwen2_vl"))
    collator = ChatCollator(processor, "generate")
    scenes = [sample_scene(random.Random(seed)) for seed in range(4)]
    for index, scene in enumerate(scenes):
        frames = scene.render()[[0, 5, 10, 15]]
        write_clip(frames if index % 2 else frames[:, ::2, ::2], tmp_path / f"{index}.mp4")
    questions = ["what colour is the circle?", "is the small star touching the big square moving left?"]
    examples = [Example(QARecord(f"{clip}-{q}", f"{clip}.mp4", questions[q], "x", True),
                        str(tmp_path / f"{clip}.mp4")) for clip in range(4) for q in range(2)]
    tokens = [len(ids) for ids in processor.tokenizer([e.record.question for e in examples])["input_ids"]]

    def padded_positions(order: list[int]) -> int:
        padded = 0
        for start in range(0, len(order), 2):
            chosen = [examples[i] for i in order[start : start + 2]]
            batch = collator([(e, read_clip(e.video_path, 4)) for e in chosen])
            padded += int((batch["attention_mask"] == 0).sum())
        return padded

    file_order = [0, 2, 1, 3, 4, 6, 5, 7]  # clips small, large, small, large: each batch mixes the two sizes
    order = generation_order(examples)
    assert sorted(order) == list(range(len(examples)))
    assert [examples[i].video_path[-5] for i in order[:4]] == ["1", "1", "3", "3"], "large clips first"
    question_gap = abs(tokens[1] - tokens[0])
    assert padded_positions(order) == 4 * question_gap  # one short question a batch
    assert padded_positions(file_order) == 4 * 6  # 8 - 2 video tokens a batch (same questions in a batch)
