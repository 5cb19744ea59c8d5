import pytest
import torch

from rose_trl.gradients.capture import (
    AdamState,
    MissingAdamStateError,
    PerExampleGradientCapture,
    UnsupportedParameterError,
    per_example_gradients,
    trainable_parameters,
    trainer_param_index,
)
from tests.helpers import mixed_length_batch, row, tiny_lora_model


def loop_reference(model, batch, adam=None):
    """Batch-size-1 loop, written plainly: the model's own token-mean loss, one example at a time."""
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    out = []
    for i in range(batch["input_ids"].shape[0]):
        r = row(batch, i)
        loss = model(input_ids=r["input_ids"], attention_mask=r["attention_mask"], labels=r["labels"]).loss
        g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, params)])
        if adam is not None:
            m, v, b1, b2, eps = adam
            g = (b1 * m + (1 - b1) * g) / torch.sqrt(b2 * v + (1 - b2) * g**2 + eps)
        out.append(g)
    return torch.stack(out)


def assert_rows_match(fast, ref):
    assert fast.shape == ref.shape
    for i in range(ref.shape[0]):
        cos = torch.nn.functional.cosine_similarity(fast[i], ref[i], dim=0).item()
        rel = ((fast[i] - ref[i]).norm() / ref[i].norm()).item()
        assert cos >= 0.99999, (i, cos)
        assert rel <= 1e-4, (i, rel)


LENGTHS = [5, 17, 9, 32, 12, 3]
PROMPTS = [2, 10, 1, 20, 11, 1]


def test_batched_matches_batch_size_one_loop_sgd():
    model = tiny_lora_model()
    batch = mixed_length_batch(LENGTHS, PROMPTS)
    assert_rows_match(per_example_gradients(model, batch), loop_reference(model, batch))


def test_batched_matches_loop_with_live_adamw_state():
    model = tiny_lora_model()
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.8, 0.95), eps=1e-6)
    warm = mixed_length_batch([10, 10], [3, 3], seed=5)
    for _ in range(2):
        opt.zero_grad()
        model(**warm).loss.backward()
        opt.step()
    opt.zero_grad()
    batch = mixed_length_batch(LENGTHS, PROMPTS, seed=1)
    m = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in params])
    v = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in params])
    fast = per_example_gradients(model, batch, adam_state=AdamState.from_optimizer(opt, trainable_parameters(model)))
    assert_rows_match(fast, loop_reference(model, batch, adam=(m, v, 0.8, 0.95, 1e-6)))
    # The public signature since the first release: the live optimizer itself (keyword or third positional).
    assert torch.equal(per_example_gradients(model, batch, optimizer=opt), fast)
    assert torch.equal(per_example_gradients(model, batch, opt), fast)
    with pytest.raises(TypeError, match="not both"):
        per_example_gradients(
            model, batch, optimizer=opt, adam_state=AdamState.from_optimizer(opt, trainable_parameters(model))
        )
    # The live run's .grad buffers are left alone.
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in params)


def test_padding_and_batch_company_do_not_change_a_row():
    model = tiny_lora_model()
    batch = mixed_length_batch(LENGTHS, PROMPTS, seed=2)
    full = per_example_gradients(model, batch)
    alone = per_example_gradients(model, row(batch, 1))
    assert torch.allclose(full[1], alone[0], rtol=1e-4, atol=1e-7)


def test_layout_follows_named_parameters_order():
    model = tiny_lora_model()
    batch = mixed_length_batch([8], [2])
    grads = per_example_gradients(model, batch)
    params = trainable_parameters(model)
    assert grads.shape == (1, sum(p.numel() for _, p in params)) and grads.dtype == torch.float32
    loss = model(**batch).loss
    ref = torch.autograd.grad(loss, [p for _, p in params])
    offset = 0
    for (name, p), g in zip(params, ref, strict=True):
        assert torch.allclose(grads[0, offset : offset + p.numel()], g.reshape(-1), rtol=1e-4, atol=1e-7), name
        offset += p.numel()


def test_bias_and_train_mode_dropout_free_model():
    model = tiny_lora_model(targets=("q_proj", "v_proj"))
    for name, p in model.named_parameters():  # make a (non-LoRA) biased Linear trainable too
        if "lm_head" in name:
            p.requires_grad_(True)
    batch = mixed_length_batch([7, 11], [2, 4], seed=3)
    assert_rows_match(per_example_gradients(model, batch), loop_reference(model, batch))


def test_adam_without_state_is_refused():
    model = tiny_lora_model()
    opt = torch.optim.AdamW([p for _, p in model.named_parameters() if p.requires_grad])
    with pytest.raises(MissingAdamStateError, match="no Adam state"):
        AdamState.from_optimizer(opt, trainable_parameters(model))


