"""The W&B dashboard builds offline, and every panel reads a key that the project's own logging writes: the
training curves from a real `main.py fit` (LoRA DPO, offline W&B) and the evaluation panels from a real
`main.py test` of its checkpoint, whose model before alignment refuses no answerable item (Permissiveness
undefined, as in the demo), and from `log_to_wandb` on a realistic run where every score is defined."""

from __future__ import annotations

import json

import pytest
from realistic_rows import realistic_run
from wandb_records import read_run, run_file

from metrics.dashboard import build_workspace, main, panel_keys
from metrics.figures import evaluation_from_test, write_figures
from metrics.wandb_charts import log_to_wandb

pytest.importorskip("wandb_workspaces")


@pytest.fixture(scope="module")
def evaluation_keys(tmp_path_factory):
    """Summary keys of an offline run that `log_to_wandb` filled as `test` does (figures beside it)."""
    import wandb

    folder = tmp_path_factory.mktemp("wandb_test")
    rows, metrics = realistic_run(seed=2, num_videos=12)
    figures = write_figures(folder / "report", evaluation_from_test(metrics, rows))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        run = wandb.init(project="answerability-tests", dir=str(folder))
        log_to_wandb(run, metrics, rows, image_path=figures["scores"])
        run.finish()
    wandb.teardown()
    return set(read_run(run_file(folder)).summary)


@pytest.fixture(scope="module")
def test_run_summary(tmp_path_factory, lora_dpo_run, cli_args, run_main):
    """The summary of a real `main.py test` run (offline W&B) of the LoRA DPO checkpoint, and its metrics."""
    import wandb

    folder = tmp_path_factory.mktemp("wandb_main_test")
    run_main(cli_args("test", lora_dpo_run.out, objective="dpo", base=lora_dpo_run.base, lora=True,
                      logger=folder, extra=[f"--model.init_args.output_dir={folder / 'out'}",
                                            f"--ckpt_path={lora_dpo_run.out / 'checkpoints' / 'last.ckpt'}"]))
    wandb.finish()
    wandb.teardown()
    metrics = json.loads((folder / "out" / "metrics.json").read_text())
    return read_run(run_file(folder)).summary, metrics


def missing_keys(panels, logged: set[str]) -> dict[str, list[str]]:
    return {title: [k for k in keys if k not in logged] for _, title, keys in panels if set(keys) - logged}


def test_every_panel_reads_a_logged_key(lora_dpo_run, evaluation_keys):
    fit = read_run(run_file(lora_dpo_run.out / "wandb"))
    logged = set(fit.history) | evaluation_keys
    panels = panel_keys(build_workspace("entity", "project"))
    assert len(panels) >= 20
    assert missing_keys(panels, logged) == {}
    sections = {section for section, _, _ in panels}
    assert {"Training", "Before → after alignment", "Refusal likelihood ROC", "Tables"} <= sections
    assert any("test/predictions" in keys for _, _, keys in panels), "the before/after table"

    # The check can fail: the DPO curves under their former names, or a prefix nothing logged under.
    assert "DPO reward margin" in str(missing_keys(panels, logged - {"val/rewards/margins"}))
    assert "ROC: object" in str(missing_keys(panel_keys(build_workspace("e", "p", prefix="val")), logged))


def test_every_panel_reads_a_key_of_a_real_test_run(lora_dpo_run, test_run_summary):
    summary, metrics = test_run_summary
    logged = set(read_run(run_file(lora_dpo_run.out / "wandb")).history) | set(summary)
    panels = panel_keys(build_workspace("entity", "project"))
    assert missing_keys(panels, logged) == {}
    # As in the demo: the tiny base refuses no answerable item, so Permissiveness is undefined. Its key is in
    # the summary all the same (null), with the zero denominator that says why.
    assert metrics["alignment"]["permissiveness/denominator"] == 0
    assert metrics["alignment"]["permissiveness"] is None
    assert summary["test/alignment/permissiveness"] is None
    assert summary["test/alignment/permissiveness/denominator"] == 0
    without = logged - {"test/alignment/permissiveness"}
    assert "test/alignment/permissiveness" in str(missing_keys(panels, without))


def test_cli_dry_run_needs_no_entity_or_project_and_saving_does(capsys):
    assert main(["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(panel_keys(build_workspace("e", "p"))) and "Training | " in lines[0]
    for args, named in (([], "--entity and --project needed"), (["--entity", "e"], "--project needed")):
        assert main(args) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith(f"error: {named} to save") and err.count("\n") == 1, err


def test_cli_dry_run_prints_panels_and_spec(capsys):
    assert main(["--entity", "e", "--project", "p", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "Refusal likelihood ROC | CustomChart: ROC: object | test/roc/object_table" in lines
    assert main(["--entity", "e", "--project", "p", "--dry-run", "--json"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert (spec["entity"], spec["project"], spec["displayName"]) == ("e", "p", "Answerability")
    sections = spec["spec"]["section"]["panelBankConfig"]["sections"]
    panels = [p for s in sections for p in s["panels"]]
    assert len(panels) == len(panel_keys(build_workspace("e", "p")))
    charts = [p["config"]["panelDefId"] for p in panels if p["viewType"] == "Vega2"]
    assert charts.count("wandb/area-under-curve/v0") == 4
