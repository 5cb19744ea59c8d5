"""`gradient_layers: N`: features from the LoRA modules of the last N decoder layers only, the backward stopped
below the lowest of them; against a plain batch-size-1 loop restricted to those layers' parameters."""

import pytest
import torch

from rose_trl.gradients.capture import (
    GradientLayers,
    PerExampleGradientCapture,
    decoder_layers,
    per_example_gradients,
    per_example_projected_gradients,
    trainable_parameters,
)
from rose_trl.gradients.featurizer import Featurizer
from rose_trl.gradients.projection import build_projector
from rose_trl.gradients.sft_loss import pass_loss
from tests.helpers import WholeRows, mixed_length_batch, tiny_lora_model
from tests.test_fused import adam_direction, random_adam
from tests.test_gradients import LENGTHS, PROMPTS, assert_rows_match, loop_reference


def kept_mask(model, n: int) -> torch.Tensor:
    """True at the coordinates of the parameters of the last n decoder layers (by name, written out plainly)."""
    layers = len(decoder_layers(model))
    kept = {f".layers.{i}." for i in range(layers - n, layers)}
    return torch.cat(
        [torch.full((p.numel(),), any(k in name for k in kept)) for name, p in trainable_parameters(model)]
    )


def restricted_loop(model, batch, n, adam=None):
    """The batch-size-1 loop's full rows (Adam-transformed), every coordinate outside the last n layers zeroed."""
    full = loop_reference(model, batch)
    if adam is not None:
        full = adam_direction(full, adam)
    return full * kept_mask(model, n)


@pytest.mark.parametrize("n, with_adam", [(1, True), (3, False), (4, True)])
def test_features_equal_the_full_gradient_restricted_to_the_last_layers(n, with_adam):
    model = tiny_lora_model(layers=4)
    total = sum(p.numel() for _, p in trainable_parameters(model))
    adam = random_adam(total) if with_adam else None
    batch = mixed_length_batch(LENGTHS, PROMPTS, seed=1)
    reference = restricted_loop(model, batch, n, adam)
    assert_rows_match(per_example_gradients(model, batch, adam_state=adam, gradient_layers=n), reference)
    projector = build_projector("sjlt", total, 256, seed=0)
    fused = per_example_projected_gradients(model, batch, projector, adam, gradient_layers=n)
    assert_rows_match(fused, projector.project(reference))
    # the whole-row path (a projector without slices) gives the same rows through the featurizer, DPO-style loss too
    whole = Featurizer(WholeRows(projector), gradient_layers=n)
    assert_rows_match(whole(model, batch, adam), fused)
    assert_rows_match(Featurizer(projector, n)(model, batch, adam, loss=lambda b: pass_loss(model, b)), fused)
    if n == 4:  # every layer: exactly the default path's rows
        assert torch.equal(fused, per_example_projected_gradients(model, batch, projector, adam))


def test_the_layers_below_run_without_autograd():
    model = tiny_lora_model(layers=4)
    batch = mixed_length_batch(LENGTHS, PROMPTS, seed=1)
    layers = decoder_layers(model)
    tracked = []
    handles = [
        layer.register_forward_hook(lambda m, a, out, i=i: tracked.append((i, out[0].requires_grad)))
        for i, layer in enumerate(layers)
    ]
    capture = PerExampleGradientCapture(model, 1)
    try:
        with capture, torch.enable_grad():
            capture.reset(batch["input_ids"].shape[0], batch["input_ids"].device)
            loss = pass_loss(model, batch)
            assert torch.is_grad_enabled()  # grad mode is back as it was after the lowest kept layer
            # the graph reaches no parameter of the three layers below: their LoRA weights are not even leaves of it
            seen, stack, leaves = set(), [loss.grad_fn], set()
            while stack:
                node = stack.pop()
                if node is None or node in seen:
                    continue
                seen.add(node)
                if hasattr(node, "variable"):
                    leaves.add(id(node.variable))
                stack.extend(f for f, _ in node.next_functions)
            capture.backward(loss)
    finally:
        for h in handles:
            h.remove()
    assert tracked == [(0, False), (1, False), (2, False), (3, True)]
    kept = {id(p) for name, p in trainable_parameters(model) if ".layers.3." in name}
    lower = {id(p) for name, p in trainable_parameters(model) if ".layers.3." not in name}
    assert not leaves & lower
    # the capture hooks only the kept layer's LoRA modules (A and B of q, k, v, o)
    assert len(capture._modules) == 8 and all(capture.layers.keeps(m) for m in capture._modules)
    assert kept  # sanity: the kept layer has LoRA parameters
    with torch.no_grad():  # a forward under no_grad stays under no_grad through the hooks (TRL's reference pass)
        with capture:
            model(**{k: v for k, v in batch.items() if k != "labels"})
            assert not torch.is_grad_enabled()


def test_gradient_layers_errors_name_the_option_and_the_layers():
    model = tiny_lora_model(layers=4)
    with pytest.raises(ValueError, match=r"gradient_layers: 5, but the model has 4 decoder layers with LoRA modules"):
        GradientLayers(model, 5)
    with pytest.raises(ValueError, match="positive"):
        GradientLayers(model, 0)


def test_dpo_pair_gradients_of_the_last_layer_equal_trls_loss_restricted(planted, tiny_base, tmp_path):
    """The validation features (TRL's DPO loss, 3 pairs a pass) with gradient_layers 1 = TRL's loss on each pair
    alone, differentiated by autograd, restricted to the last decoder layer's LoRA parameters."""
    from rose_trl.stores.validation import ROSEDPOTrainer, validation_dpo_config
    from tests.helpers import Unprojected, trained_adapter_model
    from tests.test_trl_api import one_pair_gradients

    _, validation, tokenizer, _ = planted
    model = trained_adapter_model(tiny_base)
    trainer = ROSEDPOTrainer(
        model, validation_dpo_config(str(tmp_path), batch_size=3, use_cpu=True), validation, tokenizer
    )
    model.eval()
    n = sum(p.numel() for _, p in trainable_parameters(model))
    reference = one_pair_gradients(trainer, model) * kept_mask(model, 1)
    whole = trainer.pair_gradients(Featurizer(Unprojected(n), gradient_layers=1))
    torch.testing.assert_close(whole, reference, rtol=1e-4, atol=1e-6 * reference.norm(dim=1).max().item())
    projector = build_projector("sjlt", n, 128, seed=0)
    assert_rows_match(trainer.pair_gradients(Featurizer(projector, gradient_layers=1)), projector.project(reference))