def test_saved_state_dict_gives_same_preconditioning_as_live():
    model = tiny_lora_model()
    params = trainable_parameters(model)
    index = trainer_param_index(model)
    opt = torch.optim.AdamW([p for n, p in sorted(params, key=lambda np_: index[np_[0]])], lr=1e-3)
    opt.zero_grad()
    model(**mixed_length_batch([10], [2])).loss.backward()
    opt.step()
    live = AdamState.from_optimizer(opt, params)
    saved = AdamState.from_state_dict(opt.state_dict(), params, index)
    assert torch.equal(live.exp_avg, saved.exp_avg) and torch.equal(live.exp_avg_sq, saved.exp_avg_sq)
    assert (live.beta1, live.beta2, live.eps) == (saved.beta1, saved.beta2, saved.eps)


def test_uncovered_trainable_parameter_is_named():
    model = tiny_lora_model()
    model.base_model.model.model.norm.weight.requires_grad_(True)
    with pytest.raises(UnsupportedParameterError, match="norm"):
        PerExampleGradientCapture(model)


def test_rows_without_response_tokens_are_refused():
    model = tiny_lora_model()
    batch = mixed_length_batch([6, 6], [2, 6])
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        per_example_gradients(model, batch)


def test_memory_budget_sizes_the_batches():
    from rose_trl.stores.extraction import gradient_bytes_per_row, plan_batches, rows_for_budget

    # 7B with LoRA r=128 on q,k,v,o: 32 layers x 4 x 128 x (4096 + 4096) = 134M parameters, the
    # largest of them a 4096 x 128 matrix.
    n, layer = 32 * 4 * 128 * 8192, 4096 * 128
    assert n == 134_217_728
    dense = gradient_bytes_per_row(n, layer, 8192, fused=False)
    fused = gradient_bytes_per_row(n, layer, 8192, fused=True)
    assert rows_for_budget(dense, 16, None) == 16
    assert rows_for_budget(dense, 16, 16.0) == 7  # 7 x 16 B x 134M = 15 GB <= 16 GB, on an 80 GB GPU
    with pytest.raises(ValueError, match="cannot hold one gradient row"):
        rows_for_budget(dense, 16, 1.0)
    # Fused, a row costs its largest layer, not the adapter: the budget no longer limits the rows.
    assert fused < 10e6 and rows_for_budget(fused, 64, 1.0) == 64
    import numpy as np

    lengths = np.array([10, 50, 20, 50, 5, 30])
    batches = plan_batches(lengths, np.arange(6), batch_size=4, max_batch_tokens=100)
    assert all(len(b) * lengths[b].max() <= 100 for b in batches)
    assert sorted(np.concatenate(batches).tolist()) == list(range(6))


def test_left_padded_rows_keep_their_mask_and_match_the_loop():
    # Right-padded batches run without the padding mask (causal attention cannot see the padding);
    # any other padding must keep it.
    model = tiny_lora_model()
    batch = mixed_length_batch(LENGTHS, PROMPTS, seed=3)
    flipped = {
        k: torch.stack(
            [torch.roll(v[i], int(v.shape[1] - batch["attention_mask"][i].sum())) for i in range(v.shape[0])]
        )
        for k, v in batch.items()
    }
    assert not bool(flipped["attention_mask"][:, 0].all())  # really left-padded
    fast = per_example_gradients(model, flipped)
    ref = loop_reference(model, batch)
    for i in range(ref.shape[0]):
        cos = torch.nn.functional.cosine_similarity(fast[i], ref[i], dim=0).item()
        assert cos >= 0.9999, (i, cos)


def test_a_pass_leaves_nothing_alive():
    # Each pass's activations must be freed when it returns: a reference cycle through the gradient
    # hooks once kept every pass's tensors on the device until it ran out of memory.
    import gc

    model = tiny_lora_model()
    batch = mixed_length_batch(LENGTHS, PROMPTS)
    per_example_gradients(model, batch)
    gc.collect()
    gc.disable()
    try:

        def alive():
            return sum(1 for o in gc.get_objects() if torch.is_tensor(o))

        before = alive()
        for _ in range(3):
            per_example_gradients(model, batch)
        assert alive() == before
    finally:
        gc.enable()


