"""`main.py`, the LightningCLI: every shipped config parses, `predict` and `test` write their files, `test`'s
numbers agree with its predictions recomputed by hand, 2-process DDP `fit` (and its mid-epoch resume) and
`test` on CPU, and user errors as one line. The tiny runs' fixtures are in tests/conftest.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

# Lightning adds a stderr log handler at its first import: imported here, at collection, the handler binds the
# real stderr, not one test's captured stream that a later test finds closed ("--- Logging error ---").
import lightning  # noqa: F401
import pytest
import torch
import yaml

from datamodules.records import read_predictions, read_records
from metrics.names import ALIGNMENT_SCORE_KEYS
from metrics.runs import metrics_from_predictions, to_plain

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
        assert parsed["trainer"]["accelerator"] == "gpu"
        assert data["num_frames"] == (32 if "llava_next_video" in config else 8), "the model cards' frames"
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
    predictions = tmp_path / "base_train"
    run_main(cli_args("predict", tmp_path / "unused", base=lora_dpo_run.base,
                      extra=[f"--model.init_args.output_dir={predictions}",
                             "--data.init_args.predict_file=train.jsonl",
                             "--data.init_args.predict_answerable=false",
                             "--data.init_args.eval_batch_size=16"]))
    records, _ = read_records(synthetic_data / "train.jsonl", synthetic_data)
    rows = read_predictions(predictions / "predictions.jsonl", ("response",))
    responses = {row["id"]: row["response"] for row in rows}
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
    assert list(written) == list(by_hand) == ["before", "after", "alignment"]
    expected = to_plain(by_hand)
    for group in expected:
        assert written[group].keys() == expected[group].keys(), group
        for key, value in expected[group].items():
            assert written[group][key] == pytest.approx(value, abs=1e-6), f"{group}/{key}"

    table = md_table((out / "report.md").read_text())
    for key in by_hand["after"]:
        assert table[key] == [fmt(by_hand["before"].get(key)), fmt(by_hand["after"][key])], key
    for key in ALIGNMENT_SCORE_KEYS:
        denominator = int(by_hand["alignment"][f"{key}/denominator"])
        assert table[key] == [fmt(by_hand["alignment"][key]), str(denominator)], key
    return by_hand


def test_test_on_a_lora_checkpoint_scores_before_and_after(tmp_path, lora_dpo_run, cli_args, run_main,
                                                          synthetic_data):
    """One `test` run on the LoRA checkpoint scores the adapted model (after; the paper's f1) and, adapters
    disabled, the model before alignment (before; f0)."""
    out = tmp_path / "test"
    cli = run_main(cli_args("test", lora_dpo_run.out, objective="dpo", base=lora_dpo_run.base, lora=True,
                            extra=[f"--model.init_args.output_dir={out}",
                                   f"--ckpt_path={lora_dpo_run.out / 'checkpoints' / 'last.ckpt'}"]))
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    records, _ = read_records(synthetic_data / "test.jsonl", synthetic_data)
    assert sorted(row["id"] for row in rows) == sorted(r.id for r in records)
    for row in rows:
        item_fields = {"id", "category", "answerable", "question", "gold", "missing_element"}
        assert item_fields | {"before", "after"} <= set(row)
        for model in ("before", "after"):
            assert set(row[model]) == {"response", "refused", "correct", "reason_ok", "refusal_likelihood"}
            assert isinstance(row[model]["refusal_likelihood"], float)
    assert any(row["before"]["refusal_likelihood"] != row["after"]["refusal_likelihood"] for row in rows), \
        "before is the model with its adapters disabled, not the adapted one"
    meta = {r.id: r.meta for r in records}
    assert all((row["form"], row["objects"]) == (meta[row["id"]]["form"], meta[row["id"]]["objects"])
               for row in rows)

    by_hand = check_report_against_predictions(out)
    assert "answerability_auroc" in by_hand["before"] and "answerability_auroc" in by_hand["after"]
    assert "## Answerable accuracy by question form\n\n| form | clip | items | before | after |" in (
        out / "report.md").read_text()
    logged = cli.trainer.callback_metrics
    for model in ("before", "after"):
        value = by_hand[model]["answerable_accuracy"]
        assert float(logged[f"test/{model}/answerable_accuracy"]) == pytest.approx(value), model
    denominator = by_hand["alignment"]["discretion/denominator"]
    assert float(logged["test/alignment/discretion/denominator"]) == denominator


def test_test_with_before_from_a_predictions_file(tmp_path, lora_dpo_run, cli_args, run_main,
                                                  synthetic_data):
    """The model before alignment given as a predictions file (joined on id), written to give every alignment
    score a denominator: the report's numbers are the hand-computed ones."""
    records, _ = read_records(synthetic_data / "test.jsonl", synthetic_data)
    answerable = [r for r in records if r.answerable]
    unanswerable = [r for r in records if not r.answerable]
    assert len(answerable) >= 3 and len(unanswerable) >= 2
    refusal = "The question is unanswerable because there is no {} in the video."
    before = {answerable[0].id: answerable[0].answer, answerable[1].id: answerable[1].answer,
              answerable[2].id: refusal.format("triangle"), unanswerable[0].id: refusal.format(
                  unanswerable[0].missing_element), unanswerable[1].id: "large"}
    before.update({r.id: "banana" for r in records if r.id not in before})
    before_file = tmp_path / "before.jsonl"
    before_file.write_text("".join(json.dumps({"id": i, "response": r}) + "\n" for i, r in before.items()))

    out = tmp_path / "test"
    run_main(cli_args("test", lora_dpo_run.out, objective="dpo", base=lora_dpo_run.base, lora=True,
                      extra=[f"--model.init_args.output_dir={out}",
                             f"--model.init_args.before_predictions={before_file}",
                             f"--ckpt_path={lora_dpo_run.out / 'checkpoints' / 'last.ckpt'}"]))
    by_hand = check_report_against_predictions(out)
    n_a, n_u = len(answerable), len(unanswerable)
    assert by_hand["before"]["answerable_accuracy"] == pytest.approx(2 / n_a)
    assert by_hand["before"]["over_refusal_rate"] == pytest.approx(1 / n_a)
    assert by_hand["before"]["unanswerable_accuracy"] == pytest.approx(1 / n_u)
    assert by_hand["before"]["reason_accuracy"] == pytest.approx(1 / n_u)
    alignment = by_hand["alignment"]
    assert (alignment["excessive_refusal/denominator"], alignment["permissiveness/denominator"],
            alignment["discretion/denominator"]) == (2, 1, n_u - 1)
    assert "answerability_auroc" not in by_hand["before"], "no refusal likelihood for a model from a file"


# ---------------------------------------------------------------------------------------- processes
def run_main_py(args: list[str], env: dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_ddp_fit_on_two_cpu_processes(tmp_path, cli_args, main_env):
    """`-c configs/trainer/ddp.yaml` on 2 CPU processes (gloo): full fine-tuning SFT with `batch_size` 1 and
    4 batches accumulated, an effective batch of 4 that the world size splits as 1 example a device, 2
    accumulated (a batch smaller than the world size used to stop the run)."""
    env = dict(main_env, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), main_env["PYTHONPATH"]]))
    recorder = {"class_path": "probes.SeenBatches", "init_args": {"path": str(tmp_path / "seen")}}
    args = ["fit", "-c", str(REPO / "configs/trainer/ddp.yaml"), *cli_args(None, tmp_path, steps=2),
            "--trainer.devices=2", "--trainer.val_check_interval=4", "--data.init_args.batch_size=1",
            "--trainer.accumulate_grad_batches=4", f"--trainer.callbacks={json.dumps([recorder])}"]
    done = run_main_py(args, env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "MEMBER: 2/2" in output, "two processes"
    for rank in (0, 1):
        rows = [json.loads(line) for line in (tmp_path / f"seen.rank{rank}.jsonl").open()]
        assert [(row["step"], len(row["ids"])) for row in rows] == [(0, 1), (0, 1), (1, 1), (1, 1)], rank
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
    scored once (a padding sampler would score one twice), the scores equal a 1-process run's, and both runs
    write their rows in the test file's order."""
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
    in_file_order = [json.loads(line)["id"] for line in lines]
    for run in ("one", "two"):  # generation takes its own order and ranks each a share; rows keep the file's
        written = (tmp_path / run / "predictions.jsonl").read_text().splitlines()
        assert [json.loads(line)["id"] for line in written] == in_file_order, run
    one, two = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("one", "two"))
    assert set(one) == set(two) == {"before", "after", "alignment"}
    for group in one:
        assert two[group] == pytest.approx(one[group], abs=1e-6), group
    not_refused_before = sum(not row["answerable"] and not row["before"]["refused"] for row in rows)
    assert one["alignment"]["discretion/denominator"] == not_refused_before


