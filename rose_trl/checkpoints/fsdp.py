"""Adam's m and v, and the LoRA weights, from a checkpoint the Trainer saved under FSDP2 (accelerate's
`fsdp_version: 2`), read whole in one process whatever the number of ranks that wrote it.

`fsdp_state_dict_type: FULL_STATE_DICT`: rank 0 writes `optimizer.bin`, a torch.save of torch's
`get_optimizer_state_dict`, whose state is keyed by parameter name (the plain Trainer's optimizer.pt
numbers parameters instead); the adapter is saved as usual (adapter_model.safetensors).

`SHARDED_STATE_DICT`: every rank writes its shards into torch.distributed.checkpoint (DCP) folders:
`optimizer_0/` (the same name-keyed state, flattened to `optimizer.state.<name>.exp_avg`) and
`pytorch_model_fsdp_0/` (the adapter's PEFT state dict under `model.`), and no adapter_config.json.
DCP reassembles the shards into whole tensors; its `.metadata` file is a pickle and it reads non-tensor
values with `weights_only=False`. A checkpoint must not run code when read, so the metadata is unpickled
against an allow-list of DCP's own record types and every value is read with `weights_only=True`.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from rose_trl.gradients.capture import adam_hyperparameters
from rose_trl.utils.errors import UserError


FSDP_OPTIMIZER_FILE = "optimizer.bin"  # FULL_STATE_DICT
FSDP_OPTIMIZER_DIR = "optimizer_0"  # SHARDED_STATE_DICT (DCP)
FSDP_MODEL_DIR = "pytorch_model_fsdp_0"  # SHARDED_STATE_DICT (DCP)

_DCP_METADATA_TYPES = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class FSDPCheckpointError(UserError, ValueError):
    """A checkpoint folder that cannot be read as an FSDP optimizer or adapter state."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        # No dotted names (pickle would walk attributes: `metadata.torch.load`); the metadata module's own
        # record classes, torch dtypes and the few listed helpers only.
        if "." not in name:
            if module == "torch.distributed.checkpoint.metadata":
                found = super().find_class(module, name)
                if isinstance(found, type) and found.__module__ == module:
                    return found
            elif (module, name) in _DCP_METADATA_TYPES or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
            ):
                return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a DCP metadata type")


class _SafeReader(dcp.FileSystemReader):
    """DCP's file reader, with the metadata pickle read against the allow-list, once (the callers read it to
    plan what to load; dcp.load asks again)."""

    def __init__(self, path):
        super().__init__(path)
        self._metadata = None

    def read_metadata(self, *args, **kwargs):
        if self._metadata is None:
            self._metadata = self._unpickle_metadata()
        if getattr(self._metadata, "storage_meta", None) is not None:
            self._metadata.storage_meta.load_id = self.load_id  # as FileSystemReader does, after any reset()
        return self._metadata

    def _unpickle_metadata(self):
        path = Path(self.path) / ".metadata"
        if not path.is_file():
            raise FSDPCheckpointError(f"{self.path} is not a torch.distributed.checkpoint folder (no .metadata)")
        try:
            with open(path, "rb") as f:
                return _MetadataUnpickler(f).load()
        except Exception as e:  # a disallowed global, or a damaged file
            raise FSDPCheckpointError(
                f"{path} cannot be read as DCP metadata; objects outside DCP's own record "
                f"types are refused rather than run as code ({e})"
            ) from e


class _SafePlanner(DefaultLoadPlanner):
    """DCP's default planner, reading plain (non-tensor) values with weights_only into `self.plain` (dcp.load
    hands the planner a copy of the caller's dict, so only tensors, filled in place, would reach it)."""

    def __init__(self):
        super().__init__(flatten_state_dict=False)
        self.plain = {}

    def load_bytes(self, read_item, value):
        self.plain[read_item.dest_index.fqn] = torch.load(value, weights_only=True)


def _dcp_load(reader: _SafeReader, state_dict: dict) -> None:
    """Fill `state_dict` (flat DCP keys -> preallocated tensors, or None for a plain value) from the reader's
    folder, in this process alone (no collective, whatever process group is up)."""
    planner = _SafePlanner()
    try:
        with warnings.catch_warnings():  # one process on purpose: DCP warns that it assumes so
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(state_dict, storage_reader=reader, planner=planner, no_dist=True)
    except (Exception, CheckpointException) as e:  # CheckpointException (a BaseException) wraps the reading error
        cause = next(iter(getattr(e, "failures", {}).values()), (e,))[0]  # per rank: (exception, traceback)
        lines = str(cause).strip().splitlines() or [type(cause).__name__]
        reason = next((line.strip() for line in lines if re.search(r"error:", line, re.I)), lines[0])
        raise FSDPCheckpointError(
            f"{reader.path} cannot be read: a damaged shard, or a value outside the plain "
            f"types weights_only allows ({reason[:300]})"
        ) from e
    state_dict.update(planner.plain)


