"""Checkpoints that hold every pipeline stage, keyed by the model's original names.

Each rank of a pipeline holds only its stages' layers, registered under their
*original* names (``layers.3.weight`` stays ``layers.3.weight`` on whichever rank
holds layer 3). A checkpoint is a directory written with
``torch.distributed.checkpoint`` (DCP) in which every entry is named that way:

    model.<parameter or buffer name>                  the weights
    optim.<i>.<parameter name>.<state key>            optimizer i's state of one parameter
    meta.pt                                           the rest of Lightning's checkpoint
                                                      (loops, callbacks, schedulers, param
                                                      groups with their full name lists)

Nothing in it depends on the split, so a checkpoint written with 2 stages loads
into 3 stages, or into one device after :func:`consolidate_checkpoint`. Optimizer
state is keyed by parameter *name*: optimizer indices differ from rank to rank and
from split to split.

Writes are atomic: every rank writes into a hidden sibling directory, rank 0 adds
``meta.pt`` last and only then renames it into place. A crash before the rename
leaves the previous checkpoint untouched; a crash between "move the old one aside"
and "move the new one in" (two renames on rank 0) leaves ``.<name>.old-*``, which
:func:`resolve_checkpoint_dir` finds.

Nothing here imports Lightning: the glue is in :class:`lightning_pp.PPStrategy`.
"""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    TensorStorageMetadata,
)

from lightning_pp.distributed.errors import named_failures
from lightning_pp.distributed.objects import barrier, broadcast_object

__all__ = [
    "META_FILENAME",
    "CheckpointWriteError",
    "consolidate_checkpoint",
    "gather_param_group_names",
    "indexed_to_named_optimizer_state",
    "is_sharded_checkpoint",
    "load_named_optimizer_state",
    "load_sharded_checkpoint",
    "named_optimizer_state",
    "param_order_key",
    "remove_checkpoint",
    "resolve_checkpoint_dir",
    "save_sharded_checkpoint",
]

#: Lightning's own name for the non-tensor part of a distributed checkpoint.
META_FILENAME = "meta.pt"
_FORMAT = "lightning_pp.sharded/1"
_MODEL = "model."
_OPTIM = "optim."

PathLike = Union[str, os.PathLike]


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the previous one at the same path is intact."""


def _last_line(failure: Any) -> str:
    """``"OSError: disk full"`` from one of DCP's ``(exception, traceback)`` pairs."""
    exc = failure[0] if isinstance(failure, tuple) and failure else failure
    return f"{type(exc).__name__}: {exc}"


# -- optimizer state by parameter name ------------------------------------------------------
def named_optimizer_state(optimizer: torch.optim.Optimizer, names: Mapping[int, str]) -> dict[str, Any]:
    """``optimizer.state_dict()`` with parameter names instead of indices.

    Args:
        optimizer: a torch optimizer over (some of) the module's parameters.
        names: ``id(parameter) -> name``.

    Returns:
        ``{"state": {name: {key: value}}, "param_groups": [{..., "params": [names]}]}``.
    """
    index_to_name: dict[int, str] = {}
    indexed = optimizer.state_dict()
    position = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            index_to_name[position] = _name_of(p, names)
            position += 1
    groups = []
    for group in indexed["param_groups"]:
        hyper = {k: v for k, v in group.items() if k != "params"}
        groups.append({**hyper, "params": [index_to_name[i] for i in group["params"]]})
    return {"state": {index_to_name[i]: dict(s) for i, s in indexed["state"].items()}, "param_groups": groups}


