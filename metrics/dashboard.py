"""A saved W&B workspace for a project's runs: training curves, before/after scores, the trade-off, the ROC
curves per category, the tables and the report figures, each panel on the keys that `fit` and `test` log.

`python -m metrics.dashboard --entity E --project P` saves the workspace (it needs a W&B login and server);
`--dry-run` builds it without a network and prints every panel with the keys it reads (`--json`: the full
view spec instead); it saves nothing, so it needs no `--entity` or `--project`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from datamodules.records import CATEGORIES
from metrics.names import (
    AFTER,
    ALIGNMENT,
    ALIGNMENT_SCORES,
    ANSWERABILITY_AUROC,
    ANSWERABLE_ACCURACY,
    BEFORE,
    DISCRETION,
    EXCESSIVE_REFUSAL,
    OVER_REFUSAL_RATE,
    OVERALL_ACCURACY,
    PERMISSIVENESS,
    UNANSWERABLE_ACCURACY,
    summary_key,
)
from metrics.wandb_charts import ROC_GROUPS, chart_keys

__all__ = ["DPO_CURVES", "build_workspace", "main", "panel_keys"]

STEP = "trainer/global_step"  # Lightning's WandbLogger logs the optimiser step under this key
DPO_CURVES: dict[str, list[str]] = {
    "DPO rewards (train)": ["train/rewards/chosen", "train/rewards/rejected"],
    "DPO reward margin": ["train/rewards/margins", "val/rewards/margins"],
    "DPO reward accuracy": ["train/rewards/accuracies", "val/rewards/accuracies"],
    "Log-probabilities (train)": ["train/logps/chosen", "train/logps/rejected"],
}
"""Panel title -> the DPO keys it plots (TRL's names, as `AlignmentModule.model_step` logs them)."""


def _both(prefix: str, *scores: str) -> list[str]:
    return [summary_key(prefix, model, score) for score in scores for model in (BEFORE, AFTER)]


def build_workspace(entity: str, project: str, name: str = "Answerability", prefix: str = "test") -> Any:
    """The workspace object (`wandb_workspaces.workspaces.Workspace`), built offline."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    charts = chart_keys(prefix)
    alignment = [s.summary_key(prefix) for s in (PERMISSIVENESS, DISCRETION)]
    denominators = [summary_key(prefix, ALIGNMENT, s.denominator_key) for s in ALIGNMENT_SCORES]
    sections = [
        ws.Section(name="Training", is_open=True, panels=[
            wr.LinePlot(title="Loss", x=STEP, y=["train/loss", "val/loss"]),
            *(wr.LinePlot(title=title, x=STEP, y=keys) for title, keys in DPO_CURVES.items()),
        ]),
        ws.Section(name="Before → after alignment", is_open=True, panels=[
            wr.BarPlot(title="Accuracy (higher is better)", metrics=_both(
                prefix, ANSWERABLE_ACCURACY.key, UNANSWERABLE_ACCURACY.key, OVERALL_ACCURACY.key)),
            wr.BarPlot(title="Refusing without need (lower is better)", metrics=[
                *_both(prefix, OVER_REFUSAL_RATE.key), EXCESSIVE_REFUSAL.summary_key(prefix)]),
            wr.BarPlot(title="Permissiveness and discretion (higher is better; no bar: undefined)",
                       metrics=alignment),
            wr.BarPlot(title="Items behind each alignment score (0: the score is undefined)",
                       metrics=denominators),
            wr.BarPlot(title="Unanswerable accuracy by category", metrics=_both(
                prefix, *(UNANSWERABLE_ACCURACY.category_key(c) for c in CATEGORIES))),
            wr.BarPlot(title="Answerability AUROC by category", metrics=_both(
                prefix, ANSWERABILITY_AUROC.key, *(ANSWERABILITY_AUROC.category_key(c) for c in CATEGORIES))),
            wr.ScatterPlot(title="Trade-off across runs (after alignment)",
                           x=ANSWERABLE_ACCURACY.summary_key(prefix),
                           y=UNANSWERABLE_ACCURACY.summary_key(prefix)),
        ]),
        ws.Section(name="Refusal likelihood ROC", is_open=True, panels=[
            _chart(wr, charts[f"roc/{group}"], "wandb/area-under-curve/v0",
                   {"x": "fpr", "y": "tpr", "class": "class"}, f"ROC: {group}")
            for group in ROC_GROUPS
        ]),
        ws.Section(name="This run's scores", is_open=True, panels=[
            _chart(wr, charts["tradeoff"], "wandb/scatter/v0",
                   {"x": ANSWERABLE_ACCURACY.key, "y": UNANSWERABLE_ACCURACY.key}, "Trade-off per model"),
            *(_chart(wr, charts[f"scores/{direction}_is_better"], "wandb/bar/v0",
                     {"label": "score", "value": "value"}, f"{direction.capitalize()} is better")
              for direction in ("higher", "lower")),
        ]),
        ws.Section(name="Tables", is_open=True, panels=[
            wr.WeavePanelSummaryTable(table_name=charts["scores_table"]),
            wr.WeavePanelSummaryTable(table_name=charts["by_category"]),
            wr.WeavePanelSummaryTable(table_name=charts["by_form"]),
            wr.WeavePanelSummaryTable(table_name=f"{prefix}/predictions"),
        ]),
        ws.Section(name="Report figures", is_open=False, panels=[
            wr.MediaBrowser(title="Figures", media_keys=[
                f"{prefix}/report", *(charts[f"figures/{n}"] for n in ("tradeoff", "roc", "by_form"))]),
        ]),
    ]
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections)


def _chart(wr: Any, key: str, spec: str, fields: dict[str, str], title: str) -> Any:
    """A panel of the custom chart `wandb.plot_table` logged under `key` (its table: ``key_table``)."""
    return wr.CustomChart(query={"summaryTable": {"tableKey": f"{key}_table"}}, chart_name=spec,
                          chart_fields=fields, chart_strings={"title": title})


def panel_keys(workspace: Any) -> list[tuple[str, str, list[str]]]:
    """(section, panel title, the logged keys the panel reads) for every panel of a workspace."""
    out = []
    for section in workspace.sections:
        for panel in section.panels:
            kind = type(panel).__name__
            if kind == "LinePlot":
                keys = [panel.x, *panel.y]
            elif kind == "BarPlot":
                keys = list(panel.metrics)
            elif kind == "ScatterPlot":
                keys = [panel.x, panel.y]
            elif kind == "CustomChart":
                keys = [panel.query["summaryTable"]["tableKey"]]
            elif kind == "WeavePanelSummaryTable":
                keys = [panel.table_name]
            elif kind == "MediaBrowser":
                keys = list(panel.media_keys)
            else:
                raise TypeError(f"panel_keys: no rule for a {kind} panel")
            title = getattr(panel, "title", None) or getattr(panel, "chart_strings", {}).get("title")
            out.append((section.name, f"{kind}: {title or keys[0]}", [str(k) for k in keys]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metrics.dashboard", description=__doc__.splitlines()[0])
    parser.add_argument("--entity", help="W&B entity (user or team) that owns the project (to save)")
    parser.add_argument("--project", help="W&B project of the runs (to save)")
    parser.add_argument("--name", default="Answerability", help="name of the saved workspace")
    parser.add_argument("--prefix", default="test", help="prefix of the evaluation keys (default: test)")
    parser.add_argument("--dry-run", action="store_true", help="build it and print its panels; save nothing")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print the view spec as JSON")
    args = parser.parse_args(argv)
    missing = [flag for flag in ("--entity", "--project") if not getattr(args, flag[2:])]
    if missing and not args.dry_run:
        print(f"error: {' and '.join(missing)} needed to save the workspace (or pass --dry-run to build it "
              "without saving)", file=sys.stderr)
        return 2
    workspace = build_workspace(args.entity or "", args.project or "", args.name, args.prefix)
    if args.dry_run:
        if args.json:
            spec = workspace._to_model().model_dump(by_alias=True, exclude_none=True)
            print(json.dumps(spec, indent=2, default=str))
        else:
            for section, title, keys in panel_keys(workspace):
                print(f"{section} | {title} | {', '.join(keys)}")
        return 0
    try:
        saved = workspace.save()
    except Exception as error:  # no login, no server, no such entity/project: W&B's own message says which
        where = f"{args.entity}/{args.project}"
        print(f"error: could not save the workspace to {where}: {error}", file=sys.stderr)
        return 2
    print(saved.url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
