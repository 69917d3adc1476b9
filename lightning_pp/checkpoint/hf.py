"""Reading a local Hugging Face checkpoint directory, only the tensors this rank holds.

A Hugging Face checkpoint directory holds ``config.json`` and the weights as
``model.safetensors``, or as shards listed by ``model.safetensors.index.json``
(tensor name -> shard file). :func:`load_hf_checkpoint` fills a module from it:

* into a module whose tensors exist (one device, or ``trainer.init_module(empty_init=True)``
  under a plain strategy), at once;
* into a module still on the meta device (built under ``PPStrategy``'s
  ``trainer.init_module(empty_init=True)``, or under ``torch.device("meta")``), later:
  the directory is recorded on the module, and ``PPStrategy`` reads it once the model
  is split, on each rank only the tensors of that rank's stage, opening only the
  shards that hold them (:func:`load_pending_hf_checkpoints`).

Each tensor's bytes are read from its file straight into the parameter (the
safetensors format is a JSON header and raw data), so a rank's memory holds its
stage and nothing more: no memory-mapped shard, no second copy. A weight saved once for
several names (``lm_head.weight`` tied to the token embedding is not stored) is read
under the name the checkpoint has. Nothing is ever downloaded.
"""

from __future__ import annotations

import io
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union, cast

import torch
from torch import Tensor, nn

__all__ = [
    "HFCheckpoint",
    "checkpoint_covers",
    "load_hf_checkpoint",
    "load_pending_hf_checkpoints",
    "pending_hf_checkpoints",
    "read_hf_tensors",
]

#: The attribute that records a checkpoint to read once a meta-device module is split.
_PENDING = "_lightning_pp_hf_checkpoint"
_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class HFCheckpoint:
    """A checkpoint directory's tensor names, and how to find a module's tensors in it.

    Attributes:
        directory: the checkpoint directory.
        weight_map: every tensor name in it -> the safetensors file holding it.
        aliases: for a module tensor name, the other names of the same tensor
            (weights shared by several modules, Hugging Face's tied weights).
        prefix: the module's ``base_model_prefix`` (``"model"``, ``"transformer"``), to
            match a checkpoint saved with or without the task head's wrapper.
    """

    directory: Path
    weight_map: dict[str, str]
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    prefix: str = ""

    def key_of(self, name: str) -> Optional[str]:
        """The checkpoint's name for module tensor ``name``, if it holds it."""
        for candidate in (name, *self.aliases.get(name, ())):
            for key in self._spellings(candidate):
                if key in self.weight_map:
                    return key
        return None

    def _spellings(self, name: str) -> tuple[str, ...]:
        if not self.prefix:
            return (name,)
        head = self.prefix + "."
        return (name, name[len(head):]) if name.startswith(head) else (name, head + name)


#: safetensors dtype names.
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _open_file(path: Path) -> io.BufferedReader:
    """Opens a safetensors file for reading (one place, so tests can see which files are opened)."""
    return open(path, "rb")


def _header(handle: io.BufferedReader) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets) and where its data starts.

    The format: an 8-byte little-endian header length, the JSON header, then the data.
    """
    (length,) = struct.unpack("<Q", handle.read(8))
    header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def _weight_map(directory: Path) -> dict[str, str]:
    index = directory / _INDEX
    if index.is_file():
        with open(index) as f:
            return dict(json.load(f)["weight_map"])
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{directory} holds no {_INDEX} and no *.safetensors file. Pass a local Hugging Face checkpoint directory "
            "(config.json + model.safetensors, or shards listed in model.safetensors.index.json), e.g. one written "
            "by model.save_pretrained(directory)."
        )
    found: dict[str, str] = {}
    for file in files:
        with open(file, "rb") as handle:
            found.update({key: file.name for key in _header(handle)[0]})
    return found


def _aliases(module: nn.Module) -> dict[str, tuple[str, ...]]:
    """Other names of each tensor: shared parameters, and Hugging Face's ``{tied: source}`` map."""
    by_id: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    aliases: dict[str, list[str]] = {}
    for names in by_id.values():
        for name in names:
            aliases.setdefault(name, []).extend(n for n in names if n != name)
    for owner_path, owner in module.named_modules():
        tied = getattr(owner, "all_tied_weights_keys", None) or getattr(owner, "_tied_weights_keys", None)
        if not isinstance(tied, dict):
            continue
        head = f"{owner_path}." if owner_path else ""
        for target, source in tied.items():
            if isinstance(target, str) and isinstance(source, str):
                aliases.setdefault(head + target, []).append(head + source)
                aliases.setdefault(head + source, []).append(head + target)
    return {name: tuple(dict.fromkeys(others)) for name, others in aliases.items()}


def _open(module: nn.Module, directory: Union[str, os.PathLike]) -> HFCheckpoint:
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory: pass a local Hugging Face checkpoint directory.")
    return HFCheckpoint(path, _weight_map(path), _aliases(module), str(getattr(module, "base_model_prefix", "") or ""))