def load_named_optimizer_state(
    optimizer: torch.optim.Optimizer, named: Mapping[str, Any], names: Mapping[int, str]
) -> None:
    """Loads a name-keyed state (from :func:`named_optimizer_state`, any split) into ``optimizer``.

    Hyperparameters of group ``g`` (learning rate after a scheduler, betas, ...) come
    from the saved group ``g``; which parameters a group holds comes from ``optimizer``
    itself (the user's ``configure_optimizers`` on this rank's parameters). Parameters
    without saved state start fresh, as they would on one device.
    """
    saved_groups = list(named["param_groups"])
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"The checkpoint's optimizer has {len(saved_groups)} parameter groups but configure_optimizers() built "
            f"{len(optimizer.param_groups)}. Resume with the same optimizer setup as the run that saved it."
        )
    indexed = optimizer.state_dict()
    state: dict[int, Any] = {}
    position = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            saved = named["state"].get(_name_of(p, names))
            if saved is not None:
                state[position] = dict(saved)
            position += 1
    groups = []
    for current, saved in zip(indexed["param_groups"], saved_groups):
        merged = {k: v for k, v in saved.items() if k not in ("params", "param_names")}
        merged["params"] = current["params"]
        if "param_names" in current:
            merged["param_names"] = current["param_names"]
        groups.append(merged)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def indexed_to_named_optimizer_state(
    indexed: Mapping[str, Any], group_names: Sequence[Sequence[str]]
) -> dict[str, Any]:
    """Converts a one-device ``optimizer.state_dict()`` to names, given each group's full name list."""
    flat = [name for names in group_names for name in names]
    groups = []
    for group, names in zip(indexed["param_groups"], group_names):
        if len(group["params"]) != len(names):
            raise ValueError(
                f"An optimizer group of the checkpoint holds {len(group['params'])} parameters, but the model's "
                f"group holds {len(names)}: the checkpoint was saved for another model or optimizer setup."
            )
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": list(names)})
    return {"state": {flat[i]: dict(s) for i, s in indexed["state"].items()}, "param_groups": groups}


def _named_to_indexed(named: Mapping[str, Any], group_names: Sequence[Sequence[str]]) -> dict[str, Any]:
    """The one-device ``optimizer.state_dict()`` for parameters ordered as ``group_names``."""
    index: dict[str, int] = {}
    groups = []
    for saved, names in zip(named["param_groups"], group_names):
        params = []
        for name in names:
            index[name] = len(index)
            params.append(index[name])
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": params})
    state = {index[name]: s for name, s in named["state"].items() if name in index}
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def _name_of(p: torch.Tensor, names: Mapping[int, str]) -> str:
    try:
        return names[id(p)]
    except KeyError:
        raise ValueError(
            "An optimizer holds a tensor that is not a parameter of the LightningModule; lightning_pp checkpoints "
            "key optimizer state by parameter name. Build optimizers from self.parameters() (or named subsets)."
        ) from None


