"""Reading FSDP2 checkpoints (rose_trl/checkpoints/fsdp.py) in one process, written by accelerate's own
FSDP2 save functions (what Trainer._save_checkpoint calls). One writer here; tests/test_fsdp.py (slow)
reads checkpoints that 2 sharded ranks wrote.
"""

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from accelerate import PartialState
from accelerate.utils import FullyShardedDataParallelPlugin, save_fsdp_model, save_fsdp_optimizer
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from rose_trl import ROSEConfig, ROSESelector
from rose_trl.checkpoints.fsdp import FSDPCheckpointError, read_fsdp_adam_moments
from rose_trl.gradients.capture import AdamState, MissingAdamStateError, trainable_parameters, trainer_param_index
from rose_trl.models.tiny import build_tiny_llama
from rose_trl.run.offline import load_checkpoint_adam, load_checkpoint_adapter, select_from_checkpoints, warmup_model
from tests.helpers import tiny_lora_model


KINDS = ("SHARDED_STATE_DICT", "FULL_STATE_DICT")


def warm(model, steps: int = 2) -> torch.optim.Optimizer:
    torch.manual_seed(1)
    opt = torch.optim.AdamW([p for _, p in trainable_parameters(model)], lr=1e-2, betas=(0.8, 0.95), eps=1e-7)
    for _ in range(steps):
        ids = torch.randint(3, 128, (2, 12))
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return opt


def save_fsdp(model, opt, checkpoint, kind: str) -> None:
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type=kind)
    save_fsdp_model(plugin, PartialState(cpu=True), model, str(checkpoint), adapter_only=True)
    save_fsdp_optimizer(plugin, PartialState(cpu=True), opt, model, str(checkpoint))


@pytest.mark.parametrize("kind", KINDS)
def test_adam_state_and_adapter_read_back_exactly(tmp_path, kind):
    model = tiny_lora_model()
    opt = warm(model)
    save_fsdp(model, opt, tmp_path, kind)
    read = load_checkpoint_adam(tmp_path, tiny_lora_model())
    live = AdamState.from_optimizer(opt, trainable_parameters(model))
    assert torch.equal(read.exp_avg, live.exp_avg) and torch.equal(read.exp_avg_sq, live.exp_avg_sq)
    assert (read.beta1, read.beta2, read.eps) == pytest.approx((0.8, 0.95, 1e-7))
    if kind == "SHARDED_STATE_DICT":
        fresh = tiny_lora_model(seed=5)
        weights = load_checkpoint_adapter(tmp_path, fresh)
        expected = get_peft_model_state_dict(model)
        assert weights.keys() == expected.keys()
        assert all(torch.equal(weights[k], expected[k]) for k in expected)


