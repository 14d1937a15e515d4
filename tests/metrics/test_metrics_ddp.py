"""A real 2-process DDP run (gloo, CPU): the synced metrics equal the single-process result on the same
items split unevenly across the ranks, for the count metrics and the AUROC's float list states."""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metrics.answerability import AnswerabilityAUROC, AnswerabilityMetrics, PairedAnswerabilityMetrics

WORLD_SIZE = 2


def make_items(seed: int = 7, n: int = 61) -> dict[str, torch.Tensor]:
    """Random flags for n items (category -1 for answerable ones) and refusal scores with ties."""
    rng = random.Random(seed)
    answerable = [rng.random() < 0.5 for _ in range(n)]
    return {
        "answerable": torch.tensor(answerable),
        "category": torch.tensor([-1 if a else rng.choice([0, 1, 2]) for a in answerable]),
        "refused": torch.tensor([rng.random() < 0.5 for _ in range(n)]),
        "correct": torch.tensor([rng.random() < 0.5 for _ in range(n)]),
        "reason_ok": torch.tensor([rng.random() < 0.5 for _ in range(n)]),
        "before_refused": torch.tensor([rng.random() < 0.4 for _ in range(n)]),
        "before_correct": torch.tensor([rng.random() < 0.5 for _ in range(n)]),
        "score": torch.tensor([round(rng.gauss(0, 1), 1) for _ in range(n)]),
    }


# rank 0 gets items [0, 40) in three batches, rank 1 gets [40, 61) in two: uneven counts and list lengths
SHARDS = {0: [(0, 13), (13, 30), (30, 40)], 1: [(40, 45), (45, 61)]}


def run_metrics(items: dict[str, torch.Tensor], batches: list[tuple[int, int]]) -> dict[str, float]:
    single, paired, auroc = AnswerabilityMetrics(), PairedAnswerabilityMetrics(), AnswerabilityAUROC()
    for start, end in batches:
        t = {k: v[start:end] for k, v in items.items()}
        single.update(t["refused"], t["correct"], t["answerable"], t["category"], t["reason_ok"])
        paired.update(t["before_refused"], t["before_correct"], t["refused"], t["correct"], t["answerable"])
        auroc.update(t["score"], t["answerable"], t["category"])
    out = {}
    for metric in (single, paired, auroc):
        out.update({k: v.item() for k, v in metric.compute().items()})
    # an AUROC metric that saw nothing on rank 1 (an empty list state there) must still sync
    lopsided = AnswerabilityAUROC()
    for start, end in batches if batches[0][0] == 0 else []:
        lopsided.update(
            items["score"][start:end], items["answerable"][start:end], items["category"][start:end]
        )
    out.update({f"lopsided/{k}": v.item() for k, v in lopsided.compute().items()})
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    warnings.filterwarnings("ignore", message="The ``compute`` method")  # the lopsided metric on rank 1
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        result = run_metrics(make_items(), SHARDS[rank])
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-6


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_ddp_sync_equals_single_process(tmp_path: Path):
    # fork (as Lightning's "ddp_fork") where available: the children reuse the parent's imports, which keeps
    # this test fast on a small machine (spawn re-imports torch in each child: ~20 s here).
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    context = mp.start_processes(
        _worker,
        args=(str(tmp_path / "init"), str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method=method,
    )
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-process DDP run did not finish in 120 s")
    items = make_items()
    expected = run_metrics(items, [(0, 61)])
    # the lopsided metric only ever saw rank 0's items
    expected.update({k: v for k, v in run_metrics(items, SHARDS[0]).items() if k.startswith("lopsided/")})
    for rank in range(WORLD_SIZE):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(result) == set(expected)
        differ = {k: (result[k], expected[k]) for k in expected if not _same(result[k], expected[k])}
        assert not differ, f"rank {rank}: {differ}"
    # and the split really matters: one rank alone gives different scores
    alone = run_metrics(items, SHARDS[1])
    assert not _same(alone["overall_accuracy"], expected["overall_accuracy"])


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
