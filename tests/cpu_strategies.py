"""Strategies that Lightning allows on GPUs only, made runnable on CPU processes (gloo) for tests.

Lightning refuses `FSDPStrategy` unless the accelerator is CUDA (a check on the exact class, in its
accelerator connector); torch's FSDP itself runs on CPU with gloo. The subclass changes nothing else, so a
test on 2 CPU processes runs the trainer config's FSDP settings (wrap policy, sharding, state dict type).
"""

from __future__ import annotations

from lightning.pytorch.strategies import FSDPStrategy


class CPUFSDPStrategy(FSDPStrategy):
    """`FSDPStrategy`, accepted with `accelerator="cpu"` (process group backend gloo)."""

    def _setup_model(self, model):
        # Lightning passes `device_id=self.root_device.index` (None on CPU), and torch's FSDP then looks
        # for an accelerator; the CPU device is given explicitly. Otherwise as `FSDPStrategy._setup_model`.
        import torch
        from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model
