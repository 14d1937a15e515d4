"""ShapesDataModule: the synthetic world is built only when asked and only into an empty folder, and a
folder whose last build was interrupted is refused."""

from __future__ import annotations

import json

import pytest

from datamodules.shapes.datamodule import ShapesDataModule

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_the_synthetic_world_is_built_only_when_asked_and_only_into_an_empty_folder(processor, tmp_path):
    from datamodules.shapes.dataset import SyntheticDatasetError

    data = tmp_path / "data"
    settings = dict(data_dir=str(data), num_frames=2, synthetic_videos=4, processor=processor)
    ShapesDataModule(**settings).prepare_data()
    assert not data.exists(), "not asked for: nothing built"
    module = ShapesDataModule(**settings, synthetic=True)
    module.prepare_data()
    assert {p.name for p in data.iterdir()} >= {"train.jsonl", "val.jsonl", "test.jsonl", "synth.json"}
    train = (data / "train.jsonl").stat().st_mtime_ns
    module.prepare_data()
    assert (data / "train.jsonl").stat().st_mtime_ns == train, "a finished folder is used as it is"
    module.setup("fit")
    assert len(module.datasets["train"]) > 0

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.jsonl").write_bytes((data / "train.jsonl").read_bytes())
    with pytest.raises(SyntheticDatasetError, match="not empty and was not built by synth"):
        ShapesDataModule(**{**settings, "data_dir": str(mine)}, synthetic=True).prepare_data()
    assert [p.name for p in mine.iterdir()] == ["train.jsonl"]


def test_an_interrupted_synthetic_build_is_refused_by_the_datamodule(processor, synthetic_data, tmp_path):
    import shutil

    from datamodules.shapes.dataset import SyntheticDatasetError

    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    manifest = json.loads((data / "synth.json").read_text())
    (data / "synth.json").write_text(json.dumps({**manifest, "complete": False}))
    module = ShapesDataModule(data_dir=str(data), num_frames=2, processor=processor)
    with pytest.raises(SyntheticDatasetError, match="last synth build was interrupted.*rerun it to finish"):
        module.setup("fit")
