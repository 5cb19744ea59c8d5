"""The memory budget and the estimates it sizes passes with.

rose_trl/resources/memory.py (the estimates) and rose_trl/resources/budget.py (the plan).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rose_trl import budget as budget_module
from rose_trl.resources.budget import MemoryBudget, halving_on_oom, plan_passes
from rose_trl.resources.memory import LoraShape, ModelShape, estimate_pass, estimate_peak_bytes, largest_rows
from rose_trl.resources.training_memory import check_training
from tests.helpers import tiny_lora_model


GB = 1e9
SLACK = budget_module.HEAP_SLACK


@pytest.fixture(autouse=True)
def default_heap(monkeypatch):
    """Each test starts with glibc's default heap, and a compact heap is only recorded (mallopt would change this
    test process's allocator for the tests that follow): `compacted` counts the calls."""
    monkeypatch.setattr(budget_module, "_heap", {"mode": "default"})
    calls = []

    def compact():
        calls.append(1)
        budget_module._heap["mode"] = "compact"
        return True

    monkeypatch.setattr(budget_module, "compact_heap", compact)
    return calls


def test_shapes_count_what_the_model_holds():
    from transformers import LlamaConfig

    model = tiny_lora_model(vocab=300, hidden=64, layers=3, heads=4, r=4)
    shape, lora = ModelShape.from_model(model), LoraShape.from_model(model)
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    assert shape.parameters == base
    assert ModelShape.from_config(model.get_base_model().config).parameters == base  # counted from the config alone
    assert lora.parameters(shape) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora.targets == ("k_proj", "o_proj", "q_proj", "v_proj")
    gqa = ModelShape.from_config(
        LlamaConfig(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            tie_word_embeddings=True,
        )
    )
    assert gqa.parameters == 134_515_008  # SmolLM2-135M's count
    with pytest.raises(ValueError, match="LoRA targets"):
        LoraShape(r=8, targets=("qkv_proj",))


def test_estimates_grow_with_the_pass_and_pick_the_loss_path():
    shape = ModelShape.from_config(
        SimpleNamespace(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            model_type="llama",
        )
    )
    lora = LoraShape(r=8)
    one = estimate_pass("gradient", shape, lora, "float32", 1, 256)
    four = estimate_pass("gradient", shape, lora, "float32", 4, 256)
    assert four.transient > 2 * one.transient and one.parts["weights"] == four.parts["weights"]
    # The plain loss's logits grow with the rows; the chunked loss holds two chunks whatever the rows.
    plain = estimate_pass("gradient", shape, lora, "float32", 4, 256, loss="plain")
    assert plain.transient > four.transient
    half = estimate_pass("gradient", shape, lora, "bfloat16", 4, 256)
    assert half.parts["weights"] == one.parts["weights"] // 2 and half.parts["activations"] < four.parts["activations"]
    with pytest.raises(ValueError, match="unknown pass kind"):
        estimate_pass("inference", shape, lora, "float32", 1, 8)
    # The public entry point: any model's config, resident parts included.
    config = SimpleNamespace(
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        vocab_size=262144,
        model_type="gemma3_text",
    )
    peak = estimate_peak_bytes(config, lora_r=8, dtype="float32", rows=2, tokens=256, kind="training")
    gemma = ModelShape.from_config(config)
    assert gemma.norms_per_layer == 4 and peak > gemma.parameters * 4


def test_largest_rows():
    assert largest_rows(lambda r: 100 * r, 450, 16) == 4
    assert largest_rows(lambda r: 100 * r, 450, 3) == 3
    assert largest_rows(lambda r: 100 * r, 50, 16) == 0


@pytest.mark.parametrize("shape", ["tiny-recipe", "tiny"])
def test_estimates_are_within_25_percent_of_measured_peaks(shape):
    """benchmarks/memory/extraction_memory.py --estimates at small shapes: every pass kind's estimate against the
    peak of live bytes its real code path allocates (torch's profiler). docs/results/memory.md has SmolLM2 and 7B."""
    from extraction_memory import estimate_passes

    rows = estimate_passes(
        shape,
        2,
        [1, 4],
        64,
        8,
        256,
        ["gradient", "evaluation", "validation", "reference", "training"],
        log=lambda s: None,
    )
    assert len(rows) == 10
    for kind, _, r, est, measured, _ in rows:  # the RSS rise: reported, not asserted (the heap's state decides it)
        assert 0.75 <= est / measured <= 1.25, (kind, r, est, measured)