# ------------------------------------------------------------------------------ user errors as one line
def error_line(capsys) -> str:
    """The one `error:` line on stderr, which is the last line, with no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], err[-3000:]
    return lines[-1]


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluating_without_the_checkpoint_is_one_line_and_writes_nothing(subcommand, tmp_path, cli_args,
                                                                          capsys):
    from main import main

    out = tmp_path / "run"
    assert main(cli_args(subcommand, out, extra=["--ckpt_path=last"])) == 2
    folder = out / "checkpoints"
    assert error_line(capsys) == (f"error: --ckpt_path last: no checkpoint in {folder}; {subcommand} would "
                                  "use the untrained model (train it first, or give the checkpoint's path)")
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]
    missing = tmp_path / "no.ckpt"
    assert main(cli_args(subcommand, out, extra=[f"--ckpt_path={missing}"])) == 2
    assert error_line(capsys) == f"error: --ckpt_path {missing}: no such checkpoint file"


def test_a_misspelled_config_key_is_named_on_the_first_line(tmp_path, capsys):
    from main import main

    config = tmp_path / "sft.yaml"
    text = (REPO / "configs/shapes/sft.yaml").read_text()
    config.write_text(text.replace("batch_size: 32", "batchsize: 32"))
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "-c", str(config)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == ("error: data: Option 'batchsize' is not accepted "
                                   "(datamodules.shapes.datamodule.ShapesDataModule)")
    assert "usage:" not in err and len(err.splitlines()) < 20
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(REPO / "configs/shapes/sft.yaml"), "--model.init_args.model.lora.rr=3"])
    assert capsys.readouterr().err.splitlines()[0] == (
        "error: model.model.lora: Option 'rr' is not accepted (lightning_modules.video_llm.LoraSettings)")


def test_a_missing_base_model_folder_is_one_line_naming_the_command_that_makes_it(tmp_path, monkeypatch,
                                                                                  capsys):
    """The demo's SFT stage run before its base stage."""
    from main import main

    monkeypatch.chdir(tmp_path)
    assert main(["fit", "-c", str(REPO / "configs/shapes/sft.yaml"), "--trainer.logger=false"]) == 2
    assert error_line(capsys) == ("error: model.name_or_path: outputs/shapes/base/hf_model does not exist; "
                                  "it is made by `python main.py fit -c configs/shapes/base.yaml`")
    assert not (tmp_path / "outputs" / "shapes" / "data").exists(), "nothing built before the model loads"


