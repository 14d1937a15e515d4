"""Stage 0 of the embedded default: pretrain the tiny CLIP vision tower on labelled synthetic frames.

The tower sees a frame exactly as the video-LLM will (same size, normalisation, last-layer patch features
average-pooled to the video-token grid); linear heads read, for each pooled cell, the object that covers it
(shape, colour, size, motion, whether it touches another object, exact centre) or that none does. At the
end of `fit` the tower is saved for the tiny model's export (`python -m lightning_modules.tiny
--vision-tower`).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from datamodules.shapes.frames import LABELS
from lightning_modules.tiny import TinyArchitecture, tiny_vision_config

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VisionPretraining(L.LightningModule):
    """Dense supervised pretraining of a `CLIPVisionModel`.

    Each head (shape, colour, size, motion, contact) has a class 0, "no object here". Its loss has two terms:
    presence (class 0 against all other classes together) on every cell, and the attribute among the other
    classes on the cells that hold an object, so the few objects are not drowned by the many empty cells.
    An auxiliary head reads the shape under every patch before pooling (`patch_weight`): dense local
    evidence that makes the tower learn shape several times faster than the pooled cells alone.

    Hooks: `training_step`/`validation_step` share `model_step`; `on_train_end` saves the tower.
    """

    def __init__(
        self,
        tiny: TinyArchitecture | None = None,
        output_dir: str = "outputs/shapes/vision_tower",
        lr: float = 5e-3,
        weight_decay: float = 0.01,
        centre_weight: float = 10.0,
        patch_weight: float = 1.0,
    ):
        """
        Args:
            tiny: sizes of the tiny video-LLM whose tower this is (must match the sizes it is exported with).
            output_dir: where the pretrained `CLIPVisionModel` is saved at the end of training.
            lr, weight_decay: AdamW settings (one-cycle schedule over the run).
            centre_weight: weight of the centre regression next to the classification losses.
            patch_weight: weight of the auxiliary per-patch shape loss (0 turns it off).
        """
        super().__init__()
        from transformers import CLIPVisionModel

        self.save_hyperparameters()
        self.arch = tiny or TinyArchitecture()
        self.tower = CLIPVisionModel(tiny_vision_config(self.arch))
        self.heads = nn.Linear(self.arch.vision_hidden, sum(LABELS.values()) + 2)
        self.patch_head = nn.Linear(self.arch.vision_hidden, LABELS["shape"])
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 2g, 2g, D) last-layer patch features and (N, g, g, D) cells pooled 2 x 2 from them, as
        LLaVA-NeXT-Video pools them into video tokens."""
        x = (pixels.float() / 255.0 - self.mean) / self.std
        hidden = self.tower(pixel_values=x, output_hidden_states=True).hidden_states[-1][:, 1:]
        side = int(hidden.shape[1] ** 0.5)
        patches = hidden.view(-1, side, side, hidden.shape[-1])
        cells = F.avg_pool2d(patches.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        return patches, cells

    def cell_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.features(pixels)[1]

    def model_step(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        pixels, labels, patch_labels = batch
        patches, cells = self.features(pixels)
        out = self.heads(cells)
        occupied = labels[..., 0] > 0
        losses, accuracies, start = {}, {}, 0
        for index, (name, classes) in enumerate(LABELS.items()):
            logits, target = out[..., start : start + classes], labels[..., index].long()
            presence = torch.stack([logits[..., 0], logits[..., 1:].logsumexp(-1)], dim=-1)
            losses[f"{name}_presence"] = F.cross_entropy(presence.reshape(-1, 2), occupied.long().reshape(-1))
            losses[name] = F.cross_entropy(logits[occupied][:, 1:], target[occupied] - 1)
            predicted = logits.argmax(-1)
            accuracies[name] = ((predicted == target) & occupied).sum() / occupied.sum().clamp_min(1)
            if index == 0:
                empty = ~occupied
                accuracies["false_object"] = ((predicted > 0) & empty).sum() / empty.sum().clamp_min(1)
            start += classes
        # The centre of the cell's object in frame coordinates scaled to [-1, 1], and 0 for empty cells.
        centre = F.mse_loss(out[..., start : start + 2], labels[..., len(LABELS) : len(LABELS) + 2])
        losses["centre"] = self.hparams.centre_weight * centre
        if self.hparams.patch_weight:
            patch_logits = self.patch_head(patches)
            losses["patch_shape"] = self.hparams.patch_weight * F.cross_entropy(
                patch_logits.reshape(-1, patch_logits.shape[-1]), patch_labels.long().reshape(-1)
            )
        return {
            "loss": sum(losses.values()),
            **{f"loss_{k}": v for k, v in losses.items()},
            **{f"acc_{k}": v for k, v in accuracies.items()},
        }

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        out = self.model_step(batch)
        self.log("train/loss", out["loss"], prog_bar=True)
        return out["loss"]

    def validation_step(self, batch, batch_idx: int) -> None:
        out = self.model_step(batch)
        for key, value in out.items():
            self.log(f"val/{key}", value, prog_bar=key.startswith("acc_"))

    def concept_heads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The heads as concept detectors: each class row minus its head's class-0 ("no object") row.

        A row's output is the log-odds of "this cell holds an object with this attribute" against "no object
        here": negative on empty cells, positive for the object's own attributes. Class-0 rows become zero;
        the two centre rows are kept as they are.
        """
        weight, bias = self.heads.weight.detach().clone(), self.heads.bias.detach().clone()
        start = 0
        for classes in LABELS.values():
            weight[start : start + classes] -= weight[start].clone()
            bias[start : start + classes] -= bias[start].clone()
            start += classes
        return weight, bias

    def save_heads(self, folder: Path) -> None:
        """Save the concept heads with a word per class row, for `video_llm` to start its projector from.

        The two centre rows are axes: a centre further right (lower) in the frame moves the token from the
        word "left" ("above") towards "right" ("below").
        """
        from safetensors.torch import save_file

        from datamodules.shapes.frames import LABEL_VALUES

        classes = [name for head in LABELS for name in ["", *LABEL_VALUES[head]]] + ["", ""]  # + centre x, y
        weight, bias = self.concept_heads()
        tensors = {"weight": weight.contiguous(), "bias": bias.contiguous()}
        save_file(tensors, str(folder / "cell_heads.safetensors"))
        axes = [
            {"row": len(classes) - 2, "negative": "left", "positive": "right"},
            {"row": len(classes) - 1, "negative": "above", "positive": "below"},
        ]
        info = {"classes": classes, "axes": axes, "typical_logit": self.typical_logit()}
        (folder / "cell_heads.json").write_text(json.dumps(info, indent=2))

    @torch.no_grad()
    def typical_logit(self) -> float:
        """Mean winning concept log-odds on occupied cells of a validation batch (scales word projections)."""
        loader = self.trainer.datamodule.val_dataloader() if self.trainer.datamodule else None
        if loader is None:
            return 1.0
        pixels, labels, _ = next(iter(loader))
        weight, bias = self.concept_heads()
        out = F.linear(self.cell_features(pixels.to(self.device)), weight, bias)
        occupied = labels[..., 0].to(self.device) > 0
        winners, start = [], 0
        for classes in LABELS.values():
            winners.append(out[..., start + 1 : start + classes].max(-1).values[occupied])
            start += classes
        return float(torch.cat(winners).clamp_min(0).mean().clamp_min(1.0))

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        total = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.hparams.lr, total_steps=int(total), pct_start=0.1
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def save_tower(self, folder: str | Path) -> Path:
        """Save the tower and its concept heads; the folder is replaced as a whole (an interrupted save
        leaves the previous one)."""
        from lightning_modules.video_llm import replacing_folder

        with replacing_folder(folder) as temporary:
            self.tower.save_pretrained(temporary)
            self.save_heads(temporary)
        return Path(folder)

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            folder = self.save_tower(self.hparams.output_dir)
            print(f"saved the pretrained vision tower to {folder}")
