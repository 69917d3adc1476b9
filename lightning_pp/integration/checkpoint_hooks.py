"""``PPStrategy``'s checkpoint hooks; the on-disk format lives in :mod:`lightning_pp.checkpoint.sharded`.

Every rank writes its own stages (``torch.distributed.checkpoint``) under the
original parameter names, and optimizer state is keyed by parameter name, so a
checkpoint does not depend on the pipeline split.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from lightning.fabric.utilities.optimizer import _optimizer_to_device
from lightning.pytorch.core.optimizer import LightningOptimizer
from typing_extensions import override

from lightning_pp.checkpoint.sharded import (
    gather_param_group_names,
    indexed_to_named_optimizer_state,
    is_sharded_checkpoint,
    load_named_optimizer_state,
    load_sharded_checkpoint,
    named_optimizer_state,
    param_order_key,
    remove_checkpoint,
    save_sharded_checkpoint,
)
from lightning_pp.distributed.errors import named_failures
from lightning_pp.integration.strategy_state import PipelineStrategyState

__all__ = ["CheckpointMixin"]


class CheckpointMixin(PipelineStrategyState):
    """Checkpoint hooks of :class:`~lightning_pp.integration.strategy.PPStrategy`."""

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # Each rank reads only the layers it holds: the split must exist before loading.
        return True

    def _param_names(self) -> dict[int, str]:
        # A weight tied across stages goes by its one-device name on every holder.
        return {id(p): self._tied_names.get(id(p), name) for name, p in self.module.named_parameters()}

    def _param_group_names(self) -> list[list[list[str]]]:
        """Every optimizer group's parameter names over the pipeline, in one-device order (collective)."""
        order = param_order_key(self.module)
        for p_name, p in self.module.named_parameters():
            if id(p) in self._tied_names:  # placed where this copy is; the holder of the first name places it right
                order[self._tied_names[id(p)]] = order[p_name]
        group = self._pp_cpu_group or self._pp_group
        return gather_param_group_names(self.optimizers, self._param_names(), order, group)

    @override
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        # Keyed by parameter name: indices differ from stage to stage and split to split.
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        return named_optimizer_state(optimizer, self._param_names())

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        """Writes every stage's weights and optimizer state into the directory ``filepath`` (all ranks)."""
        if storage_options is not None:
            raise TypeError(
                "PPStrategy writes sharded checkpoints with torch.distributed.checkpoint and takes no storage_options."
            )
        with named_failures("agree on the checkpoint path with every rank (checkpoint save)"):
            path = self.broadcast(str(filepath))
        group_names = self._param_group_names() if "optimizer_states" in checkpoint else []
        save_sharded_checkpoint(
            path,
            checkpoint,
            param_group_names=group_names,
            extra_meta={"pipeline_parallel_size": self.pp_size, "world_size": self.world_size},
        )

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Reads this rank's stages from a PPStrategy checkpoint (any split) or a one-device checkpoint file."""
        with named_failures("agree on the checkpoint path with every rank (checkpoint load)"):
            path = self.broadcast(str(checkpoint_path))
        module = self.module
        names = self._param_names()
        local_names = [[names[id(p)] for g in opt.param_groups for p in g["params"]] for opt in self.optimizers]
        if os.path.isfile(path) and not is_sharded_checkpoint(path):
            # One-device Lightning checkpoint, or one made by consolidate_checkpoint.
            checkpoint = super().load_checkpoint(path, weights_only=weights_only)
            if self.optimizers and "optimizer_states" in checkpoint:
                saved = checkpoint.get("lightning_pp", {}).get("optimizer_param_names")
                group_names = saved or self._param_group_names()
                checkpoint["optimizer_states"] = [
                    indexed_to_named_optimizer_state(state, groups)
                    for state, groups in zip(checkpoint["optimizer_states"], group_names)
                ]
            return checkpoint
        return load_sharded_checkpoint(
            path,
            model_keys=list(module.state_dict()),
            optimizer_param_names=local_names,
            strict=module.strict_loading,
            weights_only=weights_only,
        )

    @override
    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        module = self.module
        local = set(module.state_dict())
        # A consolidated checkpoint holds every stage: keep this rank's layers.
        module.load_state_dict({k: v for k, v in checkpoint["state_dict"].items() if k in local}, strict=strict)

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        names = self._param_names()
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            load_named_optimizer_state(optimizer, state, names)
            _optimizer_to_device(optimizer, self.root_device)

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            remove_checkpoint(filepath)
