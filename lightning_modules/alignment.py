"""`AlignmentModule`: SFT or DPO fine-tuning of a video-LLM, plus generation for `predict` and `test`.

With LoRA the DPO reference is the same model with its adapters disabled (one copy in memory); without LoRA it
is a frozen copy. A DPO pair is one row, [prompt with video][chosen][rejected], scored in one pass
(`preference.py`); the reference's log-probabilities are computed once before training and cached on disk
(`precompute_ref_log_probs`), after which a frozen copy is freed. `test` judges every response, scores the
answerability metrics, and, for a LoRA model, also scores the adapters-disabled model (f0) in the same run for
the before/after scores.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import WandbLogger

from datamodules.answerability import read_predictions
from datamodules.records import write_jsonl
from lightning_modules.losses import dpo_with_sft, pair_logps, preference_loss, sequence_logps, sft_loss
from lightning_modules.preference import (
    ReferenceCache,
    pair_model_inputs,
    reference_identity,
    reference_weights,
)
from lightning_modules.video_llm import VideoLLMConfig, count_parameters, load_video_llm, save_hf
from metrics.answerability import (
    AnswerabilityAUROC,
    AnswerabilityMetrics,
    PairedAnswerabilityMetrics,
    category_ids,
)
from metrics.judges import ExactMatchJudge, Judge, JudgeItem
from metrics.report import log_to_wandb, paired_rows, prediction_row, write_reports

log = logging.getLogger(__name__)

MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "pixel_values_videos",
    "video_grid_thw",
    "mm_token_type_ids",
    "second_per_grid_ts",
    "pixel_values",
    "image_sizes",
)


class AlignmentModule(L.LightningModule):
    """Fine-tunes a video-LLM for answerability.

    Hooks: `training_step`/`validation_step` share `model_step`; `test_step` and `predict_step` generate;
    `on_test_epoch_end` writes the report; `on_save_checkpoint` keeps only trainable weights;
    `on_train_end` exports the model (a peft adapter with LoRA) for `from_pretrained`.
    """

    def __init__(
        self,
        model: VideoLLMConfig | None = None,
        objective: Literal["sft", "dpo"] = "sft",
        beta: float = 0.1,
        loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid",
        label_smoothing: float = 0.0,
        sft_weight: float = 0.0,
        precompute_ref_log_probs: bool = True,
        reference_cache_dir: str | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        max_new_tokens: int = 24,
        judge: Judge | None = None,
        paired: bool = True,
        f0_predictions: str | None = None,
        output_dir: str | None = None,
    ):
        """
        Args:
            model: which video-LLM to build and how (LoRA or full, frozen tower...).
            objective: "sft" (NLL of the gold response) or "dpo" (a preference loss against the reference).
            beta, loss_type, label_smoothing: preference-loss settings (see `losses.preference_loss`).
            sft_weight: weight of an SFT term on the chosen response added to the preference loss.
            precompute_ref_log_probs: DPO: compute the reference's log-probabilities of every training and
                validation pair once, before training, and cache them on disk (a resumed run reuses them);
                False runs the reference in every step.
            reference_cache_dir: folder of that cache (one file per reference model identity); defaults to
                `<output_dir>/reference_logps`.
            lr, weight_decay, warmup_steps: AdamW with linear warm-up then cosine decay.
            max_new_tokens: generation length for `predict` and `test` (greedy).
            judge: labels each response refused/correct/reason_ok (default: exact match, synthetic world).
            paired: in `test`, also score the model before alignment (adapters disabled): paired scores.
            f0_predictions: in `test`, take f0's responses from this predictions file (joined on `id`).
            output_dir: the run's folder: checkpoints, the exported model, `test`/`predict` files;
                defaults to the trainer's `default_root_dir`.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["judge"])
        self.config = model or VideoLLMConfig()
        self.llm, self.processor = load_video_llm(self.config)
        self.judge = judge or ExactMatchJudge()
        self.reference: torch.nn.Module | None = None
        self.reference_cache: ReferenceCache | None = None
        self.strict_loading = False  # checkpoints hold the trainable weights only
        self.test_metrics = torch.nn.ModuleDict(
            {
                "f1": AnswerabilityMetrics(),
                "f0": AnswerabilityMetrics(),
                "f1_auroc": AnswerabilityAUROC(),
                "f0_auroc": AnswerabilityAUROC(),
                "paired": PairedAnswerabilityMetrics(),
            }
        )
        self._rows: list[dict[str, Any]] = []
        self._f0_responses: dict[str, str] | None = None
        trainable, total = count_parameters(self.llm)
        log.info("video-LLM %s: %d of %d parameters trainable", self.config.name_or_path, trainable, total)

    # ------------------------------------------------------------------------------------- helpers
    @property
    def uses_lora(self) -> bool:
        return self.config.lora is not None

    @property
    def out_dir(self) -> Path:
        return Path(self.hparams.output_dir or self.trainer.default_root_dir)

    def configure_callbacks(self) -> list[L.Callback]:
        # Checkpoints go to a fixed folder of the run, so `--ckpt_path last` finds them when resuming. One is
        # kept, written at every validation (mid-epoch with an int `val_check_interval`) and at each epoch's
        # end; `last.ckpt` links to it. (`save_top_k=0` would write `last.ckpt` at epoch ends only.)
        from lightning.pytorch.callbacks import ModelCheckpoint

        return [ModelCheckpoint(dirpath=self.out_dir / "checkpoints", save_last="link", save_top_k=1)]

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # Records and ids ride along with the tensors but are plain Python: move only the rest.
        riders = ("records", "ids", "pair_digests")
        passengers = {k: batch.pop(k) for k in riders if isinstance(batch, dict) and k in batch}
        batch = super().transfer_batch_to_device(batch, device, dataloader_idx)
        batch.update(passengers)
        return batch

    def _inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in batch.items() if k in MODEL_INPUTS}

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.llm(**self._inputs(batch), use_cache=False).logits

    def _reference_context(self):
        return self.llm.disable_adapter() if self.uses_lora else nullcontext()

    def setup(self, stage: str) -> None:
        if (
            stage == "fit"
            and self.hparams.objective == "dpo"
            and not self.uses_lora
            and self.reference is None
            and self.reference_cache is None
        ):
            self.reference = copy.deepcopy(self.llm).eval().requires_grad_(False)

    # ------------------------------------------------------------------------------------- DPO
    def pair_logps(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """`model`'s summed log-probabilities and token counts of a DPO batch's responses (chosen ones
        first), from one shared-prefix pass over its pair rows."""
        if "pair_segments" not in batch:
            raise ValueError("a DPO batch needs pair rows (ChatCollator mode 'dpo'): no 'pair_segments'")
        inputs = pair_model_inputs(model, self._inputs(batch), batch)
        logits = model(**inputs, use_cache=False).logits
        return pair_logps(logits, batch["labels"], batch["pair_segments"])

    @torch.no_grad()
    def reference_pair_logps(self, batch: dict[str, Any]) -> torch.Tensor:
        """The reference's log-probabilities of a DPO batch's responses (chosen first), in eval mode."""
        if self.reference is None and not self.uses_lora:
            raise RuntimeError(
                "full fine-tuning DPO: the frozen reference copy was freed after the reference pass, and "
                "these pairs are not in its cache"
            )
        reference = self.reference if self.reference is not None else self.llm
        training = reference.training
        reference.eval()
        try:
            with self._reference_context():
                logps, _ = self.pair_logps(reference, batch)
        finally:
            reference.train(training)
        return logps

    def _reference_cache(self) -> ReferenceCache:
        folder = self.hparams.reference_cache_dir
        if folder is None and (self.hparams.output_dir or self._trainer is not None):
            folder = self.out_dir / "reference_logps"
        weights = reference_weights(self.llm, self.reference)
        config = self.config
        identity = reference_identity(config.name_or_path, config.num_frames, self.processor, weights)
        if dist.is_available() and dist.is_initialized():  # every rank names the same file
            shared = [identity]
            dist.broadcast_object_list(shared, src=0)
            identity = shared[0]
        return ReferenceCache(folder, identity)

    def precompute_reference(self, batches: Any) -> int:
        """Compute (or take from the cache) the reference log-probabilities of these DPO batches' pairs;
        then a frozen reference copy is freed. Returns the number of pairs newly computed."""
        if self.reference_cache is None:
            self.reference_cache = self._reference_cache()
            self.reference_cache.load()
        cache, computed = self.reference_cache, 0
        for batch in batches:
            if not cache.missing(batch["ids"], batch["pair_digests"]):
                continue
            batch = self.transfer_batch_to_device(dict(batch), self.device, 0)
            cache.add(batch["ids"], batch["pair_digests"], self.reference_pair_logps(batch))
            computed += len(batch["ids"])
        self.reference = None  # the log-probabilities are all the reference is needed for
        return computed

    def on_fit_start(self) -> None:
        if self.hparams.objective != "dpo" or not self.hparams.precompute_ref_log_probs:
            return
        trainer = self.trainer
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ValueError(
                "DPO with precompute_ref_log_probs reads the pairs from the LightningDataModule: fit with "
                "`datamodule=`, or set precompute_ref_log_probs=False to run the reference in every step"
            )
        loaders = [datamodule.train_dataloader()]
        if trainer.limit_val_batches != 0:
            loaders.append(datamodule.val_dataloader())
        read = 0
        if self.reference_cache is None:  # a second `fit` of this module keeps the first one's
            self.reference_cache = self._reference_cache()
            read = self.reference_cache.load()
        # This rank's share of each loader's items, in order, with the loader's collation.
        shares = [
            torch.utils.data.DataLoader(
                loader.dataset,
                batch_size=loader.batch_size,
                sampler=list(range(trainer.global_rank, len(loader.dataset), trainer.world_size)),
                collate_fn=loader.collate_fn,
                num_workers=loader.num_workers,
            )
            for loader in loaders
        ]
        computed = self.precompute_reference(itertools.chain(*shares))  # then a frozen copy is freed
        if trainer.world_size > 1:
            gathered: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(gathered, (self.reference_cache.pairs, computed))
            for pairs, _ in gathered:
                self.reference_cache.pairs.update(pairs)
            computed = sum(count for _, count in gathered)
        if trainer.is_global_zero and computed:
            self.reference_cache.save()
        trainer.strategy.barrier("reference log-probabilities")
        log.info(
            "reference log-probabilities: %d pairs computed, %d read from %s",
            computed,
            read,
            self.reference_cache.path,
        )

    # ------------------------------------------------------------------------------------ training
    def model_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        if self.hparams.objective == "sft":
            labels = batch["labels"]
            loss = sft_loss(self(batch), labels)
            self.log(
                f"{stage}/loss", loss, prog_bar=True, batch_size=labels.shape[0], sync_dist=stage != "train"
            )
            return loss
        logps, counts = self.pair_logps(self.llm, batch)
        if self.hparams.precompute_ref_log_probs:
            if self.reference_cache is None:
                raise RuntimeError(
                    "DPO with precompute_ref_log_probs: no reference log-probabilities; `fit` computes them "
                    "before training (or call `precompute_reference` with the batches)"
                )
            ids, digests = batch["ids"], batch["pair_digests"]
            ref_logps = self.reference_cache.lookup(ids, digests, logps.dtype, logps.device)
        else:
            ref_logps = self.reference_pair_logps(batch)
        half = logps.shape[0] // 2
        scale = counts.clamp_min(1) if self.hparams.loss_type == "ipo" else torch.ones_like(logps)
        losses, chosen_rewards, rejected_rewards = preference_loss(
            (logps / scale)[:half],
            (logps / scale)[half:],
            (ref_logps / scale)[:half],
            (ref_logps / scale)[half:],
            beta=self.hparams.beta,
            loss_type=self.hparams.loss_type,
            label_smoothing=self.hparams.label_smoothing,
        )
        loss = dpo_with_sft(losses, logps[:half], counts[:half], self.hparams.sft_weight)
        values = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": logps[:half].detach().mean(),
            "logps/rejected": logps[half:].detach().mean(),
        }
        if stage != "train":
            values = {f"{stage}_{k}": v for k, v in values.items()}  # e.g. val_rewards/margin
        self.log_dict(values, prog_bar=False, batch_size=half, sync_dist=stage != "train")
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=half, sync_dist=stage != "train")
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self.model_step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.model_step(batch, "val")

    def configure_optimizers(self):
        params = [p for p in self.llm.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warmup_steps, trainer = self.hparams.warmup_steps, self.trainer

        # The schedule's length is asked for at the first step, not here: asking Lightning here builds the
        # training loader before a resumed run's loop state is restored, and the loader then cannot skip the
        # batches that a mid-epoch checkpoint has already trained on (`ResumableDataLoader`).
        @functools.cache
        def warmup_and_total() -> tuple[int, int]:
            total = max(int(trainer.estimated_stepping_batches), 1)
            return min(warmup_steps, total - 1), total

        def factor(step: int) -> float:
            if step == 0:  # LambdaLR's call at construction
                return 1 / (warmup_steps + 1)
            warmup, total = warmup_and_total()
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {f"llm.{name}" for name, p in self.llm.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            folder = save_hf(
                self.llm,
                self.processor,
                self.out_dir / "hf_model",
                {"base": self.config.name_or_path, "lora": self.uses_lora},
            )
            log.info("exported the %s to %s", "adapter" if self.uses_lora else "model", folder)
            print(f"exported the {'LoRA adapter' if self.uses_lora else 'model'} to {folder}")

    # ---------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, batch: dict[str, Any]) -> list[str]:
        inputs = self._inputs(batch)
        output = self.llm.generate(**inputs, max_new_tokens=self.hparams.max_new_tokens, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [text.strip() for text in texts]

    @torch.no_grad()
    def refusal_likelihood(self, batch: dict[str, Any]) -> torch.Tensor:
        """Mean log-probability of the refusal opening given the video and question (one forward pass)."""
        refusal = dict(batch["refusal"])
        if "pixel_values_videos" in batch:
            refusal["pixel_values_videos"] = batch["pixel_values_videos"]
        labels = refusal.pop("labels")
        logits = self.llm(**self._inputs(refusal), use_cache=False).logits
        logps, counts = sequence_logps(logits, labels)
        return (logps / counts.clamp_min(1)).float()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        return [{"id": i, "response": r} for i, r in zip(batch["ids"], self.generate(batch), strict=True)]

    def on_predict_epoch_end(self) -> None:
        rows = [row for batch in self.trainer.predict_loop.predictions for row in batch]
        rows = _gather(rows)
        if self.trainer.is_global_zero:
            path = self.out_dir / "predictions.jsonl"
            write_jsonl(path, sorted(rows, key=lambda row: row["id"]))
            print(f"wrote {len(rows)} predictions to {path}")

    # ---------------------------------------------------------------------------------------- test
    def on_test_epoch_start(self) -> None:
        self._rows = []
        if self.hparams.f0_predictions:
            self._f0_responses = read_predictions(self.hparams.f0_predictions)

    def _score(self, name: str, batch: dict[str, Any], responses: list[str], likelihood: torch.Tensor | None):
        records = batch["records"]
        judgements = self.judge.judge_many(
            [
                JudgeItem(r.question, r.answer, response, r.answerable, r.missing_element)
                for r, response in zip(records, responses, strict=True)
            ]
        )
        device = self.device
        refused = torch.tensor([j.refused for j in judgements], device=device)
        correct = torch.tensor([j.correct for j in judgements], device=device)
        reason = torch.tensor([j.reason_ok for j in judgements], device=device)
        answerable = torch.tensor([r.answerable for r in records], device=device)
        category = category_ids([r.category for r in records]).to(device)
        self.test_metrics[name].update(refused, correct, answerable, category, reason)
        if likelihood is not None:
            self.test_metrics[f"{name}_auroc"].update(likelihood, answerable, category)
        return judgements, refused, correct, answerable

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        records = batch["records"]
        f1_responses = self.generate(batch)
        f1_likelihood = self.refusal_likelihood(batch)
        f1, f1_refused, f1_correct, answerable = self._score("f1", batch, f1_responses, f1_likelihood)
        f0 = f0_responses = f0_likelihood = None
        if self._f0_responses is not None:
            missing = [r.id for r in records if r.id not in self._f0_responses]
            if missing:
                raise ValueError(f"{self.hparams.f0_predictions}: no f0 prediction for record {missing[0]!r}")
            f0_responses = [self._f0_responses[r.id] for r in records]
        elif self.hparams.paired and self.uses_lora:
            with self.llm.disable_adapter():
                f0_responses = self.generate(batch)
                f0_likelihood = self.refusal_likelihood(batch)
        if f0_responses is not None:
            f0, f0_refused, f0_correct, _ = self._score("f0", batch, f0_responses, f0_likelihood)
            self.test_metrics["paired"].update(f0_refused, f0_correct, f1_refused, f1_correct, answerable)
        f1_rows = self._prediction_rows(records, f1_responses, f1, f1_likelihood)
        if f0 is None:
            self._rows.extend(f1_rows)
        else:
            f0_rows = self._prediction_rows(records, f0_responses, f0, f0_likelihood)
            self._rows.extend(paired_rows(f0_rows, f1_rows))

    @staticmethod
    def _prediction_rows(records, responses, judgements, likelihood) -> list[dict[str, Any]]:
        return [
            prediction_row(
                id=r.id,
                question=r.question,
                gold=r.answer,
                answerable=r.answerable,
                category=r.category,
                response=response,
                judgement=judgement,
                missing_element=r.missing_element,
                form=r.meta.get("form"),
                objects=r.meta.get("objects"),
                refusal_likelihood=None if likelihood is None else float(likelihood[i]),
            )
            for i, (r, response, judgement) in enumerate(zip(records, responses, judgements, strict=True))
        ]

    def test_results(self) -> dict[str, Any]:
        """The scores in metrics.json's structure: flat for one model, {f0, f1, paired} when paired."""

        def plain(*metrics) -> dict[str, float]:
            return {
                k: float(v) for metric in metrics if metric.update_called for k, v in metric.compute().items()
            }

        m = self.test_metrics
        f1 = plain(m["f1"], m["f1_auroc"])
        if not m["paired"].update_called:
            return f1
        return {"f0": plain(m["f0"], m["f0_auroc"]), "f1": f1, "paired": plain(m["paired"])}

    def on_test_epoch_end(self) -> None:
        results = self.test_results()
        flat = (
            {f"{group}/{k}": v for group, values in results.items() for k, v in values.items()}
            if ("paired" in results)
            else results
        )
        for key, value in flat.items():
            if not math.isnan(value):
                self.log(f"test/{key}", value, rank_zero_only=True)
        rows = _gather(self._rows)
        if self.trainer.is_global_zero:
            paths = write_reports(self.out_dir, rows, results)
            if isinstance(self.logger, WandbLogger):
                log_to_wandb(self.logger, results, rows, paths["report_png"])
            print(f"wrote {', '.join(str(p) for p in paths.values())}")
        for metric in self.test_metrics.values():
            metric.reset()


def _gather(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All ranks' rows on every rank (plain objects; metric states sync on their own)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    gathered: list[list[dict[str, Any]]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, rows)
    unique = {row["id"]: row for part in gathered for row in part}  # a padding sampler repeats items
    return list(unique.values())
