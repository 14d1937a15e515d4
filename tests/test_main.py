"""`main.py`, the LightningCLI: every shipped config parses, `predict` and `test` write their files, `test`'s
numbers agree with its predictions recomputed by hand, 2-process DDP `fit` (and its mid-epoch resume) and
`test` on CPU, and user errors as one line. The tiny runs' fixtures are in tests/conftest.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from datamodules.answerability import read_predictions
from datamodules.records import read_records
from metrics.report import PAIRED_SCORE_KEYS, metrics_from_predictions, to_plain

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml"))
TRAINER_CONFIGS = [c for c in CONFIGS if c.startswith("configs/trainer/")]
# A trainer config is a second `-c`: parsed on top of the demo and of a real-checkpoint config.
TRAINER_BASES = ["configs/shapes/sft.yaml", "configs/qwen2_5_vl_7b/dpo.yaml"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: tiny tensors gain nothing from more, and a busy 2-core machine loses a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def print_config(run_main, capsys, *configs: str) -> dict:
    """`main.py fit -c CONFIG ... --print_config`: the parsed, interpolated config as a dict."""
    args = ["fit"]
    for config in configs:
        args += ["-c", str(REPO / config)]
    with pytest.raises(SystemExit) as exit_:
        run_main(args + ["--print_config"])
    out = capsys.readouterr().out
    assert exit_.value.code in (0, None), out
    return yaml.safe_load(out)


# ------------------------------------------------------------------------------------------- configs
def test_every_kind_of_config_is_shipped():
    names = set(CONFIGS)
    for folder in ("llava_next_video_7b", "video_llava_7b", "qwen2_5_vl_7b", "shapes"):
        for objective in ("sft", "dpo"):
            assert f"configs/{folder}/{objective}.yaml" in names
    assert {f"configs/trainer/{n}.yaml" for n in ("ddp", "fsdp", "deepspeed")} <= names


@pytest.mark.parametrize("config", [c for c in CONFIGS if c not in TRAINER_CONFIGS])
def test_shipped_config_parses(config, run_main, capsys):
    parsed = print_config(run_main, capsys, config)
    model, data = parsed["model"]["init_args"], parsed["data"]["init_args"]
    assert parsed["model"]["class_path"].startswith(("lightning_modules.", "datamodules."))
    if parsed["model"]["class_path"] != "lightning_modules.alignment.AlignmentModule":
        return  # the vision-tower pretraining stage
    assert model["objective"] == data["objective"]
    assert model["model"]["num_frames"] == data["num_frames"], "the interpolation ${...} resolved"
    if "_7b/" in config:
        raw = yaml.safe_load((REPO / config).read_text())
        assert raw["trainer"]["precision"] == parsed["trainer"]["precision"] == "bf16-mixed"
        assert parsed["trainer"]["accelerator"] == "gpu" and data["num_frames"] == 8
        assert model["model"]["lora"]["r"] > 0 and model["model"]["torch_dtype"] == "bfloat16"
        assert model["model"]["name_or_path"] in {"llava-hf/LLaVA-NeXT-Video-7B-hf",
                                                  "LanguageBind/Video-LLaVA-7B-hf",
                                                  "Qwen/Qwen2.5-VL-7B-Instruct"}
        if model["objective"] == "dpo":
            assert model["beta"] == 0.1 and model["loss_type"] == "sigmoid"
        assert raw["data"]["init_args"]["data_dir"] == "data/uvqa"
        # A checkpoint (written at each validation) between optimizer steps: accumulated gradients are not
        # saved, so one mid-window would lose them on resume.
        trainer = parsed["trainer"]
        assert trainer["val_check_interval"] % trainer["accumulate_grad_batches"] == 0


@pytest.mark.parametrize("base", TRAINER_BASES)
@pytest.mark.parametrize("config", TRAINER_CONFIGS)
def test_trainer_config_parses_as_a_second_config(config, base, run_main, capsys):
    strategy = print_config(run_main, capsys, base, config)["trainer"]["strategy"]
    expected = yaml.safe_load((REPO / config).read_text())["trainer"]["strategy"]
    if isinstance(expected, str):
        assert strategy == expected  # deepspeed: not installed here, so only its name is checked
    else:
        assert strategy["class_path"] == expected["class_path"]
        for key, value in expected["init_args"].items():  # auto_wrap_policy is a set: compare sorted
            parsed = strategy["init_args"][key]
            assert (sorted(parsed) if isinstance(value, list) else parsed) == (
                sorted(value) if isinstance(value, list) else value), key


# ------------------------------------------------------------------------------------ predict / test
def test_predict_writes_a_response_for_every_record(tmp_path, lora_dpo_run, cli_args, run_main,
                                                    synthetic_data):
    """With an explicit --ckpt_path the command line still sets the module (here its output_dir)."""
    out = tmp_path / "predict"
    run_main(cli_args("predict", lora_dpo_run.out, objective="dpo", base=lora_dpo_run.base, lora=True,
                      extra=[f"--model.init_args.output_dir={out}", "--data.init_args.predict_file=val.jsonl",
                             f"--ckpt_path={lora_dpo_run.out / 'checkpoints' / 'last.ckpt'}"]))
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    records, _ = read_records(synthetic_data / "val.jsonl", synthetic_data)
    assert sorted(row["id"] for row in rows) == sorted(r.id for r in records)
    assert all(set(row) == {"id", "response"} and isinstance(row["response"], str) for row in rows)
    assert len(read_predictions(out / "predictions.jsonl")) == len(records)


def test_predictions_become_dpo_rejected_responses(tmp_path, lora_dpo_run, cli_args, run_main,
                                                    synthetic_data):
    """The paper's on-policy negatives: `predict` on the unanswerable training questions, then a DPO `fit`
    whose rejected responses are those predictions, joined on id."""
    predictions = tmp_path / "f0_train"
    run_main(cli_args("predict", tmp_path / "unused", base=lora_dpo_run.base,
                      extra=[f"--model.init_args.output_dir={predictions}",
                             "--data.init_args.predict_file=train.jsonl",
                             "--data.init_args.predict_answerable=false",
                             "--data.init_args.eval_batch_size=16"]))
    records, _ = read_records(synthetic_data / "train.jsonl", synthetic_data)
    responses = read_predictions(predictions / "predictions.jsonl")
    assert set(responses) == {r.id for r in records if not r.answerable}

    rejected = predictions / "predictions.jsonl"
    cli = run_main(cli_args("fit", tmp_path / "dpo", objective="dpo", base=lora_dpo_run.base, lora=True,
                            steps=1, extra=[f"--data.init_args.rejected_predictions={rejected}",
                                            "--trainer.limit_val_batches=0"]))
    examples = cli.datamodule.datasets["train"].examples
    for example in examples:
        if not example.record.answerable:
            assert example.rejected == responses[example.record.id]
    assert cli.trainer.global_step == 1


def md_table(text: str) -> dict[str, list[str]]:
    """score -> the cells after `better` of each row of report.md's tables."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0] not in ("score", "") and not cells[0].startswith("---"):
            rows[cells[0]] = cells[2:]
    return rows