def test_user_records_without_a_val_file_are_never_replaced(tmp_path, cli_args, synthetic_data, capsys):
    """The README's real-data steps: a data_dir holding the user's train.jsonl only. The real DataModule names
    the missing file, and so does the synthetic world's without its synthetic option; with it, the builder
    refuses the folder. The file is unchanged."""
    from main import main

    data = tmp_path / "mine"
    data.mkdir()
    train = data / "train.jsonl"
    train.write_bytes((synthetic_data / "train.jsonl").read_bytes())
    before = train.read_bytes()
    base = cli_args("fit", tmp_path / "run", extra=[f"--data.init_args.data_dir={data}",
                                                   f"--data.init_args.video_root={synthetic_data}"])
    assert main(base) == 2
    assert error_line(capsys) == (
        f"error: {data / 'val.jsonl'}: no such record file (data.init_args.val_file; set it to null to go "
        "without it)")
    shapes = [*base, "--data=datamodules.shapes.datamodule.ShapesDataModule"]
    assert main(shapes) == 2
    assert error_line(capsys) == (
        f"error: {data / 'val.jsonl'}: no such record file (data.init_args.val_file; set it to null to go "
        "without it or synthetic: true to build the synthetic world there)")
    assert main([*shapes, "--data.init_args.synthetic=true"]) == 2
    assert error_line(capsys).startswith(f"error: {data} is not empty and was not built by synth")
    assert [p.name for p in data.iterdir()] == ["train.jsonl"] and train.read_bytes() == before

    typo = tmp_path / "mnie"
    assert main(cli_args("fit", tmp_path / "run", extra=[f"--data.init_args.data_dir={typo}"])) == 2
    assert error_line(capsys).startswith(f"error: {typo / 'train.jsonl'}: no such record file")
    assert not typo.exists(), "no synthetic data behind the user's back"


