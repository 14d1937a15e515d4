"""The run folder (`lightning_modules/run_folder.py`): one writer at a time, a writable folder checked before
training, an atomic `last.ckpt` link, `last` found when the link was lost, and a checkpoint's model settings
compared with the config's."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from lightning_modules.run_folder import (
    LAST,
    CheckpointError,
    RunCheckpoint,
    RunFolderError,
    RunFolderLock,
    check_model_settings,
    last_checkpoint,
)


def test_a_second_lock_on_a_run_folder_is_refused_naming_the_holder(tmp_path):
    first = RunFolderLock(tmp_path / "run", "fit").acquire()
    with pytest.raises(RunFolderError, match=rf"{tmp_path / 'run'}: another command is writing this run "
                                             rf"folder \(pid {os.getpid()}, fit\)"):
        RunFolderLock(tmp_path / "run", "test").acquire()
    first.release()
    RunFolderLock(tmp_path / "run", "test").acquire().release()  # free again once released


def test_a_run_folder_that_cannot_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RunFolderError, match=rf"{blocker / 'run'}: the run folder cannot be written"):
        RunFolderLock(blocker / "run", "fit").acquire()


def test_a_read_only_run_folder_is_refused(tmp_path, monkeypatch):
    """An earlier run's lock file can still be opened in a folder that is now read-only: a new file is tried.
    (Here as root a chmod does not stop writes, so the new file's creation is made to fail.)"""
    RunFolderLock(tmp_path, "fit").acquire().release()
    real_touch = type(tmp_path).touch

    def read_only(path, *args, **kwargs):
        if path.name.startswith(".write-check-"):
            raise PermissionError(13, "Read-only file system")
        return real_touch(path, *args, **kwargs)

    monkeypatch.setattr(type(tmp_path), "touch", read_only)
    with pytest.raises(RunFolderError, match="cannot be written \\(Read-only file system\\)"):
        RunFolderLock(tmp_path, "fit").acquire()


def _trainer() -> SimpleNamespace:
    return SimpleNamespace(is_global_zero=True, strategy=SimpleNamespace(barrier=lambda *a: None))


def test_last_link_is_replaced_atomically(tmp_path, monkeypatch):
    """Killed while the new link is made, `last.ckpt` still names the old checkpoint (Lightning's own
    `_link_checkpoint` removes it first and leaves none)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    old, new = tmp_path / "epoch=0-step=2.ckpt", tmp_path / "epoch=0-step=4.ckpt"
    old.write_bytes(b"old")
    new.write_bytes(b"new")
    link = tmp_path / LAST
    RunCheckpoint._link_checkpoint(_trainer(), str(old), str(link))
    assert link.is_symlink() and link.read_bytes() == b"old"

    def killed(*args):
        raise KeyboardInterrupt  # the process ends here

    monkeypatch.setattr(os, "symlink", killed)
    with pytest.raises(KeyboardInterrupt):
        RunCheckpoint._link_checkpoint(_trainer(), str(new), str(link))
    assert link.read_bytes() == b"old"
    with pytest.raises(KeyboardInterrupt):
        ModelCheckpoint._link_checkpoint(_trainer(), str(new), str(link))
    assert not os.path.lexists(link), "what Lightning's own link does"
    monkeypatch.undo()
    RunCheckpoint._link_checkpoint(_trainer(), str(new), str(link))
    assert link.read_bytes() == b"new" and os.readlink(link) == new.name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([old.name, new.name, LAST]), "no leftovers"


def test_last_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    assert last_checkpoint(tmp_path) is None
    older, newer = tmp_path / "epoch=0-step=2.ckpt", tmp_path / "epoch=0-step=4.ckpt"
    older.write_bytes(b"a")
    newer.write_bytes(b"b")
    os.utime(older, ns=(1, 1))
    (tmp_path / LAST).symlink_to("epoch=0-step=6.ckpt")  # removed before the link was remade
    assert last_checkpoint(tmp_path) == newer
    (tmp_path / LAST).unlink()
    (tmp_path / LAST).symlink_to(older.name)
    assert last_checkpoint(tmp_path) == tmp_path / LAST


def test_model_settings_match_across_spellings_of_one_base_folder(tmp_path, monkeypatch):
    """A base folder given relative in one run and absolute in the other is the same base; another folder,
    or another LoRA setting, is named."""
    (tmp_path / "base").mkdir()
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path)
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "modules_to_save": []}
    saved = {"name_or_path": "./base", "lora": lora}
    check_model_settings("ckpt", saved, {"name_or_path": str(tmp_path / "base"), "lora": dict(lora)})
    differences = (r"\(model.name_or_path './base' in the checkpoint, 'other' in the config; "
                   r"model.lora.alpha 8 in the checkpoint, 16 in the config\)")
    with pytest.raises(CheckpointError, match=differences):
        check_model_settings("ckpt", saved, {"name_or_path": "other", "lora": {**lora, "alpha": 16}})