def test_the_default_budget_is_what_the_process_holds_and_a_share_of_what_is_free(monkeypatch):
    """No memory_budget_gb: the machine's memory, less headroom. On a CPU, what the process holds plus
    CPU_BUDGET_SHARE of the memory available (shared by the node's processes); on CUDA, what the process has reserved
    plus CUDA_BUDGET_SHARE of the device's free memory. Neither is a budget the user chose."""
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=20 * GB))
    monkeypatch.setattr(budget_module, "resident_bytes", lambda device=None, model=None: int(1.5 * GB))
    assert budget_module.CPU_BUDGET_SHARE == 0.75 and budget_module.CUDA_BUDGET_SHARE == 0.9
    cpu = MemoryBudget.for_device(None, "cpu", processes=1)
    assert cpu.limit == int(1.5 * GB + 0.75 * 20 * GB) == int(16.5 * GB) and not cpu.chosen
    assert "the 1.5 GB this process holds and 75% of the 20.0 GB of CPU memory available" in cpu.source
    two = MemoryBudget.for_device(None, "cpu", processes=2)
    assert two.limit == int(1.5 * GB + 0.75 * 10 * GB) and "shared by 2 processes" in two.source
    # Taken before or after the model is loaded, the default moves by the headroom's share of what was loaded only.
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=19 * GB))
    assert MemoryBudget.for_device(None, "cpu", processes=1, held=int(2.5 * GB)).limit == int(16.75 * GB)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * GB, 96 * GB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 14 * GB)
    cuda = MemoryBudget.for_device(None, "cuda:0")
    assert cuda.limit == int(14 * GB + 0.9 * 60 * GB) and "90% of the 60.0 GB free on cuda:0" in cuda.source
    assert not cuda.chosen
    chosen = MemoryBudget.for_device(2.5, "cpu")
    assert chosen.limit == int(2.5 * GB) and chosen.chosen and chosen.source == "memory_budget_gb: 2.5"


def plan(model, limit_gb, resident_gb, **limits):
    options = dict(
        pool_width=64,
        validation_width=64,
        gradient_rows=16,
        max_batch_tokens=None,
        validation_pairs=4,
        dim=256,
        fused=True,
    )
    return plan_passes(
        model, MemoryBudget(int(limit_gb * GB), "test"), resident=int(resident_gb * GB), **{**options, **limits}
    )


def test_the_plan_fits_the_budget_and_keeps_the_limits(default_heap):
    model = tiny_lora_model(vocab=50_000, hidden=64, layers=2)  # a large vocabulary: the logits matter
    shape, lora = ModelShape.from_model(model), LoraShape.from_model(model)
    roomy = plan(model, 100, 1)
    assert roomy.passes["gradient"].rows == 16 and roomy.passes["validation"].rows == 4  # the user's limits
    assert roomy.passes["gradient"].tokens is None and "set by gradient_batch_size" in roomy.describe()
    assert roomy.slack == SLACK["default"] and not default_heap  # glibc's heap left as it is
    per_row = estimate_pass("gradient", shape, lora, torch.float32, 1, 64, dim=256).transient
    tight = plan(model, 1 + 3.5 * SLACK["default"] * per_row / GB, 1, validation_width=None)
    gradient = tight.passes["gradient"]
    assert gradient.rows == 3 and gradient.tokens == 3 * 64 and gradient.limit == "the budget"
    # The estimate of the rows chosen, times the heap's slack, fits; one row more would not.
    assert SLACK["default"] * gradient.estimate.transient <= tight.available
    assert (
        SLACK["default"] * estimate_pass("gradient", shape, lora, torch.float32, 4, 64, dim=256).transient
        > tight.available
    )
    assert plan(model, 100, 1, gradient_rows=2).passes["gradient"].rows == 2
    capped = plan(model, 100, 1, max_batch_tokens=200)
    assert capped.passes["gradient"].rows == 3 and capped.passes["gradient"].tokens == 200
    assert not default_heap
    # Not even one row fits with glibc's default heap: the heap is made compact and the plan made again.
    squeezed = plan(model, 1 + (SLACK["compact"] + SLACK["default"]) / 2 * per_row / GB, 1, validation_width=None)
    assert default_heap and squeezed.slack == SLACK["compact"] and squeezed.passes["gradient"].rows == 1
    assert not squeezed.over
    starved = plan(model, 1.0, 1.0)
    assert starved.passes["gradient"].rows == 1 and "over the budget even at 1 row" in starved.describe()