def test_an_empty_test_file_is_one_line(tmp_path, cli_args, synthetic_data, capsys):
    from main import main

    empty = tmp_path / "test.jsonl"
    empty.write_text("")
    out = tmp_path / "run"
    assert main(cli_args("test", out, extra=[f"--data.init_args.test_file={empty}",
                                             f"--model.init_args.output_dir={out}"])) == 2
    assert error_line(capsys) == f"error: {empty}: the file holds no records"
    assert not (out / "metrics.json").exists()


def test_a_corrupt_video_read_in_a_dataloader_worker_is_one_line(tmp_path, cli_args, main_env,
                                                                 synthetic_data):
    """num_workers=2 as in the 7B configs: the worker's VideoError reaches the terminal as its own line."""
    import shutil

    rows = [json.loads(line) for line in (synthetic_data / "val.jsonl").read_text().splitlines()][:2]
    data = tmp_path / "data"
    (data / "videos").mkdir(parents=True)
    shutil.copy(synthetic_data / rows[0]["video"], data / rows[0]["video"])
    broken = data / "videos" / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    rows[1]["video"] = "videos/broken.mp4"
    (data / "val.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = cli_args("predict", tmp_path / "run", extra=[
        f"--data.init_args.data_dir={data}", "--data.init_args.predict_file=val.jsonl",
        "--data.init_args.num_workers=2", "--data.init_args.eval_batch_size=1"])
    done = run_main_py(args, main_env)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "DataLoader worker" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {broken}: cannot decode"), last
    assert not (tmp_path / "run" / "predictions.jsonl").exists()


# ------------------------------------------------------------------------------ signals and run folders
def sigterm_at(stage: str, batch: int) -> str:
    return "--trainer.callbacks=" + json.dumps(
        [{"class_path": "probes.SigtermAt", "init_args": {"stage": stage, "batch": batch}}])


def test_sigterm_in_fit_saves_a_checkpoint_exits_143_and_resumes(tmp_path, cli_args, run_main, capsys):
    """A scheduler's SIGTERM: one line, status 143 (not 0), a checkpoint of the steps done, and
    `--ckpt_path last` finishes the run."""
    from main import main

    out = tmp_path / "run"
    assert main(cli_args("fit", out, steps=6, extra=[sigterm_at("fit", 3)])) == 143
    line = error_line(capsys)
    assert line.startswith("error: fit stopped by SIGTERM at step 4: checkpoint "), line
    assert line.endswith("rerun with --ckpt_path last to resume")
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 4, "the batch under way when the signal came is finished"
    assert not (out / "hf_model").exists(), "a stopped run exports nothing"
    resumed = run_main(cli_args("fit", out, steps=6, extra=["--ckpt_path=last"]))
    assert resumed.trainer.global_step == 6 and (out / "hf_model").is_dir()


