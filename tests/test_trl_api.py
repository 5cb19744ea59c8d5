"""Fails loudly when a TRL/transformers/peft name this project relies on moves or disappears.

TRL's DPO internals change between releases (the loss moved into `_compute_loss` in 0.29); setup.py
pins a narrow range, and this test says exactly what broke when that range is widened.
"""

import inspect
import re

import pytest
import torch
import trl
from torch.utils.data import DataLoader
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

from rose_trl.config import DPO_LOSS_TYPES
from rose_trl.gradients.capture import trainable_parameters
from rose_trl.gradients.featurizer import Featurizer
from rose_trl.stores.validation import ROSEDPOTrainer, validation_dpo_config
from tests.helpers import Unprojected, trained_adapter_model


def raw_pair_gradients(trainer, model):
    return trainer.pair_gradients(Featurizer(Unprojected(sum(p.numel() for _, p in trainable_parameters(model)))))


def test_trl_version_in_pinned_range():
    major, minor = (int(x) for x in trl.__version__.split(".")[:2])
    assert (major, minor) == (1, 16), f"rose_trl is tested with trl 1.16.x, found {trl.__version__}"


def test_dpo_trainer_internals_used_by_rose_dpo_trainer():
    params = list(inspect.signature(DPOTrainer._compute_loss).parameters)
    assert params == ["self", "model", "inputs", "return_outputs"], params
    assert list(inspect.signature(DPOTrainer.compute_ref_log_probs).parameters) == ["self", "model", "inputs"]
    source = inspect.getsource(DPOTrainer.__init__)
    # The "ref" adapter copy we undo, and the names we read after __init__.
    assert 'add_adapter("ref"' in source
    for attr in ("beta", "loss_types", "precompute_ref_logps"):
        assert f"self.{attr} =" in source, attr
    fields = DataCollatorForPreference.__dataclass_fields__
    assert {"pad_token_id", "max_length", "truncation_mode"} <= set(fields)
    # The precomputed reference log-probs (read from the batch when precompute_ref_logps is set) ...
    loss_source = inspect.getsource(DPOTrainer._compute_loss)
    assert 'inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]' in loss_source
    assert "if self.precompute_ref_logps:" in loss_source
    # ... and the fused LM head's positions a tile, read at each call (validation.fused_head_tokens).
    from trl.kernels import chunked_logprob

    assert chunked_logprob.TOKEN_CHUNK_SIZE == 4096
    assert inspect.getsource(chunked_logprob).count("min(N, TOKEN_CHUNK_SIZE)") == 2


def test_dpo_loss_types_are_trls():
    """validation_loss_type accepts exactly the loss types TRL's _compute_loss implements."""
    source = inspect.getsource(DPOTrainer._compute_loss)
    assert sorted(re.findall(r'loss_type == "(\w+)"', source)) == sorted(DPO_LOSS_TYPES)
    for name in ("label_smoothing", "loss_weights", "discopop_tau"):
        assert name in trl.DPOConfig.__dataclass_fields__, name


def one_pair_gradients(trainer, model):
    """Reference: TRL's loss on one pair at a time, differentiated by autograd."""
    params = [p for _, p in trainable_parameters(model)]
    rows = []
    for inputs in DataLoader(trainer.train_dataset, batch_size=1, collate_fn=trainer.data_collator):
        loss = trainer.compute_loss(model, inputs)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, allow_unused=True)]))
    return torch.stack(rows)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_every_dpo_loss_type_gives_each_pair_its_own_gradient(loss_type, planted, tiny_base, tmp_path):
    """Batched (3 pairs a pass, or one for the losses that couple pairs) = TRL's loss on each pair alone."""
    _, validation, tokenizer, _ = planted
    model = trained_adapter_model(tiny_base)
    smoothing = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.1}.get(loss_type, 0.0)
    trainer = ROSEDPOTrainer(
        model,
        validation_dpo_config(
            str(tmp_path), batch_size=3, use_cpu=True, loss_type=loss_type, label_smoothing=smoothing
        ),
        validation,
        tokenizer,
    )
    assert trainer.loss_types == [loss_type]
    model.eval()
    grads = raw_pair_gradients(trainer, model)
    n_params = sum(p.numel() for _, p in trainable_parameters(model))
    assert grads.shape == (len(validation), n_params) and torch.isfinite(grads).all()
    ref = one_pair_gradients(trainer, model)
    assert (grads.norm(dim=1) > 0).all() and (ref.norm(dim=1) > 0).all(), loss_type  # hinge's zero: test below
    torch.testing.assert_close(grads, ref, rtol=1e-4, atol=1e-6 * ref.norm(dim=1).max().item())


def test_hinge_gives_an_exact_zero_once_the_margin_is_met(planted, tiny_base, tmp_path):
    _, validation, tokenizer, _ = planted
    model = trained_adapter_model(tiny_base)
    trainer = ROSEDPOTrainer(
        model,
        validation_dpo_config(str(tmp_path), beta=20.0, batch_size=3, use_cpu=True, loss_type="hinge"),
        validation,
        tokenizer,
    )
    model.eval()
    grads = raw_pair_gradients(trainer, model)
    with torch.no_grad():
        losses = torch.stack(
            [
                trainer.compute_loss(model, inputs)
                for inputs in DataLoader(trainer.train_dataset, batch_size=1, collate_fn=trainer.data_collator)
            ]
        )
    met = losses == 0  # relu(1 - beta * delta): beta * delta >= 1
    assert 0 < met.sum() < len(validation), losses
    assert (grads[met] == 0).all() and (grads[~met].norm(dim=1) > 0).all()