def fmt(value) -> str:
    return "NaN" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def check_report_against_predictions(out: Path) -> dict:
    """metrics.json and report.md hold the scores recomputed by hand from predictions.jsonl."""
    for name in ("predictions.jsonl", "metrics.json", "report.md", "report.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by_hand = metrics_from_predictions(out / "predictions.jsonl")
    written = json.loads((out / "metrics.json").read_text())
    assert written.keys() == by_hand.keys() == {"f0", "f1", "paired"}
    expected = to_plain(by_hand)
    for group in expected:
        assert written[group].keys() == expected[group].keys(), group
        for key, value in expected[group].items():
            assert written[group][key] == pytest.approx(value, abs=1e-6), f"{group}/{key}"

    table = md_table((out / "report.md").read_text())
    for key in by_hand["f1"]:
        assert table[key] == [fmt(by_hand["f0"].get(key)), fmt(by_hand["f1"][key])], key
    for key in PAIRED_SCORE_KEYS:
        denominator = int(by_hand["paired"][f"{key}/denominator"])
        assert table[key] == [fmt(by_hand["paired"][key]), str(denominator)], key
    return by_hand


def test_test_on_a_lora_checkpoint_scores_f0_and_f1(tmp_path, lora_dpo_run, cli_args, run_main,
                                                    synthetic_data):
    """One `test` run on the LoRA checkpoint scores the adapted model (f1) and, adapters disabled, f0."""
    out = tmp_path / "test"
    cli = run_main(cli_args("test", lora_dpo_run.out, objective="dpo", base=lora_dpo_run.base, lora=True,
                            extra=[f"--model.init_args.output_dir={out}",
                                   f"--ckpt_path={lora_dpo_run.out / 'checkpoints' / 'last.ckpt'}"]))
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    records, _ = read_records(synthetic_data / "test.jsonl", synthetic_data)
    assert sorted(row["id"] for row in rows) == sorted(r.id for r in records)
    for row in rows:
        assert {"id", "category", "answerable", "question", "gold", "missing_element", "f0", "f1"} <= set(row)
        for model in ("f0", "f1"):
            assert set(row[model]) == {"response", "refused", "correct", "reason_ok", "refusal_likelihood"}
            assert isinstance(row[model]["refusal_likelihood"], float)
    assert any(row["f0"]["refusal_likelihood"] != row["f1"]["refusal_likelihood"] for row in rows), \
        "f0 is the model with its adapters disabled, not the adapted one"
    meta = {r.id: r.meta for r in records}
    assert all((row["form"], row["objects"]) == (meta[row["id"]]["form"], meta[row["id"]]["objects"])
               for row in rows)

    by_hand = check_report_against_predictions(out)
    assert "answerability_auroc" in by_hand["f0"] and "answerability_auroc" in by_hand["f1"]
    assert "## Answerable accuracy by question form\n\n| form | clip | items | f0 | f1 |" in (
        out / "report.md").read_text()
    logged = cli.trainer.callback_metrics
    assert float(logged["test/f1/answerable_accuracy"]) == pytest.approx(by_hand["f1"]["answerable_accuracy"])


def test_test_with_f0_from_a_predictions_file(tmp_path, lora_dpo_run, cli_args, run_main, synthetic_data):
    """f0 given as a predictions file (joined on id), written to give every paired score a denominator: the
    report's numbers are the hand-computed ones."""
    records, _ = read_records(synthetic_data / "test.jsonl", synthetic_data)
    answerable = [r for r in records if r.answerable]
    unanswerable = [r for r in records if not r.answerable]
    assert len(answerable) >= 3 and len(unanswerable) >= 2
    refusal = "The question is unanswerable because there is no {} in the video."
    f0 = {answerable[0].id: answerable[0].answer, answerable[1].id: answerable[1].answer,
          answerable[2].id: refusal.format("triangle"), unanswerable[0].id: refusal.format(
              unanswerable[0].missing_element), unanswerable[1].id: "large"}
    f0.update({r.id: "banana" for r in records if r.id not in f0})
    f0_file = tmp_path / "f0.jsonl"
    f0_file.write_text("".join(json.dumps({"id": i, "response": r}) + "\n" for i, r in f0.items()))

    out = tmp_path / "test"
    run_main(cli_args("test", lora_dpo_run.out, objective="dpo", base=lora_dpo_run.base, lora=True,
                      extra=[f"--model.init_args.output_dir={out}",
                             f"--model.init_args.f0_predictions={f0_file}",
                             f"--ckpt_path={lora_dpo_run.out / 'checkpoints' / 'last.ckpt'}"]))
    by_hand = check_report_against_predictions(out)
    n_a, n_u = len(answerable), len(unanswerable)
    assert by_hand["f0"]["answerable_accuracy"] == pytest.approx(2 / n_a)
    assert by_hand["f0"]["over_refusal_rate"] == pytest.approx(1 / n_a)
    assert by_hand["f0"]["unanswerable_accuracy"] == pytest.approx(1 / n_u)
    assert by_hand["f0"]["reason_accuracy"] == pytest.approx(1 / n_u)
    paired = by_hand["paired"]
    assert (paired["excessive_refusal/denominator"], paired["permissiveness/denominator"],
            paired["discretion/denominator"]) == (2, 1, n_u - 1)
    assert "answerability_auroc" not in by_hand["f0"], "no refusal likelihood for f0 from a file"


# ---------------------------------------------------------------------------------------- processes
def run_main_py(args: list[str], env: dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_ddp_fit_on_two_cpu_processes(tmp_path, cli_args, main_env):
    """`-c configs/trainer/ddp.yaml` on 2 CPU processes (gloo): full fine-tuning SFT, batch 4 split 2 + 2."""
    args = ["fit", "-c", str(REPO / "configs/trainer/ddp.yaml"), *cli_args(None, tmp_path, steps=2),
            "--trainer.devices=2", "--trainer.val_check_interval=2"]
    done = run_main_py(args, main_env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "MEMBER: 2/2" in output, "two processes"
    assert "Trainer.fit` stopped: `max_steps=2` reached" in output
    assert output.count("exported the model to") == 1, "rank 0 exports"
    assert (tmp_path / "hf_model" / "model.safetensors").is_file()
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2 and all(k.startswith("llm.") for k in checkpoint["state_dict"])


@pytest.mark.slow  # about 2 minutes on a busy 2-core machine
def test_ddp_dpo_reference_pass_covers_every_pair_once(tmp_path, cli_args, main_env, synthetic_data):
    """LoRA DPO on 2 CPU processes: before training each rank computes the reference log-probabilities of its
    share of the pairs; rank 0 writes all of them, train and val, into one cache file."""
    args = ["fit", "-c", str(REPO / "configs/trainer/ddp.yaml"),
            *cli_args(None, tmp_path, objective="dpo", lora=True, steps=2), "--trainer.devices=2"]
    done = run_main_py(args, main_env, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    files = list((tmp_path / "reference_logps").glob("*.json"))
    assert len(files) == 1
    cached = json.loads(files[0].read_text())["pairs"]
    expected = {r.id for split in ("train", "val") for r in read_records(synthetic_data / f"{split}.jsonl")[0]
                if r.rejected is not None and r.rejected.strip() != r.answer.strip()}
    assert set(cached) == expected
    assert all(math.isfinite(c) and math.isfinite(r) and c < 0 and r < 0 for _, c, r in cached.values())


def test_ddp_mid_epoch_resume_matches_an_uninterrupted_run(tmp_path, cli_args, main_env):
    """2 CPU processes, one epoch of 4 steps validated and checkpointed every 2: a run killed before step 3
    and resumed with `--ckpt_path last` trains steps 3-4 on each rank's batches 3-4 (not 1-2 again) and
    exports the uninterrupted run's weights."""
    from safetensors.torch import load_file

    env = dict(main_env, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), main_env["PYTHONPATH"]]))

    def fit(out: Path, *callbacks: dict, resume: bool = False) -> subprocess.CompletedProcess:
        recorder = {"class_path": "probes.SeenBatches", "init_args": {"path": str(out / "seen")}}
        args = ["fit", "-c", str(REPO / "configs/trainer/ddp.yaml"), *cli_args(None, out, steps=-1),
                "--trainer.devices=2", "--trainer.max_epochs=1", "--trainer.limit_train_batches=4",
                "--trainer.val_check_interval=2", "--model.init_args.lr=0.01",
                "--model.init_args.warmup_steps=1",
                f"--trainer.callbacks={json.dumps([*callbacks, recorder])}"]
        return run_main_py(args + (["--ckpt_path=last"] if resume else []), env, timeout=300)

    def seen(out: Path) -> list[tuple[int, int, list[str]]]:
        rows = [json.loads(line) for rank in (0, 1) for line in (out / f"seen.rank{rank}.jsonl").open()]
        return [(row["rank"], row["step"], row["ids"]) for row in rows]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done = fit(straight)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    crashed = fit(resumed, {"class_path": "probes.CrashAt", "init_args": {"step": 2}})
    assert crashed.returncode != 0 and "killed before step 2" in crashed.stderr, crashed.stderr[-3000:]
    checkpoint = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2, "a checkpoint at the mid-epoch validation"
    done = fit(resumed, resume=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]

    expected = seen(straight)
    assert [row[:2] for row in expected] == [(rank, step) for rank in (0, 1) for step in range(4)]
    assert expected[0][2] != expected[4][2], "the ranks split each batch"
    assert seen(resumed) == expected, "steps 1-2 before the crash, then 3-4 on the straight run's batches"
    final, reference = (load_file(out / "hf_model" / "model.safetensors") for out in (resumed, straight))
    assert final.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(final[name], reference[name], msg=name)


def test_a_bad_pair_is_one_line_from_the_command_line(tmp_path, cli_args, main_env, synthetic_data):
    """A DPO record without a rejected response: exit status 2 and one message naming file, field and record,
    no traceback."""
    rows = [json.loads(line) for line in (synthetic_data / "train.jsonl").read_text().splitlines()]
    rows[5]["rejected"] = None
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = cli_args("fit", tmp_path / "run", objective="dpo", extra=[
        f"--data.init_args.data_dir={tmp_path}", f"--data.init_args.video_root={synthetic_data}",
        f"--data.init_args.val_file={synthetic_data / 'val.jsonl'}",
        f"--data.init_args.test_file={synthetic_data / 'test.jsonl'}"])
    done = run_main_py(args, main_env)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: {re.escape(str(train))}: field 'rejected': record '{rows[5]['id']}' has no "
                        r"rejected response for DPO .*", last), last


