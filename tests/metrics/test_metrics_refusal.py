"""The rule-based refusal detector on the labelled table and the 467 real UVQA refusals, and reason_ok."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from datamodules.records import REFUSAL_OPENING
from metrics.refusal import content_tokens, is_refusal, reason_ok
from metrics.refusal_eval import UVQA_FILES, load_cases, load_uvqa_refusals, main, precision_recall

CASES = Path(__file__).with_name("refusal_cases.tsv")
UVQA = Path(__file__).resolve().parents[2] / ".." / "shared" / "uvqa"
needs_uvqa = pytest.mark.skipif(
    not all((UVQA / name).is_file() for name in UVQA_FILES),
    reason="shared/uvqa (the UVQA eval files) not present",
)


def test_labelled_table_precision_and_recall():
    cases = load_cases(CASES)
    assert len(cases) >= 150
    assert sum(c.label for c in cases) >= 60 and sum(not c.label for c in cases) >= 60
    precision, recall, wrong = precision_recall(cases)
    report = (
        f"refusal detector on {len(cases)} labelled responses: precision {precision:.3f}, recall {recall:.3f}"
    )
    print("\n" + report)
    listing = "\n".join(f"  label {int(c.label)} ({c.kind}): {c.text}" for c in wrong)
    assert precision >= 0.97 and recall >= 0.97, report + "\n" + listing


@needs_uvqa
def test_recall_on_the_467_uvqa_refusals():
    texts = load_uvqa_refusals(UVQA)
    assert len(texts) == 467
    missed = [t for t in texts if not is_refusal(t)]
    recall = 1 - len(missed) / len(texts)
    print(f"\nrefusal detector recall on the {len(texts)} UVQA refusals: {recall:.3f}")
    assert recall >= 0.98, "missed:\n" + "\n".join(missed)


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry to hear that.",
        "There is no doubt the man is running.",
        'The man holds a sign that says "I cannot swim".',
        "The woman shouts \u201cI can\u2019t answer that!\u201d and leaves.",
        "The boy cannot reach the shelf, so he climbs onto a chair.",
        "The narrator explains that it is impossible to tell the twins apart.",
        "No, there is no dog in the video.",
        "The man is running in the park. The video does not show where he goes afterwards.",
        "",
        "   ",
    ],
)
def test_known_traps_are_not_refusals(text):
    assert not is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "The question is unanswerable because there is no green triangle in the video.",
        REFUSAL_OPENING,
        "I cannot determine the colour of the car from the video.",
        "The video does not show a cat.",
        "There is no bicycle in the video.",
        "It is not possible to tell.",
        "I can\u2019t tell what he is holding.",
        'There is no "kettle" in the video.',
    ],
)
def test_common_refusals(text):
    assert is_refusal(text)


@pytest.mark.parametrize(
    ("text", "missing", "expected"),
    [
        (
            "The question is unanswerable because there is no green triangle in the video.",
            "green triangle",
            True,
        ),
        ("THERE ARE NO GREEN TRIANGLES IN THE VIDEO.", "a green triangle", True),  # case, plural, article
        ("The video has no triangle that is green.", "green triangle", True),  # word order
        ("There is no 'kettle' in the video.", "kettle", True),  # quotes
        ("No men are running in the video.", "man running", True),  # irregular plural, -ing
        ("The question is unanswerable: no colour is shown.", "color", True),  # spelling variant
        ("There is no triangle in the video.", "green triangle", False),  # attribute missing
        ("There is no small circle left of the square.", "small circle right of square", False),
        ("The question is unanswerable.", "green triangle", False),
        ("There is no green triangle.", None, False),
        ("There is no green triangle.", "", False),
        ("", "green triangle", False),
    ],
)
def test_reason_ok(text, missing, expected):
    assert reason_ok(text, missing) is expected


def test_content_tokens_normalise_numbers_and_stems():
    assert content_tokens("Two dogs are running") == content_tokens("2 dog runs")


@needs_uvqa
def test_reason_ok_on_uvqa_gold_refusals():
    """The released refusals name their recorded missing element most of the time (the rest name a
    different entity: noise in the release), so reason_ok must accept at least that share."""
    fields = {
        "object": "generated_actor_or_object",
        "relation": "generated_relation",
        "attribute": "generated_attributes",
    }
    rates = {}
    for category, field in fields.items():
        records = json.loads((UVQA / f"eval_{category}.json").read_text(encoding="utf-8"))
        rates[category] = sum(reason_ok(r["new_answer"], r[field]) for r in records) / len(records)
    print(f"\nreason_ok on UVQA gold refusals: {rates}")
    assert rates["object"] >= 0.75 and rates["attribute"] >= 0.75 and rates["relation"] >= 0.45, rates


def test_refusal_eval_script_prints_the_three_numbers(capsys):
    main(["--cases", str(CASES), "--uvqa", str(UVQA)])
    out = capsys.readouterr().out
    assert re.search(r"precision \d\.\d{3}, recall \d\.\d{3}", out)
    assert re.search(r"UVQA refusals \(467\): recall \d\.\d{3}", out) or "not found" in out
