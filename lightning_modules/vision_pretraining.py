"""Stage 0 of the embedded default: pretrain the tiny CLIP vision tower on labelled synthetic frames.

The tower sees a frame exactly as the video-LLM will (same size, normalisation, last-layer patch features
average-pooled to the video-token grid); linear heads read each pooled cell's object shape, colour, size,
motion and centre. At the end of `fit` the tower is saved for `VideoLLMConfig.vision_tower`.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from datamodules.scene_frames import LABELS
from lightning_modules.video_llm import TinyArchitecture, tiny_vision_config

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VisionPretraining(L.LightningModule):
    """Dense supervised pretraining of a `CLIPVisionModel`.

    Hooks: `training_step`/`validation_step` share `model_step`; `on_train_end` saves the tower.
    """

    def __init__(
        self,
        tiny: TinyArchitecture | None = None,
        output_dir: str = "outputs/shapes/vision_tower",
        lr: float = 2e-3,
        weight_decay: float = 0.01,
        centre_weight: float = 10.0,
    ):
        """
        Args:
            tiny: sizes of the tiny video-LLM whose tower this is (must match the later model config).
            output_dir: where the pretrained `CLIPVisionModel` is saved at the end of training.
            lr, weight_decay: AdamW settings (cosine decay over the run).
            centre_weight: weight of the centre regression next to the classification losses.
        """
        super().__init__()
        from transformers import CLIPVisionModel

        self.save_hyperparameters()
        self.arch = tiny or TinyArchitecture()
        self.tower = CLIPVisionModel(tiny_vision_config(self.arch))
        self.heads = nn.Linear(self.arch.vision_hidden, sum(LABELS.values()) + 2)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def cell_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, grid, grid, D) pooled last-layer patch features, as LLaVA-NeXT-Video pools them."""
        x = (pixels.float() / 255.0 - self.mean) / self.std
        hidden = self.tower(pixel_values=x, output_hidden_states=True).hidden_states[-1][:, 1:]
        side = int(hidden.shape[1] ** 0.5)
        spatial = hidden.view(-1, side, side, hidden.shape[-1]).permute(0, 3, 1, 2)
        return F.avg_pool2d(spatial, 2).permute(0, 2, 3, 1)

    def model_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        pixels, labels = batch
        out = self.heads(self.cell_features(pixels))
        losses, accuracies, start = {}, {}, 0
        for index, (name, classes) in enumerate(LABELS.items()):
            logits, target = out[..., start : start + classes], labels[..., index].long()
            occupied = target > 0
            if index == 0:  # shape also says whether a cell holds an object at all
                losses[name] = F.cross_entropy(logits.reshape(-1, classes), target.reshape(-1))
            else:  # the other attributes only where there is an object (most cells are empty)
                losses[name] = F.cross_entropy(logits[occupied], target[occupied])
            hit = (logits.argmax(-1) == target) & occupied
            accuracies[name] = hit.sum() / occupied.sum().clamp_min(1)
            start += classes
        occupied = labels[..., 0] > 0
        centre = out[..., start : start + 2][occupied]
        losses["centre"] = self.hparams.centre_weight * F.mse_loss(centre, labels[..., 4:6][occupied])
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

    def save_heads(self, folder: Path) -> None:
        """Save the probe heads with a word per class row, for `video_llm` to start its projector from."""
        from safetensors.torch import save_file

        from datamodules.scene_frames import LABEL_VALUES

        classes = [name for head in LABELS for name in ["", *LABEL_VALUES[head]]] + ["", ""]  # + centre x, y
        weight, bias = self.heads.weight.detach().clone(), self.heads.bias.detach().clone()
        tensors = {"weight": weight.contiguous(), "bias": bias.contiguous()}
        save_file(tensors, str(folder / "cell_heads.safetensors"))
        info = {"classes": classes, "typical_logit": self.typical_logit()}
        (folder / "cell_heads.json").write_text(json.dumps(info, indent=2))

    @torch.no_grad()
    def typical_logit(self) -> float:
        """Mean winning class logit on occupied cells of a validation batch (scales the word projection)."""
        loader = self.trainer.datamodule.val_dataloader() if self.trainer.datamodule else None
        if loader is None:
            return 1.0
        pixels, labels = next(iter(loader))
        out = self.heads(self.cell_features(pixels.to(self.device)))
        occupied = labels[..., 0].to(self.device) > 0
        winners, start = [], 0
        for classes in LABELS.values():
            winners.append(out[..., start : start + classes].max(-1).values[occupied])
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

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            folder = Path(self.hparams.output_dir)
            self.tower.save_pretrained(folder)
            self.save_heads(folder)
            print(f"saved the pretrained vision tower to {folder}")