def test_configs_and_helpers_used_by_the_recipe():
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
    from trl import DPOConfig, ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config  # noqa: F401

    from rose_trl.utils import files

    assert files.PREFIX_CHECKPOINT_DIR == PREFIX_CHECKPOINT_DIR  # the Trainer's checkpoint-<step> folders

    dpo = DPOConfig.__dataclass_fields__
    for name in ("beta", "loss_type", "disable_dropout", "truncation_mode", "precompute_ref_log_probs", "max_length"):
        assert name in dpo, name
    for name in ("max_length", "completion_only_loss", "trust_remote_code"):
        assert name in SFTConfig.__dataclass_fields__, name
    for name in (
        "model_name_or_path",
        "dtype",
        "use_peft",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "lora_target_modules",
    ):
        assert name in ModelConfig.__dataclass_fields__, name
    assert "parse_args_and_config" in dir(TrlParser)


def test_transformers_and_peft_names():
    from peft import PeftModel, set_peft_model_state_dict  # noqa: F401
    from transformers import Trainer, TrainerCallback

    assert list(inspect.signature(Trainer.get_decay_parameter_names).parameters) == ["self", "model"]
    for hook in ("on_train_begin", "on_step_begin", "on_save", "on_train_end"):
        assert hasattr(TrainerCallback, hook)
    assert hasattr(PeftModel, "delete_adapter") and hasattr(PeftModel, "disable_adapter")


def test_deepspeed_and_fsdp_names():
    import importlib.util

    import pytest
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    assert hasattr(FSDPModule, "unshard") and hasattr(FSDPModule, "reshard") and hasattr(DTensor, "full_tensor")
    # rose_trl.checkpoints.fsdp: the Trainer's FSDP2 save path, and the DCP reader/planner hooks it overrides.
    import torch.distributed.checkpoint as dcp
    from accelerate.utils import save_fsdp_model
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from transformers.distributed.fsdp import get_fsdp_ckpt_kwargs

    assert get_fsdp_ckpt_kwargs() == {"adapter_only": True}
    assert "adapter_only" in inspect.signature(save_fsdp_model).parameters
    assert "no_dist" in inspect.signature(dcp.load).parameters
    assert list(inspect.signature(DefaultLoadPlanner.load_bytes).parameters) == ["self", "read_item", "value"]
    assert hasattr(dcp.FileSystemReader, "read_metadata")
    assert "path" in vars(dcp.FileSystemReader(".")) and "load_id" in vars(dcp.FileSystemReader("."))
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install -e '.[deepspeed]')")
    import deepspeed
    from deepspeed.utils import safe_get_full_optimizer_state, zero_to_fp32  # noqa: F401

    assert deepspeed.__version__.startswith("0.19."), deepspeed.__version__
    # rose_trl.checkpoints.zero hands Adam's partitions to these private zero_to_fp32 helpers.
    for name in ("get_model_state_files", "get_optim_files", "zero_model_state", "to_torch_tensor"):
        assert hasattr(zero_to_fp32, name), name
    assert {
        "buffers",
        "param_shapes",
        "shared_params",
        "ds_version",
        "frozen_param_shapes",
        "frozen_param_fragments",
    } <= set(inspect.signature(zero_to_fp32.zero_model_state).parameters)
    assert list(inspect.signature(zero_to_fp32._get_fp32_state_dict_from_zero2_checkpoint).parameters)[:5] == [
        "world_size",
        "fp32_flat_groups",
        "zero_model_states",
        "exclude_frozen_parameters",
        "param_alignment_paddings",
    ]
    assert list(inspect.signature(zero_to_fp32._get_fp32_state_dict_from_zero3_checkpoint).parameters)[:4] == [
        "world_size",
        "fp32_flat_groups",
        "zero_model_states",
        "exclude_frozen_parameters",
    ]


def test_trainer_schedule_names_used_to_recover_learning_rates():
    """rose_trl.checkpoints.schedules rebuilds the warm-up's schedule as the Trainer does and reads its saved state."""
    import torch
    from transformers import TrainingArguments, get_scheduler
    from transformers.trainer import SCHEDULER_NAME, TRAINING_ARGS_NAME

    from rose_trl.checkpoints.schedules import SCHEDULER_FILE, TRAINING_ARGS_FILE

    assert (SCHEDULER_NAME, TRAINING_ARGS_NAME) == (SCHEDULER_FILE, TRAINING_ARGS_FILE)
    assert list(inspect.signature(get_scheduler).parameters) == [
        "name",
        "optimizer",
        "num_warmup_steps",
        "num_training_steps",
        "scheduler_specific_kwargs",
    ]
    assert list(inspect.signature(TrainingArguments.get_warmup_steps).parameters) == ["self", "num_training_steps"]
    # the Trainer builds its scheduler from these arguments, and logs the LR before stepping the scheduler
    from transformers import Trainer

    create = inspect.getsource(Trainer.create_scheduler)
    assert "self.args.get_warmup_steps(num_training_steps)" in create and "self.args.lr_scheduler_kwargs" in create
    loop = inspect.getsource(Trainer._run_epoch)
    assert loop.index("learning_rate = self._get_learning_rate()") < loop.index("self.lr_scheduler.step()")
    state = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1)], lr=1.0), lambda k: 1.0).state_dict()
    assert {"base_lrs", "last_epoch", "_last_lr"} <= set(state)
