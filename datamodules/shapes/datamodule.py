"""`ShapesDataModule`: the answerability DataModule over the synthetic world, which it builds when asked.

The demo's configs name it; the real-data DataModule (`datamodules.answerability`) knows nothing of the
synthetic world.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from datamodules.answerability import AnswerabilityDataModule
from datamodules.shapes.dataset import SyntheticDatasetError, build_synthetic_dataset, check_synthetic_folder

log = logging.getLogger(__name__)


class ShapesDataModule(AnswerabilityDataModule):
    """`AnswerabilityDataModule` on a folder of the synthetic world: `prepare_data` builds the world there
    when `synthetic` asks for it, and `setup` refuses a folder whose last build did not finish."""

    def __init__(
        self,
        data_dir: str = "outputs/shapes/data",
        synthetic: bool = False,
        synthetic_videos: int = 3000,
        synthetic_split: tuple[float, float, float] = (0.9, 0.05, 0.05),
        **kwargs: Any,
    ):
        """
        Args:
            data_dir: the synthetic world's folder (`python -m datamodules synth --out DIR` builds one).
            synthetic: when the record files are missing (or the last build was interrupted), `prepare_data`
                builds the world in `data_dir`, into an empty folder or one `synth` built only; nothing is
                ever built over other files. Off, a missing record file is an error.
            synthetic_videos, synthetic_split: with `synthetic`, the number of clips and the train/val/test
                fractions (by clip) of the world `prepare_data` builds (its seed is `seed`).
            **kwargs: the arguments of `AnswerabilityDataModule`.
        """
        super().__init__(data_dir, **kwargs)

    def prepare_data(self) -> None:
        """With `synthetic`, build the world when its record files are missing or its last build was
        interrupted (rank 0 only, once). The builder refuses a folder it did not build."""
        if not self.hparams.synthetic or self._built():
            return
        log.info("building the synthetic dataset in %s", self.hparams.data_dir)
        build_synthetic_dataset(
            Path(self.hparams.data_dir),
            num_videos=self.hparams.synthetic_videos,
            seed=self.hparams.seed,
            fractions=tuple(self.hparams.synthetic_split),
        )

    def _built(self) -> bool:
        """Whether `data_dir` holds a finished build with the train, val and test files the settings name."""
        try:
            finished = check_synthetic_folder(self.hparams.data_dir) is not None
        except SyntheticDatasetError:
            return False
        wanted = [self.hparams.train_file, self.hparams.val_file, self.hparams.test_file]
        return finished and all(self._path(name).exists() for name in wanted if name)

    def _missing_file_advice(self) -> str:
        advice = super()._missing_file_advice()
        hint = " or synthetic: true to build the synthetic world there"
        return advice if self.hparams.synthetic else advice + hint

    def setup(self, stage: str | None = None) -> None:
        check_synthetic_folder(self.hparams.data_dir)
        super().setup(stage)
