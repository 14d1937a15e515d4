"""The DPO reference cache file (`preference.ReferenceCache`): a file that is not this run's cache (damaged,
cut short, edited) is one `UserError` line naming it and saying to delete it, never a traceback; a good file
reads back what was saved."""

from __future__ import annotations

import json

import pytest
import torch

from datamodules.errors import UserError
from lightning_modules.preference import ReferenceCache, ReferenceCacheError

IDENTITY = {"format": 1, "name_or_path": "tiny", "weights": "abc"}


def saved_cache(tmp_path) -> ReferenceCache:
    cache = ReferenceCache(tmp_path, IDENTITY)
    cache.add(["a", "b"], ["da", "db"], torch.tensor([-1.0, -2.0, -3.0, -4.0]))
    cache.save()
    return cache


def test_a_saved_cache_reads_back(tmp_path):
    cache = saved_cache(tmp_path)
    again = ReferenceCache(tmp_path, IDENTITY)
    assert again.load() == 2
    assert again.pairs == cache.pairs == {"a": ("da", -1.0, -3.0), "b": ("db", -2.0, -4.0)}


def pairs_with(entry) -> str:
    return json.dumps({"identity": IDENTITY, "pairs": {"a": ["da", -1.0, -3.0], "b": entry}})


CORRUPT = {
    "random bytes": (bytes(range(256)) * 4, "not UTF-8 text"),
    "cut short": (pairs_with(["db", -2.0, -4.0])[:40].encode(), "invalid JSON (Unterminated string"),
    "a list": (b"[]", "no 'pairs' object"),
    "no pairs": (json.dumps({"identity": IDENTITY}).encode(), "no 'pairs' object"),
    "no identity": (json.dumps({"pairs": {}}).encode(), "its reference identity differs from this run's"),
    "an entry too short": (pairs_with(["db", -2.0]).encode(), "pair 'b' is not [digest, chosen"),
    "a string for a number": (pairs_with(["db", "-2.0", -4.0]).encode(), "pair 'b' is not [digest, chosen"),
    "a boolean for a number": (pairs_with(["db", True, -4.0]).encode(), "pair 'b' is not [digest, chosen"),
    "an infinite number": (pairs_with(["db", -2.0, -4.0]).replace("-4.0", "-1e999").encode(),
                           "pair 'b' is not [digest, chosen"),
    "NaN": (pairs_with(["db", -2.0, -4.0]).replace("-4.0", "NaN").encode(), "non-standard JSON constant NaN"),
    "a number for the digest": (pairs_with([7, -2.0, -4.0]).encode(), "pair 'b' is not [digest, chosen"),
}


@pytest.mark.parametrize("content, problem", CORRUPT.values(), ids=CORRUPT.keys())
def test_a_corrupt_cache_file_is_one_line_saying_to_delete_it(tmp_path, content, problem):
    path = saved_cache(tmp_path).path
    path.write_bytes(content)
    cache = ReferenceCache(tmp_path, IDENTITY)
    with pytest.raises(ReferenceCacheError) as raised:
        cache.load()
    assert isinstance(raised.value, UserError)
    message = str(raised.value)
    expected = f"{path}: not a reference log-probability cache of this run ({problem}"
    assert message.startswith(expected), message
    assert message.endswith("; delete the file (the reference pass computes it again)")
    assert "\n" not in message
    assert cache.pairs == {}, "nothing of a corrupt file is taken"
