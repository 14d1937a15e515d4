"""`AlignmentModule`: SFT or DPO fine-tuning of a video-LLM, plus generation for `predict` and `test`.

With LoRA the DPO reference is the same model with its adapters disabled (one copy in memory); without LoRA it
is a frozen copy (`preference.DPOReference`). A DPO pair is one row, [prompt with video][chosen][rejected],
scored in one pass; the reference's log-probabilities are computed once before training and cached on disk
(`precompute_ref_log_probs`), after which a frozen copy is freed. `test` generates for every item and hands
the responses to an `AnswerabilityEvaluator` (judging, metrics, reports); for a LoRA model it also generates
with the adapters disabled, the model before alignment (the paper's f0), for the before/after scores.
"""

from __future__ import annotations

import functools
import inspect
import logging
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from transformers import GenerationConfig, get_cosine_schedule_with_warmup

from datamodules.batch_format import IGNORE_INDEX
from datamodules.collation import Example
from datamodules.records import write_predictions
from lightning_modules.evaluation import AnswerabilityEvaluator, gather_rows, read_before
from lightning_modules.losses import dpo_with_sft, preference_loss, sft_loss
from lightning_modules.preference import DPOReference, ReferenceCache, positions_spanned, score_pairs
from lightning_modules.run_folder import (
    RunCheckpoint,
    StopOnSigterm,
    check_model_settings,
    check_trainable_keys,
)
from lightning_modules.video_llm import (
    VideoLLMConfig,
    check_context,
    count_parameters,
    load_video_llm,
    model_inputs,
    save_hf,
    set_training_mode,
    vision_modules,
)
from lightning_modules.video_llm import disable_dropout as _disable_dropout
from metrics.judges import Judge
from metrics.runs import flat_metrics

log = logging.getLogger(__name__)