# -- one-device parameter order --------------------------------------------------------------
def param_order_key(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """For each local parameter name, a key that sorts names in the *unsplit* module's order.

    ``named_parameters()`` walks the module tree depth first: a module's own
    parameters, then each child in registration order. The key of ``a.b.w`` is the
    path of child positions to its module, then ``(-1, position of w)``, so a module's
    own parameters sort before its children's. A child named by a number (a layer
    of a Sequential or ModuleList) is placed by that number, which every split keeps
    (a pipelined Sequential registers only its layers, under their original
    indices). Every rank computes the key of its names, so merging the ranks' names
    by key gives the one-device order without any rank holding the whole model.
    """
    keys = {}
    for name, _ in module.named_parameters():
        *path, leaf = name.split(".")
        key: list[int] = []
        owner = module
        for part in path:
            key.append(int(part) if part.isdigit() else list(owner._modules).index(part))
            owner = owner._modules[part]  # type: ignore[assignment]
        keys[name] = (*key, -1, list(owner._parameters).index(leaf))
    return keys


def gather_param_group_names(
    optimizers: Sequence[torch.optim.Optimizer],
    names: Mapping[int, str],
    order: Mapping[str, tuple[int, ...]],
    group: Optional[dist.ProcessGroup],
) -> list[list[list[str]]]:
    """Each optimizer group's parameter names over the whole pipeline, in one-device order.

    A collective over ``group`` (the pipeline): every rank must call it.
    """
    local = [
        [[(order[_name_of(p, names)], _name_of(p, names)) for p in g["params"]] for g in opt.param_groups]
        for opt in optimizers
    ]
    gathered: list[Any] = [local]
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        gathered = [None] * dist.get_world_size(group)
        with named_failures("gather the optimizer's parameter names from every stage (checkpoint save)", group):
            dist.all_gather_object(gathered, local, group=group)
    result = []
    for o in range(len(optimizers)):
        groups = []
        for g in range(len(optimizers[o].param_groups)):
            merged: dict[str, tuple[int, ...]] = {}
            for rank_local in gathered:
                for key, name in rank_local[o][g]:
                    # A weight tied across stages is reported by each holder; the earliest place is one device's.
                    merged[name] = min(key, merged.get(name, key))
            groups.append(sorted(merged, key=merged.__getitem__))
        result.append(groups)
    return result


# -- save ----------------------------------------------------------------------------------
def is_sharded_checkpoint(path: PathLike) -> bool:
    """Whether ``path`` is a complete lightning_pp checkpoint directory."""
    path = Path(path)
    return path.is_dir() and (path / META_FILENAME).is_file() and (path / ".metadata").is_file()


def save_sharded_checkpoint(
    path: PathLike,
    checkpoint: Mapping[str, Any],
    *,
    param_group_names: Sequence[Sequence[Sequence[str]]],
    process_group: Optional[dist.ProcessGroup] = None,
    extra_meta: Optional[Mapping[str, Any]] = None,
) -> None:
    """Writes a Lightning checkpoint dict as a sharded, split-independent directory, atomically.

    Every rank calls it with its own ``checkpoint``: ``"state_dict"`` holds this rank's
    tensors under their original names; ``"optimizer_states"`` (if present) holds
    name-keyed states from :func:`named_optimizer_state`. Everything else is taken
    from global rank 0.

    Args:
        path: the checkpoint directory to create or replace (the same on every rank).
        checkpoint: this rank's Lightning checkpoint dict.
        param_group_names: per optimizer, per group, every parameter name in one-device
            order (from :func:`gather_param_group_names`), for consolidation.
        process_group: group of every rank (default: the world).
        extra_meta: stored under ``meta["lightning_pp"]`` (e.g. the pipeline layout).
    """
    path = Path(path)
    rank = dist.get_rank() if dist.is_initialized() else 0
    nonce = broadcast_object(
        uuid.uuid4().hex[:12] if rank == 0 else "",
        src=_first_rank(process_group),
        group=process_group,
        operation=f"agree on a staging directory for checkpoint {path}",
    )
    staging = path.parent / f".{path.name}.partial-{nonce}"
    flat: dict[str, Any] = {_MODEL + k: v for k, v in checkpoint["state_dict"].items()}
    optimizer_states = checkpoint.get("optimizer_states")
    meta = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
    groups_meta = []
    for i, named in enumerate(optimizer_states or []):
        for name, state in named["state"].items():
            for key, value in state.items():
                flat[f"{_OPTIM}{i}.{name}.{key}"] = value
        groups_meta.append(
            [
                {**{k: v for k, v in saved.items() if k != "params"}, "params": list(param_group_names[i][g])}
                for g, saved in enumerate(named["param_groups"])
            ]
        )
    meta["lightning_pp"] = {
        "format": _FORMAT,
        "optimizer_param_groups": groups_meta if optimizer_states is not None else None,
        **(extra_meta or {}),
    }
    try:
        if rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            staging.mkdir()
        barrier(process_group, operation=f"wait for rank 0 to create the staging directory of checkpoint {path}")
        try:
            with named_failures(f"write checkpoint {path} (torch.distributed.checkpoint)", process_group):
                dcp.save(flat, checkpoint_id=staging, process_group=process_group, no_dist=not dist.is_initialized())
        except CheckpointException as error:
            # DCP's error is a BaseException that lists every failed rank's traceback.
            failed = {rank: _last_line(trace) for rank, trace in error.failures.items()}
            raise CheckpointWriteError(
                f"Saving the checkpoint {path} failed on rank(s) {sorted(failed)} ({'; '.join(failed.values())}); "
                "the previous checkpoint at that path, if any, is unchanged."
            ) from error
        failure: Optional[BaseException] = None
        if rank == 0:
            try:
                # meta.pt last: a directory without it is not a checkpoint (is_sharded_checkpoint).
                _save_synced(meta, staging / META_FILENAME)
                _commit(staging, path, nonce)
            except Exception as error:  # noqa: BLE001 - re-raised below, after telling the other ranks
                failure = error
        # Every rank learns the outcome: a rank left in a barrier would wait out the timeout.
        outcome = broadcast_object(
            f"{type(failure).__name__}: {failure}" if failure else "",
            src=_first_rank(process_group),
            group=process_group,
            operation=f"learn from rank 0 whether checkpoint {path} was committed",
        )
        if failure is not None:
            raise failure
        if outcome:
            raise CheckpointWriteError(
                f"Saving the checkpoint {path} failed on rank 0 ({outcome}); the previous one is kept."
            )
    except BaseException:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def _commit(staging: Path, path: Path, nonce: str) -> None:
    """Moves ``staging`` to ``path``, replacing what was there."""
    aside = path.parent / f".{path.name}.old-{nonce}"
    if path.is_symlink() or path.is_file():
        os.replace(path, aside)
    elif path.exists():
        os.rename(path, aside)
    os.rename(staging, path)
    _fsync_dir(path.parent)
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    elif aside.exists() or aside.is_symlink():
        aside.unlink()


def _save_synced(obj: Any, file: Path) -> None:
    with open(file, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_checkpoint(path: PathLike) -> None:
    """Deletes a checkpoint directory (or file, or link). Call on one rank."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


# -- load ----------------------------------------------------------------------------------
def resolve_checkpoint_dir(path: PathLike) -> Path:
    """``path``, or the previous checkpoint a crash left aside while replacing it.

    Raises:
        FileNotFoundError: neither exists, or the directory is an unfinished write.
    """
    path = Path(path)
    if is_sharded_checkpoint(path):
        return path
    if path.is_dir():
        raise FileNotFoundError(
            f"{path} is a directory but not a complete lightning_pp checkpoint (no {META_FILENAME} or .metadata): "
            "the save that wrote it did not finish. Resume from an earlier checkpoint."
        )
    aside = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    aside = [p for p in aside if is_sharded_checkpoint(p)]
    if aside:
        warnings.warn(
            f"{path} is missing: a save was interrupted while replacing it. Loading the previous one, {aside[-1]}.",
            stacklevel=2,
        )
        return aside[-1]
    raise FileNotFoundError(f"No checkpoint at {path}.")


def load_sharded_checkpoint(
    path: PathLike,
    *,
    model_keys: Sequence[str],
    optimizer_param_names: Sequence[Sequence[str]],
    strict: bool = True,
    weights_only: Optional[bool] = None,
    process_group: Optional[dist.ProcessGroup] = None,
) -> dict[str, Any]:
    """Reads this rank's part of a checkpoint, whatever split wrote it.

    Args:
        path: checkpoint directory.
        model_keys: this rank's ``state_dict()`` keys (original names).
        optimizer_param_names: for each optimizer, the names of this rank's parameters.
        strict: fail on local keys the checkpoint lacks (else they are left as they are).
        weights_only: passed to ``torch.load`` for ``meta.pt`` (default ``False``: it holds
            the same objects as a Lightning checkpoint file).
        process_group: group of every rank (default: the world).

    Returns:
        A Lightning checkpoint dict whose ``"state_dict"`` holds this rank's tensors and
        whose ``"optimizer_states"`` are name-keyed (:func:`load_named_optimizer_state`).
    """
    path = resolve_checkpoint_dir(path)
    meta = torch.load(path / META_FILENAME, map_location="cpu", weights_only=bool(weights_only))
    info = meta.get("lightning_pp", {})
    if info.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a lightning_pp checkpoint (format {info.get('format')!r}).")
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    stored = metadata.state_dict_metadata
    missing = [k for k in model_keys if _MODEL + k not in stored]
    if missing and strict:
        raise KeyError(
            f"The checkpoint at {path} has no entry for {len(missing)} of this stage's tensors, e.g. "
            f"{', '.join(missing[:3])}: it was saved from a different model. Pass a matching checkpoint, or set "
            "strict_loading=False on the LightningModule to load the rest."
        )
    wanted = [_MODEL + k for k in model_keys if _MODEL + k in stored]
    groups = info.get("optimizer_param_groups")
    if groups is not None:
        for i, names in enumerate(optimizer_param_names):
            prefix, local = f"{_OPTIM}{i}.", set(names)
            # Parameter names are leaves (never a dotted prefix of another), state keys have no dots.
            wanted += [k for k in stored if k.startswith(prefix) and k[len(prefix):].rpartition(".")[0] in local]
    targets = _targets(stored, wanted)
    with named_failures(f"read checkpoint {path} (torch.distributed.checkpoint)", process_group):
        dcp.load(targets, checkpoint_id=path, process_group=process_group, no_dist=not dist.is_initialized())
    checkpoint = dict(meta)
    checkpoint["state_dict"] = {k[len(_MODEL):]: v for k, v in targets.items() if k.startswith(_MODEL)}
    if groups is not None:
        checkpoint["optimizer_states"] = [_named_from_flat(targets, i, groups[i]) for i in range(len(groups))]
    return checkpoint


def _targets(stored: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """Empty CPU tensors (or placeholders for pickled objects) to load ``keys`` into."""
    targets: dict[str, Any] = {}
    for key in keys:
        item = stored[key]
        if isinstance(item, TensorStorageMetadata):
            targets[key] = torch.empty(item.size, dtype=item.properties.dtype)
        elif isinstance(item, BytesStorageMetadata):
            targets[key] = None
        else:  # pragma: no cover - DCP has no other kind today
            raise TypeError(f"Unsupported checkpoint entry {key!r}: {type(item).__name__}")
    return targets


def _named_from_flat(flat: Mapping[str, Any], index: int, groups: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    prefix = f"{_OPTIM}{index}."
    names = {name for g in groups for name in g["params"]}
    state: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if not key.startswith(prefix):
            continue
        name, _, state_key = key[len(prefix):].rpartition(".")
        if name in names:
            state.setdefault(name, {})[state_key] = value
    return {"state": state, "param_groups": [dict(g) for g in groups]}


def consolidate_checkpoint(path: PathLike, output_path: Optional[PathLike] = None) -> dict[str, Any]:
    """Turns a lightning_pp checkpoint directory into one single-device Lightning checkpoint.

    Needs no process group and no GPU. The result is what plain Lightning writes:
    ``"state_dict"`` with the unchanged LightningModule's names, ``"optimizer_states"``
    indexed in the module's parameter order (``configure_optimizers`` over
    ``self.parameters()`` or named subsets of it), loops, callbacks and schedulers.

    Example::

        ckpt = lightning_pp.consolidate_checkpoint("ckpts/epoch=0-step=3.ckpt", "model.ckpt")
        model.load_state_dict(ckpt["state_dict"])              # plain PyTorch
        L.Trainer(devices=1).fit(model, data, ckpt_path="model.ckpt")   # resume on one device

    Args:
        path: the checkpoint directory PPStrategy wrote.
        output_path: if given, also ``torch.save`` the result there (a file).

    Returns:
        The consolidated checkpoint dict.
    """
    path = resolve_checkpoint_dir(path)
    meta = torch.load(path / META_FILENAME, map_location="cpu", weights_only=False)
    metadata: Metadata = dcp.FileSystemReader(str(path)).read_metadata()
    targets = _targets(metadata.state_dict_metadata, list(metadata.state_dict_metadata))
    dcp.load(targets, checkpoint_id=path, no_dist=True)
    checkpoint = {k: v for k, v in meta.items() if k != "lightning_pp"}
    checkpoint["state_dict"] = {k[len(_MODEL):]: v for k, v in targets.items() if k.startswith(_MODEL)}
    groups = meta["lightning_pp"].get("optimizer_param_groups")
    if groups is not None:
        names = [[list(g["params"]) for g in opt_groups] for opt_groups in groups]
        checkpoint["optimizer_states"] = [
            _named_to_indexed(_named_from_flat(targets, i, groups[i]), names[i]) for i in range(len(groups))
        ]
        # Lets PPStrategy map indices back to names when it resumes from this file.
        checkpoint["lightning_pp"] = {"optimizer_param_names": names}
    if output_path is not None:
        Path(output_path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(output_path).with_name(f".{Path(output_path).name}.partial-{uuid.uuid4().hex[:8]}")
        _save_synced(checkpoint, tmp)
        os.replace(tmp, output_path)
    return checkpoint


# -- small collectives ------------------------------------------------------------------------
def _first_rank(group: Optional[dist.ProcessGroup]) -> int:
    """The global rank of ``group``'s rank 0 (the world's when ``None``)."""
    return 0 if group is None or not dist.is_initialized() else dist.get_global_rank(group, 0)