def test_a_budget_the_smallest_passes_cannot_hold_is_said_so_with_the_least_that_can_be(default_heap):
    """Below what the process holds plus the smallest pass (1 row, TRL's fused head at its smallest tile), the plan
    says the budget is not held and names the smallest budget the run can hold; that budget, or any above it, is
    held with no such line."""
    model = tiny_lora_model(vocab=50_000, hidden=64, layers=2)
    starved = plan(model, 1.0, 1.0)
    text = starved.describe()
    assert starved.over and "the budget is not held" in text
    least = starved.resident + starved.slack * max(p.estimate.transient for p in starved.passes.values())
    named = float(text.split("the smallest budget this run can hold: memory_budget_gb: ")[1].split(";")[0])
    assert least / GB <= named < least / GB + 0.1
    held = plan(model, named, 1.0)
    assert not held.over and "not held" not in held.describe() and "smallest budget" not in held.describe()
    assert all(held.resident + held.slack * p.estimate.transient <= held.budget.limit for p in held.passes.values())


def test_the_default_budget_never_makes_the_heap_compact(default_heap, monkeypatch):
    """glibc's compact heap (page faults: slower passes) holds a budget the user set; the default budget, the
    machine's own, is never squeezed: where its passes do not fit even at 1 row, the plan says so and stays on the
    default heap, and the Trainer's check warns without compacting either."""
    model = tiny_lora_model(vocab=50_000, hidden=64, layers=2)
    shape, lora = ModelShape.from_model(model), LoraShape.from_model(model)
    per_row = estimate_pass("gradient", shape, lora, torch.float32, 1, 64, dim=256).transient
    limit = int(GB + (SLACK["compact"] + SLACK["default"]) / 2 * per_row)  # 1 row fits only with the compact heap
    options = dict(
        pool_width=64, validation_width=None, gradient_rows=16, max_batch_tokens=None, validation_pairs=4, dim=256
    )
    default = plan_passes(model, MemoryBudget(limit, "default", chosen=False), resident=int(GB), fused=True, **options)
    assert not default_heap and default.slack == SLACK["default"] and default.over == ["pool gradient passes"]
    assert "the budget is not held" in default.describe()
    assert default.larger is None  # the default is already the machine's: no larger budget offered
    args = SimpleNamespace(
        per_device_train_batch_size=1, gradient_accumulation_steps=4, max_length=64, gradient_checkpointing=False
    )
    step = estimate_pass("training", shape, lora, torch.float32, 1, 64)
    squeezable = int(GB + step.parts["optimizer"] + (SLACK["compact"] + SLACK["default"]) / 2 * step.transient)
    warned = check_training(
        model, args, MemoryBudget(squeezable, "default", chosen=False), "warm-up", resident=int(GB)
    )
    assert warned and "not even 1 row fits" in warned and not default_heap
    # The same limits set by the user: the heap is made compact, and the 1-row pass and the 1-row step fit.
    assert (
        check_training(model, args, MemoryBudget(squeezable, "memory_budget_gb"), "warm-up", resident=int(GB)) is None
    )
    assert len(default_heap) == 1
    budget_module._heap["mode"] = "default"
    chosen = plan_passes(model, MemoryBudget(limit, "memory_budget_gb"), resident=int(GB), fused=True, **options)
    assert len(default_heap) == 2 and chosen.slack == SLACK["compact"] and not chosen.over