@pytest.mark.parametrize("subcommand", ["test", "predict"])
def test_sigterm_in_test_or_predict_exits_143_saying_nothing_was_written(subcommand, tmp_path, lora_dpo_run,
                                                                         cli_args, capsys):
    from main import main

    out = tmp_path / subcommand
    ckpt = lora_dpo_run.out / "checkpoints" / "last.ckpt"
    args = cli_args(subcommand, out, objective="dpo", base=lora_dpo_run.base, lora=True,
                    extra=[f"--ckpt_path={ckpt}", "--data.init_args.eval_batch_size=1",
                           "--data.init_args.predict_file=val.jsonl", sigterm_at(subcommand, 1)])
    assert main(args) == 143
    assert error_line(capsys) == (f"error: {subcommand} stopped by SIGTERM before its end: nothing was "
                                  f"written to {out}")
    assert not (out / "predictions.jsonl").exists() and not (out / "metrics.json").exists()


def test_sigterm_in_the_dpo_reference_pass_saves_the_pairs_done_and_a_rerun_computes_the_rest(
        tmp_path, cli_args, run_main, monkeypatch, capsys):
    """A SIGTERM while the reference pass computes its second batch (of 4 pairs): the pass stops after that
    batch, saves its 8 pairs, and `fit` exits 143 saying so; the same command again computes only the rest."""
    from lightning_modules.preference import DPOReference
    from main import main

    computed: list[int] = []  # the pairs of each batch the reference computes
    logps, signal_at = DPOReference.logps, [2]

    def counted(self, llm, batch):
        computed.append(len(batch["ids"]))
        if len(computed) in signal_at:
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler notes it; the batch goes on
        return logps(self, llm, batch)

    monkeypatch.setattr(DPOReference, "logps", counted)
    out = tmp_path / "run"
    args = cli_args("fit", out, objective="dpo", lora=True, steps=1)
    assert main(args) == 143
    line = error_line(capsys)
    (cache,) = (out / "reference_logps").glob("*.json")
    match = re.fullmatch(r"error: fit stopped by SIGTERM in the DPO reference pass, before training: "
                         rf"reference pass: 8 of (\d+) pairs saved to {re.escape(str(cache))}; rerun the "
                         "same command to compute the rest", line)
    assert match, line
    assert computed == [4, 4] and len(json.loads(cache.read_text())["pairs"]) == 8
    assert not (out / "checkpoints").exists() and not (out / "hf_model").exists()

    computed.clear()
    signal_at.clear()
    rerun = run_main(args)
    total = len(json.loads(cache.read_text())["pairs"])
    assert total == int(match[1]) > 8
    assert sum(computed) == total - 8, "only the pairs the stopped pass did not save"
    assert rerun.trainer.global_step == 1