def test_ddp_test_on_two_cpu_processes_scores_every_item_once(tmp_path, lora_dpo_run, cli_args, run_main,
                                                               main_env, synthetic_data):
    """`test` on 2 CPU processes (gloo) over 5 records, which 2 ranks cannot split evenly: every record is
    scored once (a padding sampler would score one twice), and the scores equal a 1-process run's."""
    lines = (synthetic_data / "test.jsonl").read_text().splitlines()
    lines = sorted(lines, key=lambda line: json.loads(line)["answerable"])[:5]  # unanswerable first
    assert not json.loads(lines[0])["answerable"], "a padding sampler repeats the first record"
    test_file = tmp_path / "five.jsonl"
    test_file.write_text("\n".join(lines) + "\n")
    ids = sorted(json.loads(line)["id"] for line in lines)

    def args(out: Path) -> list[str]:
        return cli_args("test", out, objective="dpo", base=lora_dpo_run.base, lora=True,
                        extra=[f"--model.init_args.output_dir={out}",
                               f"--data.init_args.test_file={test_file}",
                               f"--data.init_args.video_root={synthetic_data}",
                               "--data.init_args.eval_batch_size=4",
                               f"--ckpt_path={lora_dpo_run.out / 'checkpoints' / 'last.ckpt'}"])

    run_main(args(tmp_path / "one"))
    done = run_main_py([*args(tmp_path / "two"), "-c", str(REPO / "configs/trainer/ddp.yaml"),
                        "--trainer.devices=2"], main_env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "MEMBER: 2/2" in output, "two processes"
    rows = [json.loads(line) for line in (tmp_path / "two" / "predictions.jsonl").read_text().splitlines()]
    assert sorted(row["id"] for row in rows) == ids
    one, two = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("one", "two"))
    assert set(one) == set(two) == {"f0", "f1", "paired"}
    for group in one:
        assert two[group] == pytest.approx(one[group], abs=1e-6), group
    unanswerable_not_refused_by_f0 = sum(not row["answerable"] and not row["f0"]["refused"] for row in rows)
    assert one["paired"]["discretion/denominator"] == unanswerable_not_refused_by_f0