def test_the_plan_says_what_a_larger_budget_would_save(default_heap, monkeypatch):
    """Under a budget that sets the passes' rows, the plan names the budget that gives every pass the user's limits
    on glibc's default heap (from the estimates), at most the machine's default, and the share of the passes' time
    it saves (`pass_seconds`); under that budget, the plan has no such line."""
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=100 * GB))
    model = tiny_lora_model(vocab=50_000, hidden=64, layers=2)
    shape, lora = ModelShape.from_model(model), LoraShape.from_model(model)
    counts = {"gradient": 40, "validation": 20}
    per_row = estimate_pass("gradient", shape, lora, torch.float32, 1, 64, dim=256).transient
    tight = plan(model, 1 + 3.5 * SLACK["default"] * per_row / GB, 1, counts=counts)
    assert tight.passes["gradient"].rows == 3  # validation: 4 pairs with TRL's fused head at a smaller tile
    larger = tight.larger
    roomy = plan(model, 100, 1, counts=counts)
    assert roomy.larger is None and roomy.passes["gradient"].rows == 16 and roomy.passes["validation"].rows == 4
    needed = int(GB) + max(int(SLACK["default"] * p.estimate.transient) for p in roomy.passes.values())
    assert larger.limit == needed and {k: p.rows for k, p in larger.plan.passes.items()} == {
        "gradient": 16,
        "validation": 4,
    }
    # The time model: a pass costs its rows' tokens (a pair: two rows) and the device's overhead of a pass.
    k = budget_module.PASS_OVERHEAD_TOKENS["cpu"]
    g, v = tight.passes["gradient"].rows, tight.passes["validation"].rows
    before = 40 / g * k + 40 * 64 + 20 / v * k + 20 * 2 * 64
    after = 40 / 16 * k + 40 * 64 + 20 / 4 * k + 20 * 2 * 64
    assert larger.saving == pytest.approx(1 - after / before) and larger.saving > 0
    line = tight.describe().splitlines()[-1]
    gb = budget_module.smallest_gb(needed)
    assert line == (
        f"  a budget of {gb} GB (memory_budget_gb: {gb}) would allow pool gradient passes of 16 rows and "
        f"validation passes of 4 pairs: about {larger.saving:.0%} less time in these passes"
    )
    # The budget it names gives the limits, and says nothing more.
    named = plan(model, float(gb), 1, counts=counts)
    assert named.larger is None and named.passes["gradient"].rows == 16 and named.passes["validation"].rows == 4
    # A machine with less memory than that: the larger budget is the machine's default, the rows that fit it.
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=(needed - GB) / 2 / 0.75))
    capped = plan(model, 1 + 3.5 * SLACK["default"] * per_row / GB, 1, counts=counts).larger
    assert capped.limit == int(GB + (needed - GB) / 2) and capped.limit < needed
    assert any(p.limit == "the budget" for p in capped.plan.passes.values())
    # A plan on the compact heap: the larger budget also spares its page faults (COMPACT_HEAP_TIME).
    squeezed = plan(model, 1 + (SLACK["compact"] + SLACK["default"]) / 2 * per_row / GB, 1, counts=counts)
    assert squeezed.slack == SLACK["compact"] and "glibc's default heap" in squeezed.describe().splitlines()[-1]
    assert budget_module.pass_seconds(squeezed, counts) == pytest.approx(
        budget_module.COMPACT_HEAP_TIME
        * budget_module.pass_seconds(
            budget_module.MemoryPlan(squeezed.budget, squeezed.resident, squeezed.passes, SLACK["default"]), counts
        )
    )


