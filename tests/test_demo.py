"""A reduced run of the demo chain (`make demo`): the same commands with small sizes and few steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path) -> None:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, (
        f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )


@pytest.mark.slow
def test_reduced_demo_chain(tmp_path):
    out = tmp_path / "o"
    data = out / "data"
    common = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    tiny = ["--data.init_args.data_dir", str(data)]

    def logged(folder: Path) -> list[str]:  # the config's offline W&B logger, in the run's folder
        return ["--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(folder)]

    _run("-m", "datamodules", "synth", "--out", str(data), "--num-videos", "120", "--seed", "0", cwd=ROOT)
    _run(
        "main.py",
        "fit",
        "-c",
        "configs/shapes/vision.yaml",
        *common,
        "--trainer.max_epochs",
        "2",
        "--data.init_args.data_dir",
        str(data),
        "--model.init_args.output_dir",
        str(out / "tower"),
        cwd=ROOT,
    )
    _run("-m", "lightning_modules.tiny", "--out", str(out / "tiny"), "--vision-tower", str(out / "tower"),
         cwd=ROOT)
    base = out / "base"
    _run(
        "main.py",
        "fit",
        "-c",
        "configs/shapes/base.yaml",
        *common,
        *tiny,
        "--trainer.max_epochs",
        "3",
        "--trainer.default_root_dir",
        str(base),
        "--model.init_args.model.name_or_path",
        str(out / "tiny"),
        cwd=ROOT,
    )
    assert (base / "hf_model" / "model.safetensors").exists()
    sft = out / "sft"
    _run(
        "main.py",
        "fit",
        "-c",
        "configs/shapes/sft.yaml",
        *common,
        *tiny,
        "--trainer.max_epochs",
        "3",
        "--trainer.default_root_dir",
        str(sft),
        "--model.init_args.model.name_or_path",
        str(base / "hf_model"),
        cwd=ROOT,
    )
    _run(
        "main.py",
        "test",
        "-c",
        "configs/shapes/sft.yaml",
        *logged(sft),
        *tiny,
        "--trainer.default_root_dir",
        str(sft),
        "--model.init_args.model.name_or_path",
        str(base / "hf_model"),
        "--ckpt_path",
        str(sft / "checkpoints" / "last.ckpt"),
        cwd=ROOT,
    )
    # DPO: f0 answers the unanswerable training questions, its answers are the rejected responses.
    predictions = base / "train_predictions"
    _run(
        "main.py",
        "predict",
        "-c",
        "configs/shapes/base.yaml",
        *common,
        *tiny,
        "--model.init_args.model.name_or_path",
        str(base / "hf_model"),
        "--data.init_args.predict_file",
        "train.jsonl",
        "--data.init_args.predict_answerable",
        "false",
        "--model.init_args.output_dir",
        str(predictions),
        cwd=ROOT,
    )
    dpo = out / "dpo"
    dpo_settings = [
        *logged(dpo),
        *tiny,
        "--trainer.default_root_dir",
        str(dpo),
        "--model.init_args.model.name_or_path",
        str(base / "hf_model"),
        "--data.init_args.rejected_predictions",
        str(predictions / "predictions.jsonl"),
    ]
    _run("main.py", "fit", "-c", "configs/shapes/dpo.yaml", *dpo_settings, "--trainer.max_epochs", "3",
         cwd=ROOT)
    _run("main.py", "test", "-c", "configs/shapes/dpo.yaml", *dpo_settings,
         "--ckpt_path", str(dpo / "checkpoints" / "last.ckpt"), cwd=ROOT)
    _run("-m", "metrics.combine", "--out", str(out / "demo"), "--run", f"sft={sft}", "--run", f"dpo={dpo}",
         cwd=ROOT)
    report = json.loads((out / "demo" / "report.json").read_text())
    assert report["sft"]["unanswerable_accuracy"] > report["before"]["unanswerable_accuracy"]
    # The paper's finding, in small: DPO also teaches the base to refuse unanswerable questions.
    assert report["dpo"]["unanswerable_accuracy"] > report["before"]["unanswerable_accuracy"]
    for name in ("predictions.jsonl", "metrics.json", "report.md", "report.png"):
        assert (sft / name).exists() and (dpo / name).exists()

    # The W&B dashboard reads only keys that these runs logged (DPO's fit; both tests).
    sys.path.insert(0, str(ROOT / "tests" / "metrics"))
    from wandb_records import read_run

    from metrics.dashboard import build_workspace, panel_keys

    runs = [read_run(f) for f in sorted(out.rglob("offline-run-*/run-*.wandb"))]
    assert len(runs) == 3, "DPO's fit and the two tests"
    keys = set().union(*(set(r.history) | set(r.summary) for r in runs))
    panels = panel_keys(build_workspace("entity", "project"))
    assert {title: k for _, title, k in panels if set(k) - keys} == {}