def test_a_corrupt_reference_cache_is_one_line_saying_to_delete_it(tmp_path, lora_dpo_run, cli_args, capsys):
    """A cache file of this reference made unreadable: `fit` stops with one line naming it, before
    training."""
    from main import main

    folder = tmp_path / "reference_logps"
    shutil.copytree(lora_dpo_run.out / "reference_logps", folder)
    (cache,) = folder.glob("*.json")
    cache.write_bytes(os.urandom(300))
    args = cli_args("fit", tmp_path / "run", objective="dpo", base=lora_dpo_run.base, lora=True, steps=1,
                    extra=[f"--model.init_args.reference_cache_dir={folder}"])
    assert main(args) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {cache}: not a reference log-probability cache of this run ("), line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_second_command_into_a_busy_run_folder_stops_at_once(tmp_path, cli_args, capsys):
    from lightning_modules.run_folder import RunFolderLock
    from main import main

    out = tmp_path / "run"
    held = RunFolderLock(out, "fit").acquire()  # another fit, still running
    try:
        assert main(cli_args("fit", out, steps=1)) == 2
    finally:
        held.release()
    assert error_line(capsys) == (f"error: {out}: another command is writing this run folder (pid "
                                  f"{os.getpid()}, fit); wait for it to end or give this one another "
                                  "--model.init_args.output_dir")
    assert sorted(p.name for p in out.iterdir()) == [".lock"], "nothing else written"


def test_each_command_keeps_its_own_config_in_a_shared_run_folder(tmp_path, cli_args, run_main):
    out = tmp_path / "run"
    run_main(cli_args("fit", out, steps=1))
    fit_config = (out / "config.yaml").read_text()
    run_main(cli_args("predict", out, extra=["--ckpt_path=last", "--data.init_args.predict_file=val.jsonl"]))
    assert (out / "config.yaml").read_text() == fit_config
    assert "predict_file: val.jsonl" in (out / "predict_config.yaml").read_text()


def test_a_damaged_checkpoint_is_one_line(tmp_path, cli_args, run_main, capsys):
    """Cut short by a full disk or an interrupted copy: `fit --ckpt_path last` and `test` name the file."""
    from main import main

    out = tmp_path / "run"
    run_main(cli_args("fit", out, steps=1))
    target = (out / "checkpoints" / "last.ckpt").resolve()
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    assert main(cli_args("fit", out, steps=2, extra=["--ckpt_path=last"])) == 2
    assert error_line(capsys) == (f"error: --ckpt_path last: {target}: the checkpoint file is damaged (cut "
                                  "short?); delete it, or give another")
    assert main(cli_args("test", out, extra=[f"--ckpt_path={target}"])) == 2
    assert error_line(capsys) == (f"error: --ckpt_path {target}: the checkpoint file is damaged (cut "
                                  "short?); delete it, or give another")


# ------------------------------------------------------------------------------- checkpoints of another model
@pytest.fixture(scope="module")
def full_run(tmp_path_factory, cli_args, run_main):
    """One step of full fine-tuning SFT on the tiny base: a full checkpoint and an exported model, as the
    demo's base run leaves them (the base of the next stage's LoRA runs)."""
    out = tmp_path_factory.mktemp("full")
    run_main(cli_args("fit", out, steps=1, extra=["--trainer.limit_val_batches=0"]))
    return out


def mismatch_cases(full, lora_run) -> dict[str, tuple[list[str], Path, str]]:
    """name: (arguments of `test`, checkpoint, the difference its error line names)."""
    lora_ckpt = lora_run.out / "checkpoints" / "last.ckpt"
    qkvo = "['k_proj', 'o_proj', 'q_proj', 'v_proj']"
    return {
        # the issue's `test -c configs/shapes/sft.yaml --ckpt_path outputs/shapes/base/checkpoints/last.ckpt`
        "the base's full checkpoint": (
            ["--model.init_args.model.name_or_path=" + str(full / "hf_model"), *LORA],
            full / "checkpoints" / "last.ckpt",
            f"model.name_or_path {str(lora_run.base)!r} in the checkpoint, {str(full / 'hf_model')!r} in the "
            "config; model.lora: full fine-tuning in the checkpoint, LoRA in the config"),
        "other target_modules": (
            [*LORA, "--model.init_args.model.lora.target_modules=[q_proj,v_proj]"], lora_ckpt,
            f"model.lora.target_modules {qkvo} in the checkpoint, ['q_proj', 'v_proj'] in the config"),
        "modules_to_save": (
            [*LORA, "--model.init_args.model.lora.modules_to_save=[multi_modal_projector]"], lora_ckpt,
            "model.lora.modules_to_save [] in the checkpoint, ['multi_modal_projector'] in the config"),
        "another base": (
            [*LORA, "--model.init_args.model.name_or_path=" + str(full / "hf_model")], lora_ckpt,
            f"model.name_or_path {str(lora_run.base)!r} in the checkpoint, {str(full / 'hf_model')!r} in the "
            "config"),
        "another lora.r": (
            [*LORA, "--model.init_args.model.lora.r=8"], lora_ckpt,
            "model.lora.r 4 in the checkpoint, 8 in the config"),
    }


LORA = ["--model.init_args.model.lora.r=4", "--model.init_args.model.lora.alpha=8"]  # lora_dpo_run's


@pytest.mark.parametrize("case", ["the base's full checkpoint", "other target_modules", "modules_to_save",
                                  "another base", "another lora.r"])
def test_a_checkpoint_of_another_model_is_one_line_naming_what_differs(case, tmp_path, full_run, lora_dpo_run,
                                                                       cli_args, capsys):
    """`strict_loading=False` would drop such a checkpoint's weights and score the initial model with exit 0
    (or, for another rank, dump a size mismatch): the saved model settings are checked against the config's.
    The objective does not count (the LoRA checkpoint is DPO's, the config SFT's)."""
    from main import main

    extra, ckpt, difference = mismatch_cases(full_run, lora_dpo_run)[case]
    out = tmp_path / "test"
    assert main(cli_args("test", out, extra=[*extra, f"--ckpt_path={ckpt}"])) == 2
    assert error_line(capsys) == (
        f"error: --ckpt_path {ckpt}: a checkpoint of another model than the config's ({difference}); give "
        "the checkpoint of a run with this config's model settings, or the settings it was trained with")
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize("case", ["the base's full checkpoint", "other target_modules"])
def test_an_older_checkpoint_of_another_model_is_refused_by_its_keys(case, tmp_path, full_run, lora_dpo_run,
                                                                     cli_args, capsys):
    """A checkpoint saved without its model settings (before they were saved) is checked by its keys: every
    trainable weight present, none unexpected; the line gives the counts and the first few of each."""
    from main import main

    extra, ckpt, _ = mismatch_cases(full_run, lora_dpo_run)[case]
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    del checkpoint["model_settings"]
    older = tmp_path / "older.ckpt"
    torch.save(checkpoint, older)
    assert main(cli_args("test", tmp_path / "test", extra=[*extra, f"--ckpt_path={older}"])) == 2
    line = error_line(capsys)
    prefix = f"error: --ckpt_path {older}: the checkpoint does not hold this model's trainable weights: "
    assert line.startswith(prefix), line
    counts = dict(re.findall(r"(\d+) (missing|unexpected) \(", line.removeprefix(prefix)))
    if case == "other target_modules":  # the k_proj and o_proj adapters (A and B) of the one text layer
        assert counts == {"4": "unexpected"} and "k_proj.lora_A" in line, line
    else:  # every adapter missing, every full weight unexpected
        assert set(counts.values()) == {"missing", "unexpected"} and "lora_A" in line, line
    assert line.endswith("give the checkpoint of a run with this config's model settings")


def test_an_unreachable_judge_is_one_line(tmp_path, lora_dpo_run, cli_args, capsys):
    """A closed port: `test` stops with one line naming the endpoint, not a traceback (and no report)."""
    from main import main

    out = tmp_path / "test"
    args = cli_args("test", out, objective="dpo", base=lora_dpo_run.base, lora=True,
                    extra=[f"--ckpt_path={lora_dpo_run.out / 'checkpoints' / 'last.ckpt'}",
                           "--model.init_args.judge=metrics.judges.ChatJudge",
                           "--model.init_args.judge.init_args.base_url=http://127.0.0.1:9/v1",
                           "--model.init_args.judge.init_args.model=judge",
                           "--model.init_args.judge.init_args.max_retries=0",
                           "--model.init_args.judge.init_args.timeout=5"])
    assert main(args) == 2
    line = error_line(capsys)
    assert "http://127.0.0.1:9/v1" in line, line
    assert not (out / "metrics.json").exists()
