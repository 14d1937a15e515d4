"""Measure the rule-based refusal detector: precision and recall on the hand-labelled table, and recall
on the real UVQA refusals. Run `python -m metrics.refusal_eval [--cases TSV] [--uvqa DIR] [-v]`.
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass
from pathlib import Path

from metrics.refusal import is_refusal

_REPO = Path(__file__).resolve().parents[1]
DEFAULT_CASES = _REPO / "tests" / "metrics" / "refusal_cases.tsv"
DEFAULT_UVQA = _REPO / ".." / "shared" / "uvqa"
UVQA_FILES = ("eval_object.json", "eval_relation.json", "eval_attribute.json")


@dataclass(frozen=True)
class RefusalCase:
    label: bool
    kind: str
    text: str


def load_cases(path: str | Path = DEFAULT_CASES) -> list[RefusalCase]:
    """Read the labelled table: tab-separated `label kind text`, `#` comment lines, one header line."""
    path = Path(path)
    lines = [
        line for line in path.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")
    ]
    reader = csv.DictReader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    cases = []
    for number, row in enumerate(reader, start=2):
        if row.get("label") not in {"0", "1"} or not row.get("text"):
            raise ValueError(f"{path}, row {number}: field 'label' must be 0 or 1 and 'text' non-empty")
        cases.append(RefusalCase(row["label"] == "1", row["kind"], row["text"]))
    return cases


def load_uvqa_refusals(uvqa_dir: str | Path = DEFAULT_UVQA) -> list[str]:
    """The `new_answer` texts of the released UVQA evaluation files (every one is a refusal)."""
    texts: list[str] = []
    for name in UVQA_FILES:
        with open(Path(uvqa_dir) / name, encoding="utf-8") as f:
            texts.extend(record["new_answer"] for record in json.load(f))
    return texts


def precision_recall(cases: list[RefusalCase]) -> tuple[float, float, list[RefusalCase]]:
    """Precision and recall of `is_refusal` on labelled cases, and the misclassified cases."""
    tp = fp = fn = 0
    wrong = []
    for case in cases:
        predicted = is_refusal(case.text)
        tp += predicted and case.label
        fp += predicted and not case.label
        fn += case.label and not predicted
        if predicted != case.label:
            wrong.append(case)
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    return precision, recall, wrong


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=Path, default=DEFAULT_CASES, help="labelled TSV table")
    parser.add_argument("--uvqa", type=Path, default=DEFAULT_UVQA, help="folder with the UVQA eval_*.json")
    parser.add_argument("-v", "--verbose", action="store_true", help="list the misclassified texts")
    args = parser.parse_args(argv)

    cases = load_cases(args.cases)
    precision, recall, wrong = precision_recall(cases)
    print(
        f"labelled table ({len(cases)} responses, {sum(c.label for c in cases)} refusals): "
        f"precision {precision:.3f}, recall {recall:.3f}"
    )
    if args.verbose:
        for case in wrong:
            print(f"  wrong (label {int(case.label)}, {case.kind}): {case.text}")
    if all((args.uvqa / name).is_file() for name in UVQA_FILES):
        texts = load_uvqa_refusals(args.uvqa)
        missed = [t for t in texts if not is_refusal(t)]
        print(f"UVQA refusals ({len(texts)}): recall {1 - len(missed) / len(texts):.3f}")
        if args.verbose:
            for text in missed:
                print(f"  missed: {text}")
    else:
        print(f"UVQA refusals: not found in {args.uvqa}")


if __name__ == "__main__":
    main()