def test_a_trainer_step_over_the_budget_at_1_row_names_the_smallest_budget_and_that_one_holds(default_heap, caplog):
    model = tiny_lora_model(vocab=50_000, hidden=64, layers=2)
    args = SimpleNamespace(
        per_device_train_batch_size=1, gradient_accumulation_steps=4, max_length=128, gradient_checkpointing=False
    )
    with caplog.at_level("WARNING"):
        message = check_training(
            model, args, MemoryBudget(int(1.001 * GB), "memory_budget_gb: 1.001"), "warm-up", resident=int(GB)
        )
    assert message in caplog.text and "not even 1 row fits" in message and "memory_budget_gb: 1.001" in message
    named = float(message.split("can hold (memory_budget_gb: ")[1].split(")")[0])
    step = estimate_pass("training", ModelShape.from_model(model), LoraShape.from_model(model), torch.float32, 1, 128)
    least = GB + step.parts["optimizer"] + SLACK["compact"] * step.transient
    assert f"1 row is estimated at {least / GB:.2f} GB" in message and least / GB <= named < least / GB + 0.1
    caplog.clear()
    assert check_training(model, args, MemoryBudget(int(named * GB), "test"), "warm-up", resident=int(GB)) is None
    assert "not even 1 row fits" not in caplog.text