def _tensors_like(reader: _SafeReader, keys) -> dict:
    stored = reader.read_metadata().state_dict_metadata
    return {k: torch.empty(tuple(stored[k].size), dtype=stored[k].properties.dtype) for k in keys}


def read_fsdp_adam_moments(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], set]:
    """(exp_avg by parameter name, exp_avg_sq by name, {(beta1, beta2, eps), ...}) from a checkpoint's
    optimizer.bin (FULL_STATE_DICT) or optimizer_0/ (SHARDED_STATE_DICT)."""
    checkpoint = Path(checkpoint)
    path = checkpoint / FSDP_OPTIMIZER_FILE
    if path.is_file():
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise FSDPCheckpointError(
                f"{path} cannot be read as an optimizer state dict ({str(e).strip()[:200]})"
            ) from e
        state, groups = sd["state"], sd["param_groups"]
        if any(not isinstance(n, str) for n in state):
            raise FSDPCheckpointError(
                f"{path} keys its state by parameter index, not name: not an FSDP2 optimizer "
                "state (a plain Trainer saves optimizer.pt)"
            )
    else:
        state, groups = _read_dcp_optimizer(checkpoint / FSDP_OPTIMIZER_DIR)
    m = {n: s["exp_avg"] for n, s in state.items() if "exp_avg" in s}
    v = {n: s["exp_avg_sq"] for n, s in state.items() if "exp_avg_sq" in s}
    return m, v, {adam_hyperparameters(g) for g in groups}


def _read_dcp_optimizer(folder: Path) -> tuple[dict, list[dict]]:
    """The Adam moments and betas/eps of a DCP optimizer folder, nested as in `optimizer.state_dict()`:
    ({name: {"exp_avg", "exp_avg_sq"}}, [{"betas", "eps"}, ...])."""
    reader = _SafeReader(str(folder))
    keys = list(reader.read_metadata().state_dict_metadata)
    # Saved keys are flattened: optimizer.state.<name>.exp_avg, optimizer.param_groups.<i>.betas.
    moments = [k for k in keys if k.startswith("optimizer.state.") and k.endswith((".exp_avg", ".exp_avg_sq"))]
    hyper = [k for k in keys if k.startswith("optimizer.param_groups.") and k.endswith((".betas", ".eps"))]
    if not moments or not hyper:
        raise FSDPCheckpointError(
            f"{folder}: no Adam exp_avg/exp_avg_sq and betas/eps (not an Adam/AdamW state, or "
            "saved before the first step)"
        )
    sd = {**_tensors_like(reader, moments), **{k: None for k in hyper}}
    _dcp_load(reader, sd)
    state, groups = {}, {}
    for key, value in sd.items():
        owner, field = key.rsplit(".", 1)
        if key.startswith("optimizer.state."):
            state.setdefault(owner[len("optimizer.state.") :], {})[field] = value
        else:
            groups.setdefault(owner, {})[field] = value
    return state, list(groups.values())


def read_fsdp_adapter(checkpoint: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's weights from a checkpoint's pytorch_model_fsdp_0/ (SHARDED_STATE_DICT), for the PEFT
    state-dict keys and shapes of `expected` (peft's `get_peft_model_state_dict` of the model to load into)."""
    folder = Path(checkpoint) / FSDP_MODEL_DIR
    reader = _SafeReader(str(folder))
    stored = reader.read_metadata().state_dict_metadata
    for name, t in expected.items():
        entry = stored.get(f"model.{name}")
        if entry is None or not hasattr(entry, "size"):
            raise FSDPCheckpointError(
                f"{folder} holds no adapter weight '{name}': was it saved for this LoRA config "
                f"(and with adapter_only, as the Trainer does)?"
            )
        if tuple(entry.size) != tuple(t.shape):
            raise FSDPCheckpointError(
                f"{folder}: '{name}' has shape {tuple(entry.size)}, the model's LoRA weight "
                f"{tuple(t.shape)}: the checkpoint was written for a different adapter"
            )
    sd = _tensors_like(reader, [f"model.{n}" for n in expected])
    _dcp_load(reader, sd)
    return {k[len("model.") :]: t for k, t in sd.items()}