def test_a_pass_that_runs_out_of_memory_is_halved_and_run_again(tmp_path, monkeypatch, caplog):
    # Passes of more than 2 rows "run out of memory": extraction splits them and stores the same rows
    # as a run planned with batches of 2 (each row's gradient does not depend on its batch).
    import numpy as np

    import rose_trl.gradients.featurizer as featurizer
    import rose_trl.stores.extraction as extraction
    from rose_trl.gradients.projection import build_projector
    from rose_trl.stores.store import GradientStore

    model = tiny_lora_model()
    g = torch.Generator().manual_seed(0)
    pool = []
    for n in [12, 7, 15, 9, 11, 5, 8]:
        ids = torch.randint(3, 128, (n,), generator=g).tolist()
        pool.append({"input_ids": ids, "completion_mask": [0] * 2 + [1] * (n - 2)})
    projector = build_projector("sjlt", sum(p.numel() for _, p in trainable_parameters(model)), 64)

    def store(name):
        return GradientStore.open_or_create(
            tmp_path / name,
            model="m",
            checkpoint="c",
            projection=projector.describe(),
            gradient_type="sgd",
            pool_fingerprint="p",
            num_rows=len(pool),
            dtype="float32",
        )

    extraction.extract_gradients(model, pool, small := store("small"), projector, 0, batch_size=2, progress=False)
    real = featurizer.per_example_projected_gradients

    def tight_memory(model, batch, *args, **kw):
        if batch["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(model, batch, *args, **kw)

    monkeypatch.setattr(featurizer, "per_example_projected_gradients", tight_memory)
    with caplog.at_level("WARNING"):
        extraction.extract_gradients(model, pool, split := store("split"), projector, 0, batch_size=7, progress=False)
    # accelerate's find_executable_batch_size halves the pass: 7 rows, then 3, then 1... until it fits
    assert "a pool gradient pass ran out of memory at 7 rows a pass: retrying at 3" in caplog.text
    assert "ran out of memory at 3 rows a pass: retrying at 1" in caplog.text
    assert split.is_complete
    np.testing.assert_allclose(split.read_all(), small.read_all(), rtol=1e-4, atol=1e-6)

    # One row that does not fit cannot be split: the error reaches the caller.
    monkeypatch.setattr(
        featurizer,
        "per_example_projected_gradients",
        lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory. (simulated)")),
    )
    with pytest.raises(torch.OutOfMemoryError, match="at 1 row a pass"):
        extraction.extract_gradients(model, pool, store("none"), projector, 0, batch_size=7, progress=False)


@pytest.mark.parametrize("chunk_elements", [1, 3 * 128, 10**9 // 2])
def test_chunked_loss_equals_the_plain_loss_and_its_gradients(monkeypatch, chunk_elements):
    """The bounded loss (chunks of 1 token, 3 tokens, or all tokens at once) against the plain one, forced on
    at a small vocabulary: same per-row losses, same per-row gradients."""
    from rose_trl.gradients import sft_loss

    model = tiny_lora_model()
    batch = mixed_length_batch(LENGTHS, PROMPTS, seed=4)
    plain_rows = per_example_gradients(model, batch)
    inputs, positions = sft_loss.model_inputs(model, batch)
    plain_loss = sft_loss.sft_per_example_loss(model(**inputs).logits, batch["labels"], positions)
    backbone, head = sft_loss._chunkable_head(model)
    inputs.pop("logits_to_keep", None)
    hidden = backbone(**inputs).last_hidden_state
    chunked_loss = sft_loss.chunked_sft_per_example_loss(hidden, head, batch["labels"], chunk_elements)
    assert torch.allclose(chunked_loss, plain_loss, rtol=1e-6, atol=1e-6)

    monkeypatch.setattr(sft_loss, "LOSS_CHUNK_ELEMENTS", 0)  # every pass takes the chunked loss
    calls = []
    original = sft_loss.chunked_sft_per_example_loss
    monkeypatch.setattr(
        sft_loss, "chunked_sft_per_example_loss", lambda *a: calls.append(1) or original(*a[:3], chunk_elements)
    )
    chunked_rows = per_example_gradients(model, batch)
    assert calls, "the chunked loss did not run"
    assert torch.allclose(chunked_rows, plain_rows, rtol=1e-5, atol=1e-6)
    assert ((chunked_rows - plain_rows).norm(dim=1) / plain_rows.norm(dim=1)).max() < 1e-6


def test_chunked_loss_only_where_the_logits_exceed_the_budget(monkeypatch):
    from rose_trl.gradients import sft_loss

    model = tiny_lora_model()
    batch = mixed_length_batch([10, 10], [2, 2])
    seen = []
    original = sft_loss.chunked_sft_per_example_loss
    monkeypatch.setattr(sft_loss, "chunked_sft_per_example_loss", lambda *a: seen.append(1) or original(*a))
    # 2 rows x 8 labelled positions x 128 words = 2048 logits: the plain loss at the default budget and at 2048,
    # chunked below.
    assert len(sft_loss.model_inputs(model, batch)[1]) == 8
    for budget, chunked in ((None, False), (2048, False), (2047, True)):
        seen.clear()
        sft_loss.pass_loss(model, batch, budget)
        assert bool(seen) == chunked, budget
    # A trainable LM head keeps the plain loss (the chunked one gives the head no gradient).
    model.get_base_model().lm_head.weight.requires_grad_(True)
    assert sft_loss._chunkable_head(model) is None