def load_hf_checkpoint(module: nn.Module, directory: Union[str, os.PathLike], *, strict: bool = True) -> bool:
    """Fills ``module``'s parameters and buffers from a local Hugging Face checkpoint directory.

    The recipe for a model bigger than one process::

        trainer = L.Trainer(strategy=PPStrategy(), devices=4)
        with trainer.init_module(empty_init=True):   # meta device under PPStrategy: no memory
            model = LitLM(AutoConfig.from_pretrained(path))
        load_hf_checkpoint(model.model, path)        # under PPStrategy: each rank reads its stage in setup
        trainer.predict(model, loader)

    The same lines work on one device (``empty_init=True`` allocates there, and the
    weights are read at once).

    Args:
        module: the model, or the part of it the checkpoint describes (a
            ``transformers`` model: names as its ``state_dict``).
        directory: ``config.json`` and ``model.safetensors``, or shards with
            ``model.safetensors.index.json``. Only local files are read.
        strict: raise if the checkpoint lacks a tensor of the module (of the stage,
            when read per stage).

    Returns:
        ``True`` if the tensors were read now, ``False`` if the module is on the meta
        device and ``PPStrategy`` reads them per stage once it is split.

    Raises:
        FileNotFoundError: not a directory, or no safetensors in it.
        KeyError: ``strict`` and tensors missing (named in the message).
        ValueError: a tensor's shape differs from the checkpoint's.
    """
    checkpoint = _open(module, directory)
    if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
        object.__setattr__(module, _PENDING, (checkpoint, strict))
        return False
    read_hf_tensors(module, checkpoint, strict=strict)
    return True


def pending_hf_checkpoints(root: nn.Module) -> list[tuple[str, nn.Module, HFCheckpoint]]:
    """The modules of ``root`` waiting for a checkpoint to be read: ``(path, module, checkpoint)``."""
    return [
        (path, module, getattr(module, _PENDING)[0])
        for path, module in root.named_modules()
        if getattr(module, _PENDING, None) is not None
    ]


def checkpoint_covers(root: nn.Module) -> Callable[[str], bool]:
    """Whether a full ``state_dict`` name of ``root`` will be read from a pending checkpoint."""
    covered: set[str] = set()
    for path, module, checkpoint in pending_hf_checkpoints(root):
        head = f"{path}." if path else ""
        covered.update(head + name for name in module.state_dict(keep_vars=True) if checkpoint.key_of(name))
    return covered.__contains__


def load_pending_hf_checkpoints(root: nn.Module, *, where: str = "this rank") -> list[str]:
    """Reads every pending checkpoint of ``root`` into the tensors it now holds; returns the full names read."""
    read: list[str] = []
    for path, module, checkpoint in pending_hf_checkpoints(root):
        strict = getattr(module, _PENDING)[1]
        head = f"{path}." if path else ""
        read += [head + n for n in read_hf_tensors(module, checkpoint, strict=strict, where=where)]
        object.__delattr__(module, _PENDING)
    return read


def read_hf_tensors(
    module: nn.Module, checkpoint: HFCheckpoint, *, strict: bool = True, where: str = "the module"
) -> list[str]:
    """Copies the checkpoint's tensors into ``module``'s ``state_dict`` tensors; returns the names read.

    Opens only the files holding a wanted tensor, one at a time.
    """
    targets: dict[str, Tensor] = module.state_dict(keep_vars=True)
    by_file: dict[str, list[tuple[str, str]]] = {}
    missing: list[str] = []
    for name in targets:
        key = checkpoint.key_of(name)
        if key is None:
            missing.append(name)
        else:
            by_file.setdefault(checkpoint.weight_map[key], []).append((name, key))
    if missing and strict:
        shown = _summarise(missing)
        raise KeyError(
            f"The checkpoint {checkpoint.directory} has no tensor for {len(missing)} of the {len(targets)} tensors of "
            f"{where}: {shown}. It must be the checkpoint of this model's configuration (every tensor of every "
            "stage); pass strict=False to keep the initial values of tensors it lacks."
        )
    read: list[str] = []
    with torch.no_grad():
        for file, entries in by_file.items():
            path = checkpoint.directory / file
            with _open_file(path) as handle:
                header, data_start = _header(handle)
                for name, key in entries:
                    _read_tensor(handle, header[key], data_start, targets[name], f"{name} ({key!r} in {path})")
                    read.append(name)
    return read


def _summarise(names: list[str]) -> str:
    """``model.layers.3.*`` (12 tensors) for a whole block, the full name otherwise; at most 12 entries."""
    groups: dict[str, int] = {}
    for name in names:
        parts = name.split(".")
        cut = next((i for i, part in enumerate(parts[:-1]) if part.isdigit()), None)
        key = ".".join(parts[: cut + 1]) + ".*" if cut is not None else name
        groups[key] = groups.get(key, 0) + 1
    items = [f"{key} ({count} tensors)" if count > 1 else key for key, count in groups.items()]
    return ", ".join(items[:12]) + (f" and {len(items) - 12} more" if len(items) > 12 else "")


def _read_tensor(handle: io.BufferedReader, entry: dict[str, Any], data_start: int, target: Tensor, what: str) -> None:
    """Reads one tensor's bytes from an open safetensors file straight into ``target``.

    Plain reads, not a memory map: a mapped shard's pages would count in the process's
    memory until the file is closed, as much again as the stage being read.
    """
    dtype, shape = _DTYPES.get(entry["dtype"]), tuple(entry["shape"])
    if dtype is None:
        raise ValueError(f"{what}: unsupported safetensors dtype {entry['dtype']!r}.")
    if shape != tuple(target.shape):
        raise ValueError(
            f"{what} has shape {shape} in the checkpoint but {tuple(target.shape)} in the model: the checkpoint is of "
            "another configuration."
        )
    begin, end = entry["data_offsets"]
    handle.seek(data_start + begin)
    direct = target.dtype == dtype and target.device.type == "cpu" and target.is_contiguous()
    buffer = target.detach() if direct else torch.empty(shape, dtype=dtype)
    if end > begin:
        view = memoryview(cast(Any, buffer.reshape(-1).view(torch.uint8).numpy()))  # numpy stubs lack Buffer
        if handle.readinto(view) != end - begin:
            raise ValueError(f"{what}: the file ends before the tensor's data.")
    if not direct:
        target.detach().copy_(buffer)