class AlignmentModule(L.LightningModule):
    """Fine-tunes a video-LLM for answerability.

    Hooks: `training_step`/`validation_step` share `model_step`; `on_train_start` installs the learning-rate
    schedule; `test_step` and `predict_step` generate; `test_step` hands the responses to `self.evaluator`
    and `on_test_epoch_end` writes its reports; `on_save_checkpoint` keeps only trainable weights and the
    model settings they belong to, which `on_load_checkpoint` checks against the config;
    `on_train_end` exports the model (a peft adapter with LoRA) for `from_pretrained`.
    """

    def __init__(
        self,
        model: VideoLLMConfig,
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
        before_predictions: str | None = None,
        output_dir: str | None = None,
        disable_dropout: bool | None = None,
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
            lr, weight_decay, warmup_steps: AdamW with linear warm-up then cosine decay (`warmup_cosine`).
            max_new_tokens: generation length for `predict` and `test` (greedy).
            judge: labels each response refused/correct/reason_ok (default: exact match, synthetic world).
            paired: in `test` of a LoRA model, also score the model before alignment (adapters disabled,
                the paper's f0) and the alignment scores.
            before_predictions: in `test`, take the responses of the model before alignment, and its refusal
                likelihoods when the file has them, from this predictions file (joined on `id`) instead: a
                `predict` file, or the predictions of an earlier paired `test` of the same base model
                (`evaluation.read_before`).
            output_dir: the run's folder: checkpoints, the exported model, `test`/`predict` files;
                defaults to the trainer's `default_root_dir`.
            disable_dropout: turn every dropout of the model off (each `nn.Dropout`, LoRA's `lora_dropout`
                included, and the dropout rates in the model's configs). None (default): on for DPO, off for
                SFT. As TRL's `disable_dropout=True`: with LoRA the reference pass (adapters disabled) has no
                adapter dropout, so dropout in the policy pass would put noise into DPO's log-ratios.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["judge"])
        self.config = model
        self.llm, self.processor = load_video_llm(self.config)
        if disable_dropout if disable_dropout is not None else objective == "dpo":
            _disable_dropout(self.llm)
        self.dpo_reference = DPOReference(self.uses_lora, model.name_or_path, model.num_frames)
        self.strict_loading = False  # checkpoints hold the trainable weights only
        self.evaluator = AnswerabilityEvaluator(judge)  # a submodule: its metrics follow the device and sync
        self._before_responses: dict[str, str] | None = None
        self._before_likelihoods: dict[str, float] | None = None
        self._window_tokens: torch.Tensor | int = 0  # response tokens of the SFT accumulation window so far
        trainable, total = count_parameters(self.llm)
        log.info("video-LLM %s: %d of %d parameters trainable", self.config.name_or_path, trainable, total)

    # ------------------------------------------------------------------------------------- helpers
    @property
    def uses_lora(self) -> bool:
        return self.config.lora is not None

    @property
    def reference(self) -> torch.nn.Module | None:
        """DPO's frozen reference copy (full fine-tuning, while it is needed), else None."""
        return self.dpo_reference.frozen

    @property
    def reference_cache(self) -> ReferenceCache | None:
        """DPO's cache of reference log-probabilities, once set up."""
        return self.dpo_reference.cache

    @property
    def out_dir(self) -> Path:
        return Path(self.hparams.output_dir or self.trainer.default_root_dir)

    def configure_callbacks(self) -> list[L.Callback]:
        # Checkpoints go to a fixed folder of the run, so `--ckpt_path last` finds them when resuming. One is
        # kept, written at every validation (mid-epoch with an int `val_check_interval`) and at each epoch's
        # end; `last.ckpt` links to it. (`save_top_k=0` would write `last.ckpt` at epoch ends only.)
        # `RunCheckpoint` makes the link atomically and saves a checkpoint on SIGTERM.
        return [
            RunCheckpoint(dirpath=self.out_dir / "checkpoints", save_last="link", save_top_k=1),
            StopOnSigterm(),
        ]

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # Records and ids ride along with the tensors but are plain Python: move only the rest.
        riders = ("records", "ids", "pair_digests")
        passengers = {k: batch.pop(k) for k in riders if isinstance(batch, dict) and k in batch}
        batch = super().transfer_batch_to_device(batch, device, dataloader_idx)
        batch.update(passengers)
        return batch

    def _inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return model_inputs(batch)

    def check_context(self, batch: dict[str, Any], new_tokens: int = 0) -> None:
        """A one-line `ContextError` naming the first record of the batch whose row (video tokens included, as
        the processor expands them; plus `new_tokens` to generate) spans more positions than the model takes.
        Run before every pass: for DPO the reference pass meets every training pair before training."""
        check_context(self.llm, positions_spanned(self.llm, batch), batch.get("records"), new_tokens)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.llm(**self._inputs(batch), use_cache=False).logits

    def setup(self, stage: str) -> None:
        self._uniform_dtype_for_fsdp()
        if stage == "fit" and self.hparams.objective == "dpo":
            self.dpo_reference.keep_frozen_copy(self.llm)  # full fine-tuning

    def on_fit_start(self) -> None:
        if self.hparams.objective == "dpo" and self.hparams.precompute_ref_log_probs:
            read = self._open_reference_cache()
            computed = self.dpo_reference.precompute_for_fit(
                self.trainer, self._reference_pass_logps, self._to_device, lockstep=self._sharded()
            )
            log.info("reference log-probabilities: %d pairs computed, %d read from %s", computed, read,
                     self.reference_cache.path)
        else:  # the reference pass checks every pair it computes against the context
            self._check_longest_rows()
        # Lightning keeps the modes modules have; a loaded checkpoint comes in eval mode (see
        # `set_training_mode`). The frozen reference copy stays in eval mode.
        set_training_mode(self.llm, self.config)
        if self.reference is not None:
            self.reference.eval()

    def _check_longest_rows(self) -> None:
        """Before training: the training and validation sets' `LONGEST_ROWS` longest rows by their text (a
        family's clips give alike numbers of video tokens) are collated with their clips and checked against
        the context, so that a row too long stops `fit` at setup, not hours into an epoch (DPO's reference
        pass, when it runs, checks every pair instead). Every row is still checked before its own pass."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is None:
            return
        loaders = [datamodule.train_dataloader()]
        if self.trainer.limit_val_batches != 0:
            loaders.append(datamodule.val_dataloader())
        for loader in loaders:
            dataset = loader.dataset
            lengths = [text_length(example) for example in dataset.examples]
            for index in sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)[:LONGEST_ROWS]:
                self.check_context(self._to_device(loader.collate_fn([dataset[index]])))

    def _sharded(self) -> bool:
        """Whether the model's weights are sharded by FSDP outside its root's forward (`fit` under FSDP)."""
        from lightning.pytorch.strategies import FSDPStrategy

        return (
            self._trainer is not None
            and isinstance(self.trainer.strategy, FSDPStrategy)
            and self.trainer.strategy.model is not self
        )

    def _uniform_dtype_for_fsdp(self) -> None:
        """FSDP flattens each unit's parameters into one tensor of one dtype, so a bf16 checkpoint with fp32
        LoRA adapters stops at wrap time ("Must flatten tensors with uniform dtype"). Under FSDP the model
        is cast to float32 before wrapping; `precision: bf16-mixed` still computes in bf16 (autocast), with
        fp32 master weights sharded across ranks."""
        from lightning.pytorch.strategies import FSDPStrategy

        if self._trainer is None or not isinstance(self.trainer.strategy, FSDPStrategy):
            return
        dtypes = {p.dtype for p in self.llm.parameters() if p.is_floating_point()}
        if len(dtypes) > 1:
            log.info("FSDP: the model's %s parameters cast to float32", sorted(map(str, dtypes)))
            self.llm.float()

    # ------------------------------------------------------------------------------------- DPO
    def pair_logps(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """`model`'s summed log-probabilities and token counts of a DPO batch's responses (chosen ones
        first), from one shared-prefix pass over its pair rows."""
        return score_pairs(model, batch)

    def reference_logps(self, batch: dict[str, Any]) -> torch.Tensor:
        """The DPO reference's log-probabilities of a batch's responses (chosen ones first), without grad."""
        self.check_context(batch)
        return self.dpo_reference.logps(self.llm, batch)

    def _reference_pass_logps(self, batch: dict[str, Any]) -> torch.Tensor:
        """`reference_logps` as the reference pass before training runs it: under FSDP through the root's
        forward (as Lightning runs `training_step`), since outside it the root unit's weights (embeddings,
        vision tower, projector, head) are shards; every rank must then make the same calls."""
        if not self._sharded():
            return self.reference_logps(batch)
        strategy = self.trainer.strategy
        return strategy._forward_redirection(strategy.model, self, "reference_logps", batch)

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.transfer_batch_to_device(batch, self.device, 0)

    def _open_reference_cache(self) -> int:
        """Set up the reference cache (in `reference_cache_dir`, else `<output_dir>/reference_logps`) and read
        its file; returns the number of pairs read."""
        folder = self.hparams.reference_cache_dir
        if folder is None and (self.hparams.output_dir or self._trainer is not None):
            folder = self.out_dir / "reference_logps"
        # Without a trainer the pass runs in the weights' own dtype, without autocast.
        precision = str(self.trainer.precision) if self._trainer is not None else str(self.llm.dtype)
        return self.dpo_reference.open_cache(folder, self.llm, self.processor, precision)

    def precompute_reference(self, batches: Any) -> int:
        """Compute (or take from the cache) the reference log-probabilities of these DPO batches' pairs;
        then a frozen reference copy is freed. Returns the number of pairs newly computed."""
        self._open_reference_cache()
        return self.dpo_reference.precompute(self.reference_logps, batches, self._to_device)

    # ------------------------------------------------------------------------------------ training
    def model_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        self.check_context(batch)
        if self.hparams.objective == "sft":
            labels = batch["labels"]
            loss, nll, tokens = sft_loss(self(batch), labels)  # this batch's token mean
            self.log(
                f"{stage}/loss", loss, prog_bar=True, batch_size=labels.shape[0], sync_dist=stage != "train"
            )
            if stage != "train" or not self._token_normalised_window():
                return loss
            # Summed NLL; `on_before_optimizer_step` divides the gradients by the window's response tokens.
            # Lightning divides what is returned by accumulate_grad_batches: undone here.
            self._window_tokens = self._window_tokens + tokens.detach()
            return nll * self.trainer.accumulate_grad_batches
        logps, counts = self.pair_logps(self.llm, batch)
        if self.hparams.precompute_ref_log_probs:
            ref_logps = self.dpo_reference.cached_logps(batch, logps)
        else:
            ref_logps = self.reference_logps(batch)  # inside the step, so inside FSDP's root forward
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
        values = {  # TRL's DPO names under the stage: train/rewards/margins, val/logps/chosen
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": logps[:half].detach().mean(),
            "logps/rejected": logps[half:].detach().mean(),
        }
        values = {f"{stage}/{k}": v for k, v in values.items()}
        self.log_dict(values, prog_bar=False, batch_size=half, sync_dist=stage != "train")
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=half, sync_dist=stage != "train")
        return loss

    def _token_normalised_window(self) -> bool:
        """Whether SFT gradients are normalised over all response tokens of the accumulation window (as
        transformers' Trainer and TRL do: summed token NLL / the window's token count, on all ranks together),
        rather than averaging micro-batch means. Not under DeepSpeed, which owns the gradients: there each
        micro-batch's token mean is used."""
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return self._trainer is not None and not isinstance(self.trainer.strategy, DeepSpeedStrategy)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        tokens = getattr(self, "_window_tokens", None)
        if not isinstance(tokens, torch.Tensor):
            return
        total = self.trainer.strategy.reduce(tokens.float(), reduce_op="sum")
        # DDP/FSDP average gradients over ranks: scaling by world size / global tokens gives sum / tokens.
        scale = self.trainer.world_size / total.clamp(min=1)
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    parameter.grad.mul_(scale.to(parameter.grad.dtype))
        self._window_tokens = 0

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Norm clipping under FSDP through the root's `clip_grad_norm_`, which computes the norm over every
        rank's shards: Lightning's FSDP precision plugin refuses norm clipping (`clip_grad_norm_` of torch.nn
        would clip each rank's shards by their own norm) and has no handle on the root. Else Lightning's."""
        from lightning.pytorch.utilities import GradClipAlgorithmType

        algorithm = GradClipAlgorithmType(gradient_clip_algorithm or "norm")
        if self._sharded() and gradient_clip_val and algorithm is GradClipAlgorithmType.NORM:
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_train_epoch_start(self) -> None:
        self._window_tokens = 0

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self.model_step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.model_step(batch, "val")

    def configure_optimizers(self):
        params = [p for p in self.llm.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        # A stand-in until `on_train_start` installs the warm-up + cosine schedule, whose length
        # (`estimated_stepping_batches`) builds the training loader: asked here, before a resumed run's loop
        # state is restored, the loader could not skip the batches a mid-epoch checkpoint already trained on.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        config = self.trainer.lr_scheduler_configs[0]
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        config.scheduler = warmup_cosine(
            config.scheduler.optimizer, self.hparams.warmup_steps, total, self.trainer.global_step
        )

    # --------------------------------------------------------------------------------- checkpoints
    def trainable_keys(self) -> set[str]:
        """The checkpoint keys of the trainable weights: "llm." and the parameter's name, without the
        prefixes of FSDP's wrappers (which the checkpoint's keys do not carry)."""
        wrappers = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
        names = [name for name, p in self.llm.named_parameters() if p.requires_grad]
        return {"llm." + functools.reduce(lambda n, w: n.replace(w, ""), wrappers, n) for n in names}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = self.trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint[MODEL_SETTINGS] = model_settings(self.config)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Checkpoints hold the trainable weights only, so the module loads with `strict_loading=False`, which
        # would drop a checkpoint of another model's weights without a word and score the initial one: the
        # checkpoint's model settings (from `on_save_checkpoint`; none in older checkpoints) and keys are
        # checked first. (DeepSpeed keeps the weights out of the checkpoint dict: then settings only.)
        path = self.trainer.ckpt_path if self._trainer is not None else None
        where = f"--ckpt_path {path}" if path else "the checkpoint"
        if checkpoint.get(MODEL_SETTINGS) is not None:
            check_model_settings(where, checkpoint[MODEL_SETTINGS], model_settings(self.config))
        if "state_dict" in checkpoint:
            check_trainable_keys(where, checkpoint["state_dict"], self.trainable_keys())

    def on_train_end(self) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        state = None
        if isinstance(self.trainer.strategy, FSDPStrategy):
            # Sharded parameters: every rank takes part in gathering the full state dict; rank 0 saves it.
            full = self.trainer.strategy.lightning_module_state_dict()
            state = {k.removeprefix("llm."): v for k, v in full.items() if k.startswith("llm.")}
        if self.trainer.is_global_zero:
            folder = save_hf(
                self.llm,
                self.processor,
                self.out_dir / "hf_model",
                {"base": self.config.name_or_path, "lora": self.uses_lora},
                state_dict=state,
            )
            log.info("exported the %s to %s", "adapter" if self.uses_lora else "model", folder)
            print(f"exported the {'LoRA adapter' if self.uses_lora else 'model'} to {folder}")

    # ---------------------------------------------------------------------------------- generation
    def greedy_generation_config(self) -> GenerationConfig:
        """Greedy decoding, whatever the checkpoint's `generation_config` holds: Qwen2.5-VL's ships
        repetition_penalty 1.05 (which `do_sample=False` alone leaves on) and top_p/top_k/temperature.
        Only its eos/pad/bos token ids are kept; the sampling settings are the library's neutral values
        (unused by greedy search)."""
        config = (self.llm.get_base_model() if self.uses_lora else self.llm).generation_config
        ids = {k: getattr(config, k, None) for k in ("eos_token_id", "pad_token_id", "bos_token_id")}
        return GenerationConfig(
            do_sample=False,
            num_beams=1,
            repetition_penalty=1.0,
            temperature=1.0,
            top_p=1.0,
            top_k=50,
            max_new_tokens=self.hparams.max_new_tokens,
            **ids,
        )

    def _hf_model(self) -> torch.nn.Module:
        """The Hugging Face model (a peft model's base model)."""
        return self.llm.get_base_model() if self.uses_lora else self.llm

    def _greedy(self, inputs: dict[str, Any], scores: bool = False) -> Any:
        """`generate`'s greedy output for model inputs (`return_dict_in_generate`); with `scores`, also the
        raw logits of every step (the first: the prompt's last position) and the cache."""
        config = self.greedy_generation_config()
        config.return_dict_in_generate, config.output_logits = True, scores
        return self.llm.generate(**inputs, generation_config=config)

    def _texts(self, output: Any, inputs: dict[str, Any]) -> list[str]:
        new_tokens = output.sequences[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [text.strip() for text in texts]

    @torch.no_grad()
    def generate(self, batch: dict[str, Any]) -> list[str]:
        """Greedy responses to a "generate" batch's prompts."""
        self.check_context(batch, self.hparams.max_new_tokens)
        inputs = self._inputs(batch)
        return self._texts(self._greedy(inputs), inputs)

    @torch.no_grad()
    def score(
        self, batch: dict[str, Any], inputs: dict[str, Any] | None = None
    ) -> tuple[list[str], torch.Tensor]:
        """Greedy responses and refusal likelihoods of a "generate" batch, from one prefill of each prompt.

        The refusal likelihood is the mean log-probability of the refusal opening (`batch["refusal_ids"]`,
        its tokens in context) given the video and question: its first token from the prefill's last logits
        (the first step of greedy decoding), the rest from a continuation of the prompt's KV cache, cropped
        back to the prompt after decoding. Generation is `generate`'s own, unchanged. `inputs`: the model
        inputs to use instead of the batch's (`video_features`' output, to share the vision pass).
        """
        self.check_context(batch, max(self.hparams.max_new_tokens, batch["refusal_ids"].shape[1]))
        inputs = self._inputs(batch) if inputs is None else inputs
        output = self._greedy(inputs, scores=True)
        opening = batch["refusal_ids"]
        valid = opening != IGNORE_INDEX
        first = torch.log_softmax(output.logits[0].float(), dim=-1).gather(1, opening[:, :1].clamp_min(0))
        logps = [first.squeeze(1)]
        if opening.shape[1] > 1:
            logits = self._continue(inputs, output.cache, opening[:, :-1].masked_fill(~valid[:, :-1], 0))
            rest = torch.log_softmax(logits.float(), dim=-1).gather(2, opening[:, 1:, None].clamp_min(0))
            logps.append(rest.squeeze(2).masked_fill(~valid[:, 1:], 0).sum(dim=1))
        likelihood = sum(logps) / valid.sum(dim=1).clamp_min(1)
        return self._texts(output, inputs), likelihood.float()

    def _continue(self, inputs: dict[str, Any], cache: Any, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of `tokens` appended to the prompts of `inputs`, read from `cache` (the prompts' keys and
        values, and possibly generated tokens after them, which are cropped off). Positions continue each
        prompt's as greedy decoding's do (for M-RoPE models, from the model's stored `rope_deltas`)."""
        width = inputs["input_ids"].shape[1]
        cache.crop(width - cache.get_seq_length())  # a negative count: the tokens to remove
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(inputs["input_ids"])
        mask = torch.cat([mask, torch.ones_like(tokens, dtype=mask.dtype)], dim=1)
        positions = mask.long().cumsum(-1)[:, width:] - 1
        model = self._hf_model()
        deltas = getattr(getattr(model, "model", None), "rope_deltas", None)
        if deltas is not None:  # Qwen2-VL / Qwen2.5-VL: [text; temporal; height; width] rows
            positions = torch.cat([positions[None], (positions + deltas)[None].expand(3, -1, -1)], dim=0)
        return self.llm(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache,
                        use_cache=True).logits

    def adapters_spare_vision(self) -> bool:
        """Whether the LoRA adapters leave the video features alone: no adapter layer (nor a peft
        `modules_to_save` copy) in the vision tower(s) or the multimodal projector, so disabling the adapters
        (the model before alignment) does not change them."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import ModulesToSaveWrapper

        model = self._hf_model()
        parts = [*vision_modules(model)]
        for holder in (model, getattr(model, "model", None)):
            projector = getattr(holder, "multi_modal_projector", None)
            if isinstance(projector, torch.nn.Module):
                parts.append(projector)
        adapted = (BaseTunerLayer, ModulesToSaveWrapper)
        return not any(isinstance(m, adapted) for part in parts for m in part.modules())

    def video_features(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """`inputs` with the video encoded: `pixel_values_videos` replaced by `mm_encoder_outputs`, the
        model's `get_video_features` output, exactly what `generate` computes before its prefill. Inputs of a
        model that cannot take them, or without a video, are returned as they are."""
        model = self._hf_model()
        encoder = getattr(model.base_model, "get_video_features", None)
        takes = "mm_encoder_outputs" in inspect.signature(model.forward).parameters
        if encoder is None or not takes or inputs.get("pixel_values_videos") is None:
            return inputs
        parameters = inspect.signature(encoder).parameters
        features = encoder(**{k: v for k, v in inputs.items() if k in parameters}, return_dict=True)
        rest = {k: v for k, v in inputs.items() if k != "pixel_values_videos"}
        return {**rest, "mm_encoder_outputs": {"video": features}}

    @torch.no_grad()
    def refusal_likelihood(self, batch: dict[str, Any]) -> torch.Tensor:
        """Mean log-probability of the refusal opening given the video and question (see `score`)."""
        return self.score(batch)[1]

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        return [{"id": i, "response": r} for i, r in zip(batch["ids"], self.generate(batch), strict=True)]

    def on_predict_epoch_end(self) -> None:
        rows = [row for batch in self.trainer.predict_loop.predictions for row in batch]
        rows = gather_rows(rows)
        if self.trainer.is_global_zero:
            path = self.out_dir / "predictions.jsonl"
            write_predictions(path, sorted(rows, key=lambda row: row["id"]))
            print(f"wrote {len(rows)} predictions to {path}")

    # ---------------------------------------------------------------------------------------- test
    def on_test_epoch_start(self) -> None:
        self.evaluator.reset()
        if self.hparams.before_predictions:
            self._before_responses, self._before_likelihoods = read_before(self.hparams.before_predictions)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Score the batch with the model under test and, paired, with the model before alignment: one
        prefill per model and item (`score`), and one vision pass per item when the adapters spare the
        vision tower and projector (`adapters_spare_vision`)."""
        records = batch["records"]
        inputs = self._inputs(batch)
        paired = self._before_responses is None and self.hparams.paired and self.uses_lora
        if paired and self.adapters_spare_vision():
            with torch.no_grad():
                inputs = self.video_features(inputs)
        after, after_likelihood = self.score(batch, inputs)
        before = before_likelihood = None
        if self._before_responses is not None:
            missing = [r.id for r in records if r.id not in self._before_responses]
            if missing:
                raise ValueError(
                    f"{self.hparams.before_predictions}: field 'id': no prediction for record {missing[0]!r}"
                )
            before = [self._before_responses[r.id] for r in records]
            if self._before_likelihoods is not None:
                values = [self._before_likelihoods[r.id] for r in records]
                before_likelihood = torch.tensor(values, device=after_likelihood.device)
        elif paired:
            with self.llm.disable_adapter():
                before, before_likelihood = self.score(batch, inputs)
        self.evaluator.update(records, after, after_likelihood, before, before_likelihood)

    def _test_file_order(self) -> list[str] | None:
        """The test items' record ids in the test file's order (the examples of the test loader's dataset), or
        None for a loader whose dataset does not list its examples."""
        loaders = self.trainer.test_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        examples = getattr(getattr(loader, "dataset", None), "examples", None)
        return None if examples is None else [example.record.id for example in examples]

    def on_test_epoch_end(self) -> None:
        results = self.evaluator.results()
        for key, value in flat_metrics(results, "test").items():
            self.log(key, value, rank_zero_only=True)
        paths = self.evaluator.write(self.out_dir, results, self.logger, order=self._test_file_order())
        if paths is not None:
            print(f"wrote {', '.join(str(p) for p in paths.values())}")
        self.evaluator.reset()


MODEL_SETTINGS = "model_settings"
"""The checkpoint key of the model settings its weights belong to (`model_settings`)."""


def model_settings(config: VideoLLMConfig) -> dict[str, Any]:
    """The settings a checkpoint's weights belong to, saved in it and checked on load: the base model and,
    with LoRA (None: full fine-tuning), the adapters' rank, scaling, target modules and fully trained modules.
    Not the objective: an SFT checkpoint may be scored or trained further with a DPO config."""

    def names(value: Any) -> Any:  # the order of module names does not matter to peft
        return sorted(value) if isinstance(value, (list, tuple)) else value

    lora = config.lora
    return {
        "name_or_path": str(config.name_or_path),
        "lora": None if lora is None else {
            "r": lora.r,
            "alpha": lora.alpha,
            "target_modules": names(lora.target_modules),
            "modules_to_save": names(lora.modules_to_save),
        },
    }


LONGEST_ROWS = 2  # rows of each split checked against the context before training


def text_length(example: Example) -> int:
    """Characters of an example's text (its questions and responses): what orders its rows by length."""
    records = (example.record, *example.follow_ups)
    return sum(len(r.question) + len(r.answer) for r in records) + len(example.rejected or "")


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_steps` optimizer steps, then cosine decay to 0 at `total_steps`.

    transformers' `get_cosine_schedule_with_warmup` one step ahead: optimizer step s (from 0) trains at
    min((s + 1) / (warmup + 1), 1) of the peak during the warm-up, not s / warmup, so no step is spent at a
    learning rate of 0. `step`: the optimizer steps already taken (those of a resumed run).
    """
    warmup = min(warmup_steps, total_steps - 1)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return get_cosine_schedule_with_warmup(optimizer, warmup + 1, total_steps + 1, last_epoch=step)