def test_weights_mapped_from_their_file_count_as_held_before_they_are_read(tmp_path):
    """transformers maps safetensors weights from the file; the RSS counts a page only once a pass reads it. The
    budget counts them from the start (`resident_bytes(device, model)`), and a model built in memory adds nothing."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    built = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=8_000,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            tie_word_embeddings=False,
        )
    )
    assert budget_module.unread_weight_bytes(built) == 0  # its weights are the process's own memory
    built.save_pretrained(tmp_path / "model")
    weights = sum(p.numel() * p.element_size() for p in built.parameters())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    unread = budget_module.unread_weight_bytes(loaded)
    if not Path("/proc/self/smaps").exists():
        assert unread == 0
        return
    # Most of the file is unread (the loader reads a few small tensors, and the kernel maps the pages around a
    # page read: 8.1 of 9.5 MB here; 524 of 538 MB for SmolLM2-135M); never more than the file.
    assert 0.5 * weights <= unread <= weights + (1 << 20), (unread, weights)
    with torch.no_grad():
        sum(float(p.sum()) for p in loaded.parameters())  # a pass reads every weight
    assert budget_module.unread_weight_bytes(loaded) <= 0.02 * weights


def test_the_compact_heap_is_glibcs_mallopt():
    """In a process of its own: mallopt changes the allocator of the process that calls it."""
    import subprocess

    code = (
        "from rose_trl import budget; assert budget.heap_slack('cpu') == budget.HEAP_SLACK['default']; "
        "assert budget.compact_heap(); assert budget.heap_slack('cpu') == budget.HEAP_SLACK['compact']; "
        "assert budget.heap_slack('cuda') == 1.0; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_the_trainers_batch_is_warned_about_not_changed(caplog):
    model = tiny_lora_model(vocab=50_000, hidden=64, layers=2)
    args = SimpleNamespace(
        per_device_train_batch_size=8, gradient_accumulation_steps=2, max_length=128, gradient_checkpointing=False
    )
    step = estimate_pass("training", ModelShape.from_model(model), LoraShape.from_model(model), torch.float32, 1, 128)
    budget = MemoryBudget(int(GB + step.parts["optimizer"] + 2.15 * SLACK["compact"] * step.transient), "test")
    with caplog.at_level("WARNING"):
        message = check_training(model, args, budget, "final training", resident=int(GB))
    assert message and "per_device_train_batch_size=8 rows of up to 128 tokens" in message
    # 2 rows fit with the compact heap's slack (about 2 x its 1-row step), not 3
    assert "2 rows fit: per_device_train_batch_size: 2 with gradient_accumulation_steps: 8" in message
    assert "not changed" in message and message in caplog.text and args.per_device_train_batch_size == 8
    assert check_training(model, args, MemoryBudget(int(100 * GB), "test"), "warm-up", resident=int(GB)) is None
    starved = check_training(model, args, MemoryBudget(int(GB), "test"), "warm-up", resident=int(GB))
    assert "not even 1 row fits" in starved
    # Another model, not loaded yet (a final model of another shape): its config and LoRA settings.
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        vocab_size=100_000,
        dtype="bfloat16",
    )
    lora = LoraShape(r=8, targets=("q_proj", "v_proj"), dropout=0.1)
    shape = ModelShape.from_config(config)
    held = int(GB) + shape.parameters * 2
    step = estimate_pass("training", shape, lora, "bfloat16", 3, 128)
    limit = held + step.parts["optimizer"] + int(SLACK["compact"] * step.transient) + 1
    assert (
        check_training(config, args, MemoryBudget(limit, "test"), "final training", resident=int(GB), lora=lora).count(
            "3 rows fit"
        )
        == 1
    )
    with pytest.raises(ValueError, match="needs its LoraShape"):
        check_training(config, args, MemoryBudget(int(GB), "test"), "final training")


def test_a_pass_out_of_memory_is_halved_and_resumed(caplog):
    """accelerate's find_executable_batch_size with halving: the CPU simulates CUDA's out-of-memory error."""
    done, calls = [], []

    def passes(rows):
        calls.append(rows)
        while len(done) < 10:
            if rows > 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
            done.extend(range(len(done), min(10, len(done) + rows)))
        return "finished"

    with caplog.at_level("WARNING"):
        assert halving_on_oom(passes, 16, "a test pass") == "finished"
    assert calls == [16, 8, 4, 2] and done == list(range(10))
    assert "a test pass ran out of memory at 16 rows a pass: retrying at 8" in caplog.text
    with pytest.raises(ValueError):  # any other error goes through
        halving_on_oom(lambda rows: (_ for _ in ()).throw(ValueError("bad")), 4, "a test pass")


def test_validation_passes_halve_on_out_of_memory(planted, tiny_base, tmp_path, monkeypatch, caplog):
    from rose_trl.gradients.featurizer import Featurizer
    from rose_trl.gradients.projection import build_projector
    from rose_trl.stores.validation import ROSEDPOTrainer, validation_dpo_config
    from tests.helpers import trained_adapter_model

    _, validation, tokenizer, _ = planted
    model = trained_adapter_model(tiny_base)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    featurizer = Featurizer(build_projector("sjlt", n, 64, 0))
    trainer = ROSEDPOTrainer(
        model,
        validation_dpo_config(str(tmp_path), batch_size=4, use_cpu=True),
        validation.select_columns(["prompt", "chosen", "rejected"]),
        tokenizer,
    )
    whole = trainer.pair_gradients(featurizer)
    real = Featurizer.__call__

    def tight(self, model, batch, *args, **kwargs):
        if batch["input_ids"].shape[0] > 2:  # more than one pair a pass
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(self, model, batch, *args, **kwargs)

    monkeypatch.setattr(Featurizer, "__call__", tight)
    with caplog.at_level("WARNING"):
        halved = trainer.pair_gradients(featurizer)
    assert "a validation pass ran out of memory at 4 rows a pass: retrying at 2" in caplog.text
    np.testing.assert_allclose(halved.numpy(), whole.numpy(), rtol=1e-4, atol=1e-6)


def test_the_run_logs_its_plan_and_sizes_its_passes_to_the_budget(tmp_path, caplog):
    """The tiny pipeline under a budget that leaves room for few rows: fewer rows a pass than the limits, the plan
    logged once, the same selection (rows do not mix in a pass) as under a roomy budget."""
    import pandas as pd
    from trl import ModelConfig, SFTConfig

    from rose_trl.config import ROSEConfig
    from rose_trl.models.tiny import write_tiny_assets
    from rose_trl.run.pipeline import run

    assets = write_tiny_assets(tmp_path / "assets", n_pool=60)

    def go(out, gb):
        return run(
            ROSEConfig(
                pool_dataset=str(assets / "pool.jsonl"),
                validation_dataset=str(assets / "validation.jsonl"),
                final_training=False,
                selection_fraction=0.1,
                projection_dim=1024,
                memory_budget_gb=gb,
            ),
            SFTConfig(
                output_dir=str(tmp_path / out),
                use_cpu=True,
                bf16=False,
                report_to=[],
                max_length=256,
                num_train_epochs=1,
                per_device_train_batch_size=4,
                disable_tqdm=True,
            ),
            ModelConfig(
                model_name_or_path=str(assets / "model"),
                use_peft=True,
                lora_r=4,
                lora_target_modules=["q_proj", "v_proj"],
            ),
        )

    go("roomy", 100)
    resident = budget_module.resident_bytes()
    caplog.clear()
    with caplog.at_level("WARNING"):
        go("tight", (resident + 4e6) / GB)  # a few MB beyond what the process holds
    messages = [r.getMessage() for r in caplog.records]
    plans = [m for m in messages if "memory plan:" in m]
    assert len(plans) == 1, plans  # logged once
    # The warm-up's batch (4 rows) does not fit either: a warning with the size that fits, before the warm-up's first
    # step (the plan comes at its first checkpoint), and the batch left as it was.
    warned = [i for i, m in enumerate(messages) if "warm-up: per_device_train_batch_size=4 rows" in m]
    assert warned and warned[0] < messages.index(plans[0]), messages
    assert "The training's batch sizes are the Trainer's: not changed" in messages[warned[0]]
    state = json.loads(next((tmp_path / "tight").glob("**/checkpoint-*/trainer_state.json")).read_text())
    assert state["train_batch_size"] == 4
    gradient = plans[0].split("pool gradient passes: ")[1].splitlines()[0]
    assert "set by the budget" in gradient and 1 <= int(gradient.split(" rows")[0]) < 16, gradient
    # and what a larger budget would save: the passes at the limits (16 rows), in less time
    larger = plans[0].splitlines()[-1]
    assert "would allow pool gradient passes of 16 rows" in larger and "less time in these passes" in larger, larger
    tight, roomy = (pd.read_parquet(tmp_path / d / "selection" / "scores.parquet") for d in ("tight", "roomy"))
    np.testing.assert_allclose(tight["score"], roomy["score"], rtol=1e-3, atol=1e-4)
    assert (tight["selected"] == roomy["selected"]).all()


def test_a_smaller_fused_head_tile_gives_the_same_gradients_in_less_memory(tmp_path):
    """When one validation pair does not fit, the plan lowers the positions a tile of TRL's fused LM head: the same
    pair gradients (float summation order aside), a lower measured peak, as the estimate says."""
    from common import build_model
    from extraction_memory import dpo_batch, dpo_trainer, peak_bytes

    from rose_trl.gradients.featurizer import Featurizer
    from rose_trl.gradients.projection import build_projector
    from rose_trl.resources.memory import FUSED_HEAD_TOKENS
    from rose_trl.stores.validation import fused_head_tokens

    model = build_model("tiny-recipe", 2, 8)
    trainer = dpo_trainer(model, model.config.vocab_size, str(tmp_path))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    featurizer = Featurizer(build_projector("sjlt", n, 256, 0))
    batch = dpo_batch(2, 128, model.config.vocab_size)
    shape, lora = ModelShape.from_model(model), LoraShape.from_model(model)
    out, peaks = {}, {}

    def run(tile):
        with fused_head_tokens(tile):
            out[tile] = featurizer(
                model,
                dict(batch),
                loss=lambda b: trainer.compute_loss(trainer.model, b) * 2,
                combine=lambda r: r[:2] + r[2:],
            )

    for tile in (None, 32):
        run(tile)
        peaks[tile] = peak_bytes(functools.partial(run, tile))
    from trl.kernels import chunked_logprob

    assert chunked_logprob.TOKEN_CHUNK_SIZE == FUSED_HEAD_TOKENS  # restored
    np.testing.assert_allclose(out[32].numpy(), out[None].numpy(), rtol=1e-4, atol=1e-6)
    estimates = {
        tile: estimate_pass(
            "validation",
            shape,
            lora,
            torch.float32,
            2,
            128,
            labelled_fraction=0.75,
            dim=256,
            head_tokens=tile or FUSED_HEAD_TOKENS,
        ).transient
        for tile in (None, 32)
    }
    assert peaks[32] < 0.5 * peaks[None] and estimates[32] < 0.5 * estimates[None]
    for tile in (None, 32):
        assert 0.75 <= estimates[tile] / peaks[tile] <= 1.25, (tile, estimates[tile], peaks[tile])
