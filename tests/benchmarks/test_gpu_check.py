"""The prepared GPU check (`benchmarks/gpu_check.py`) keeps working: run at its reduced shapes on a CPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.slow
def test_the_gpu_check_runs_reduced_on_a_cpu(tmp_path, main_env):
    """Every measure is present and finite; the CUDA-only ones say why they were skipped; one-pass pair rows
    agree with separate rows in bf16; a left-padded batch stays finite; stdout is the JSON object alone."""
    out = tmp_path / "gpu_check.json"
    env = {**main_env, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(SCRIPT), "--reduced", "--steps", "2", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(done.stdout) == report
    assert report["reduced"] is True and report["device"] == "cpu"
    assert report["shape"]["vocab_size"] == 32064 and "RoPE linearly by 2" in report["positions"]

    for objective, rows in (("sft", 4), ("dpo", 2)):
        result = report[objective]
        assert result["rows"] == rows and len(result["step_times_s"]) == 2
        for key in ("step_s", "tokens_per_s", "flops_vision_forward", "flops_language_forward",
                    "flops_per_step", "achieved_tflops"):
            assert finite(result[key]) and result[key] > 0, (objective, key, result[key])
        assert all(finite(loss) for loss in result["losses"]), result["losses"]
        vision, language = result["flops_vision_forward"], result["flops_language_forward"]
        assert result["flops_per_step"] == vision + 3 * language
        assert result["mfu"].startswith("skipped: ")
        assert result["peak_memory_gib"].startswith("skipped: ") and "CUDA" in result["peak_memory_gib"]
    assert report["dpo"]["losses"][0] == pytest.approx(math.log(2), abs=1e-3), "policy == reference at first"
    assert finite(report["dpo"]["reference_pass_s"])
    assert report["peak_flops"] is None and report["peak_flops_source"].startswith("skipped: ")
    assert report["weights_gib"].startswith("skipped: ")

    pair = report["pair_vs_separate"]
    assert pair["token_counts_equal"] and len(pair["pair_logps"]) == len(pair["separate_logps"]) == 4
    assert all(finite(value) for value in pair["pair_logps"] + pair["separate_logps"])
    assert pair["max_rel_diff"] < 1e-3, pair

    padded = report["left_padded_finite"]
    assert padded["left_padded_rows"] >= 1
    assert padded["kernels"].startswith("skipped: ") and "CUDA" in padded["kernels"]
    assert padded["sdpa_padding_safe"] == {"default": "finite"}

    test = report["test"]
    assert test["items"] == 8 and test["paired"] is True
    assert finite(test["items_per_s"]) and test["items_per_s"] > 0
    assert finite(report["seconds"])
