"""The README's real-data commands, run as the README writes them.

The blocks are the fenced bash blocks right after `<!-- readme-test: real-data -->` in README.md. They run in
a scratch folder laid out as the README's Data section says: `downloads/` holds the UVQA fixtures and a small
Video-ChatGPT file in the released formats, `data/videos/` a tiny clip for every video they name, and
`configs/` is the repository's. Only two things change: `python` is this interpreter, and every `python
main.py` command gets the overrides below appended (a CPU, float32, two steps, the tiny model), so the
README's own words are what runs: import, `assemble`, SFT `fit`, `predict`, `assemble --rejected-from`, DPO
`fit` and `test`. After each block the files its commands name as outputs must exist.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures"
MARK = "<!-- readme-test: real-data -->"
FRAMES = 2

# Appended to every `python main.py` command: the tiny model instead of a 7B, on a CPU, for two steps.
OVERRIDES = (
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.precision=32-true",
    "--trainer.logger=false",
    "--trainer.max_steps=2",
    "--trainer.accumulate_grad_batches=1",
    "--trainer.val_check_interval=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--model.init_args.model.torch_dtype=float32",
    f"--model.init_args.model.num_frames={FRAMES}",
    f"--data.init_args.num_frames={FRAMES}",
    "--data.init_args.num_workers=0",
    "--model.init_args.max_new_tokens=4",
)


def readme_blocks(text: str) -> list[str]:
    """The bash blocks marked as real-data commands, in README order."""
    return re.findall(re.escape(MARK) + r"\s*```bash\n(.*?)```", text, flags=re.S)


def commands(block: str) -> list[list[str]]:
    """The block's commands as words (continuations joined, comments dropped), shell syntax aside."""
    joined = block.replace("\\\n", " ")
    lines = [line.split(" #")[0] for line in joined.splitlines() if not line.lstrip().startswith("#")]
    return [shlex.split(line) for line in lines if line.strip()]


def outputs(block: str, work: Path) -> list[Path]:
    """The files the block's commands say they write: `--out` (a folder for `assemble`), `predict`'s
    predictions, `fit`'s exported model and `test`'s scores, in the run folder its config or options name."""
    found = []
    for words in commands(block):
        options = dict(zip(words, [*words[1:], ""], strict=True))
        out = options.get("--out", "")
        if out and "$" not in out:
            found.append(work / out / "train.jsonl" if "assemble" in words else work / out)
        if words[:2] == ["python", "main.py"]:
            config = yaml.safe_load((work / options["-c"]).read_text())
            run = options.get("--model.init_args.output_dir") or config["trainer"]["default_root_dir"]
            product = {"fit": "hf_model", "predict": "predictions.jsonl", "test": "metrics.json"}[words[2]]
            found.append(work / run / product)
    return found


def test_the_readme_marks_the_real_data_commands():
    """What the slow test runs is there, from import through DPO and `test`, and every line is a `python`
    command or shell syntax (a loop, a variable)."""
    blocks = readme_blocks((REPO / "README.md").read_text())
    text = "\n".join(blocks)
    for command in ("import-uvqa-negatives", "import-uvqa ", "import-videochatgpt", "assemble",
                    "--rejected-from", "main.py fit -c configs/llava_next_video_7b/sft.yaml",
                    "main.py predict", "main.py fit -c configs/llava_next_video_7b/dpo.yaml", "main.py test"):
        assert command in text, command
    for block in blocks:
        for words in commands(block):
            assert words[0] in ("python", "for", "done") or re.match(r"\w+=", words[0]), words


def write_tiny_clips(work: Path) -> int:
    """A tiny clip under data/videos/ for every video the fixtures name, by the importers' naming rules."""
    from datamodules.shapes.world import write_clip
    from datamodules.sources.uvqa import read_uvqa
    from datamodules.sources.videochatgpt import import_videochatgpt

    videos = {r.video for r in import_videochatgpt(work / "downloads" / "VideoInstruct_Dataset.json")[0]}
    for path in (work / "downloads" / "UVQA" / "dataset" / "uvqa").glob("*/*.json"):
        if "_neg" not in path.name:
            videos |= {r.video for r in read_uvqa(path, path.parent.name).records}
    rng = np.random.default_rng(0)
    for video in sorted(videos):
        write_clip(rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8), work / "data" / "videos" / video)
    return len(videos)


@pytest.mark.slow
def test_the_readme_real_data_commands_run(tmp_path, tiny_base, main_env):
    work = tmp_path / "work"
    release = work / "downloads" / "UVQA" / "dataset" / "uvqa"
    shutil.copytree(FIXTURES / "uvqa_train", release)
    for small in release.glob("*/small_eval_*.json"):  # named apart from the released files in the repo
        small.rename(small.with_name(small.name.removeprefix("small_")))
    shutil.copy(FIXTURES / "videochatgpt" / "VideoInstruct_small.json",
                work / "downloads" / "VideoInstruct_Dataset.json")
    (work / "configs").symlink_to(REPO / "configs")
    assert write_tiny_clips(work) == 25
    overrides = [*OVERRIDES, f"--model.init_args.model.name_or_path={tiny_base}"]
    prelude = "\n".join([
        "set -euo pipefail -x",
        f"OVERRIDES=({' '.join(shlex.quote(o) for o in overrides)})",
        'python() { if [ "${1:-}" = main.py ]; then shift; "$PYTHON" "$REPO/main.py" "$@" "${OVERRIDES[@]}"; '
        'else "$PYTHON" "$@"; fi; }',
    ])
    env = dict(main_env, PYTHON=sys.executable, REPO=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    blocks = readme_blocks((REPO / "README.md").read_text())
    assert len(blocks) == 3
    for number, block in enumerate(blocks, start=1):
        done = subprocess.run(["bash", "-c", prelude + "\n" + block], cwd=work, env=env, capture_output=True,
                              text=True, timeout=1800)
        assert done.returncode == 0, f"README block {number} failed:\n{(done.stdout + done.stderr)[-6000:]}"
        for path in outputs(block, work):
            assert path.exists(), f"README block {number} did not write {path}"

    data = work / "data" / "uvqa"
    for split in ("train", "val"):  # DPO's pairs: every record has its rejected response
        rows = [json.loads(line) for line in (data / f"{split}.jsonl").read_text().splitlines()]
        assert rows and all(row["rejected"] is not None for row in rows)
    scores = json.loads((work / "outputs" / "llava_next_video_7b" / "dpo" / "metrics.json").read_text())
    assert set(scores) == {"before", "after", "alignment"}
    assert os.path.isdir(work / "outputs" / "llava_next_video_7b" / "sft" / "hf_model")