def test_sharded_checkpoint_of_another_adapter_is_refused(tmp_path):
    model = tiny_lora_model(r=4)
    save_fsdp(model, warm(model), tmp_path, "SHARDED_STATE_DICT")
    with pytest.raises(FSDPCheckpointError, match=r"has shape \(4, 64\), the model's LoRA weight \(8, 64\)"):
        load_checkpoint_adapter(tmp_path, tiny_lora_model(r=8))
    with pytest.raises(MissingAdamStateError, match="has 256 Adam values, the parameter has 512"):
        load_checkpoint_adam(tmp_path, tiny_lora_model(r=8))
    with pytest.raises(FSDPCheckpointError, match="holds no adapter weight"):
        load_checkpoint_adapter(
            tmp_path, tiny_lora_model(r=4, targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"))
        )


class _Planted:
    """Unpickling this would run `touch` on the marker path."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_metadata_pickle_cannot_run_code(tmp_path):
    model = tiny_lora_model()
    save_fsdp(model, warm(model), tmp_path, "SHARDED_STATE_DICT")
    marker = tmp_path / "ran"
    (tmp_path / "optimizer_0/.metadata").write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(FSDPCheckpointError, match="refused rather than run as code"):
        read_fsdp_adam_moments(tmp_path)
    assert not marker.exists()


def test_plain_values_are_read_with_weights_only(tmp_path):
    """DCP itself torch.loads non-tensor values with weights_only=False; a planted object must be refused."""
    import datetime

    import torch.distributed.checkpoint as dcp

    model = tiny_lora_model()
    opt = warm(model)
    save_fsdp(model, opt, tmp_path, "SHARDED_STATE_DICT")
    # Re-save the optimizer state with an object (allowed by pickle, not by weights_only) in place of eps.
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, opt)
    state["param_groups"][0]["eps"] = datetime.datetime(2026, 1, 1)
    dcp.save({"optimizer": state}, storage_writer=dcp.FileSystemWriter(str(tmp_path / "optimizer_0")), no_dist=True)
    with pytest.raises(
        FSDPCheckpointError, match="weights_only allows .*Unsupported global: GLOBAL datetime.datetime"
    ):
        read_fsdp_adam_moments(tmp_path)


def test_index_keyed_optimizer_bin_is_not_taken_for_fsdp(tmp_path):
    model = tiny_lora_model()
    torch.save(warm(model).state_dict(), tmp_path / "optimizer.bin")
    with pytest.raises(FSDPCheckpointError, match="keys its state by parameter index"):
        load_checkpoint_adam(tmp_path, model)


def test_sharded_checkpoint_needs_the_lora_config(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="no adapter_config.json .* pass the warm-up's LoRA config as peft_config"
    ):
        warmup_model(tmp_path, None)


def test_offline_selection_same_from_fsdp_and_plain_checkpoints(tmp_path, planted):
    """The same warm-up state saved in the plain Trainer layout (adapter_model.safetensors + optimizer.pt) and
    in both FSDP2 layouts selects the same rows with the same scores."""
    pool, validation, tokenizer, _ = planted
    base = build_tiny_llama(tokenizer, hidden=64, layers=2, seed=0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base, lora)
    opt = torch.optim.AdamW([p for _, p in trainable_parameters(model)], lr=1e-2)
    for _ in range(2):
        ids = torch.randint(3, len(tokenizer), (2, 16))
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    state = json.dumps(
        {"global_step": 2, "log_history": [{"step": 1, "learning_rate": 1e-2}, {"step": 2, "learning_rate": 5e-3}]}
    )
    plain = tmp_path / "plain/checkpoint-2"
    model.save_pretrained(plain)
    # optimizer.pt numbers parameters as the Trainer does (decay group first): reorder the live state accordingly.
    index = trainer_param_index(model)
    names = [n for n, _ in trainable_parameters(model)]
    sd = opt.state_dict()
    sd["state"] = {index[n]: sd["state"][i] for i, n in enumerate(names)}
    torch.save(sd, plain / "optimizer.pt")
    (plain / "trainer_state.json").write_text(state)
    for kind in KINDS:
        ckpt = tmp_path / kind / "checkpoint-2"
        save_fsdp(model, opt, ckpt, kind)
        if kind == "FULL_STATE_DICT":
            model.save_pretrained(ckpt)
        (ckpt / "trainer_state.json").write_text(state)
    assert not (tmp_path / "SHARDED_STATE_DICT/checkpoint-2/adapter_config.json").exists()

    def scores(run: str) -> pd.DataFrame:
        selector = ROSESelector(
            pool,
            validation,
            tokenizer,
            ROSEConfig(projection_dim=256, selection_fraction=0.1),
            tmp_path / f"out_{run}",
            max_length=64,
            use_cpu=True,
            progress=False,
        )
        fresh = build_tiny_llama(tokenizer, hidden=64, layers=2, seed=0)
        select_from_checkpoints(tmp_path / run, fresh, selector, peft_config=lora)
        return pd.read_parquet(tmp_path / f"out_{run}/selection/scores.parquet").sort_values("pool_index")

    reference = scores("plain")
    assert reference["score"].std() > 0
    for kind in KINDS:
        read = scores(kind)
        np.testing.assert_array_equal(read["score"].to_numpy(), reference["score"].to_numpy())
        assert (read["selected"].to_numpy() == reference["selected"].to_numpy()).all()


def test_saved_file_names_match_accelerate():
    """The layout names fsdp_checkpoint looks for are accelerate's."""
    from accelerate.utils.constants import FSDP_MODEL_NAME, OPTIMIZER_NAME

    from rose_trl.checkpoints.fsdp import FSDP_MODEL_DIR, FSDP_OPTIMIZER_DIR, FSDP_OPTIMIZER_FILE

    assert (f"{FSDP_MODEL_NAME}_0", f"{OPTIMIZER_NAME}_0", f"{OPTIMIZER_NAME}.bin") == (
        FSDP_MODEL_DIR,
        FSDP_OPTIMIZER_DIR,
        FSDP_OPTIMIZER_FILE,
    )


def test_final_save_under_sharded_fsdp_writes_the_adapter_whole(tmp_path):
    """Trainer.save_model writes no weights under SHARDED_STATE_DICT; the final save switches to FULL first."""
    from pathlib import Path
    from types import SimpleNamespace

    from rose_trl.run.pipeline import save_model_atomically

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    seen = []

    class FSDPTrainer:  # what save_model_atomically reads of a Trainer; save_model notes the state-dict type
        is_fsdp_enabled = True
        accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin))
        args = SimpleNamespace(should_save=True)

        def save_model(self, out):
            seen.append(plugin.state_dict_type.name)
            Path(out).mkdir(parents=True)
            (Path(out) / "adapter_model.safetensors").write_bytes(b"weights")

    save_model_atomically(FSDPTrainer(), tmp_path / "final")
    assert seen == ["FULL_STATE_DICT"]
    assert (tmp_path / "final/adapter_model.safetensors").read_bytes() == b"weights"


def test_metadata_allow_list_refuses_dotted_and_foreign_names():
    """Protocol-4 pickles resolve dotted names as attribute paths: `metadata.torch.load` would reach torch.load."""
    import io

    from rose_trl.checkpoints.fsdp import _MetadataUnpickler

    def global_(module, name):  # protocol 4: STACK_GLOBAL of two strings, then STOP
        s = lambda t: b"\x8c" + bytes([len(t)]) + t.encode()  # noqa: E731 (SHORT_BINUNICODE)
        return b"\x80\x04" + s(module) + s(name) + b"\x93."

    for module, name in [
        ("torch.distributed.checkpoint.metadata", "torch.load"),
        ("torch.distributed.checkpoint.metadata", "dataclass"),
        ("torch", "load"),
        ("os", "system"),
    ]:
        with pytest.raises(pickle.UnpicklingError, match="is not a DCP metadata type"):
            _MetadataUnpickler(io.BytesIO(global_(module, name))).load()
    from torch.distributed.checkpoint.metadata import Metadata

    assert (
        _MetadataUnpickler(io.BytesIO(global_("torch.distributed.checkpoint.metadata", "Metadata"))).load() is Metadata
    )
    assert _MetadataUnpickler(io.BytesIO(global_("torch", "float32"))).load() is torch.float32
