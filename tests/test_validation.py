import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader

from rose_trl.gradients import trainable_parameters
from rose_trl.sft_data import BadRecordError
from rose_trl.validation import ROSEDPOTrainer, aggregate_by_subtask, validation_dpo_config


def trained_adapter_model(base):
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a warm-up checkpoint: the adapter is far from zero
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    return model


def summed_logps(model, input_ids, completion_mask):
    logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (logp * completion_mask[:, 1:]).sum(-1)


def test_reference_is_the_base_model_not_a_copy_of_the_adapter(planted, tiny_base, tmp_path):
    _, validation, tokenizer, _ = planted
    model = trained_adapter_model(tiny_base)
    trainer = ROSEDPOTrainer(model, validation_dpo_config(str(tmp_path), batch_size=1, use_cpu=True),
                             validation.select(range(3)), tokenizer)
    assert list(model.peft_config) == ["default"]  # TRL's frozen "ref" adapter copy is gone
    ref = trainer.reference_logps()
    batches = list(DataLoader(trainer.train_dataset, batch_size=1, collate_fn=trainer.data_collator))
    with torch.no_grad(), model.disable_adapter():
        base = torch.stack([summed_logps(model, b["input_ids"], b["completion_mask"]) for b in batches])
    with torch.no_grad():
        policy = torch.stack([summed_logps(model, b["input_ids"], b["completion_mask"]) for b in batches])
    torch.testing.assert_close(ref, base, rtol=1e-4, atol=1e-3)
    assert not torch.allclose(ref, policy, atol=1e-2)  # and it is not the warm-up policy


def test_pair_gradients_match_a_one_pair_loop_over_trls_loss(planted, tiny_base, tmp_path):
    _, validation, tokenizer, _ = planted
    model = trained_adapter_model(tiny_base)
    trainer = ROSEDPOTrainer(model, validation_dpo_config(str(tmp_path), batch_size=3, use_cpu=True), validation, tokenizer)
    fast = trainer.pair_gradients()
    params = [p for _, p in trainable_parameters(model)]
    model.eval()
    for i, inputs in enumerate(DataLoader(trainer.train_dataset, batch_size=1, collate_fn=trainer.data_collator)):
        ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(trainer.compute_loss(model, inputs), params)])
        assert torch.nn.functional.cosine_similarity(ref, fast[i], dim=0) > 0.99999
        assert (ref - fast[i]).norm() / ref.norm() < 1e-4


def test_bad_pairs_are_named(planted, tiny_base, tmp_path):
    _, validation, tokenizer, _ = planted
    rows = validation.to_list()
    rows[2]["rejected"] = rows[2]["chosen"]
    with pytest.raises(BadRecordError, match=r"record 2, field 'chosen,rejected'.*identical"):
        ROSEDPOTrainer(tiny_base, validation_dpo_config(str(tmp_path), use_cpu=True), Dataset.from_list(rows), tokenizer)
    rows[2]["rejected"], rows[1]["prompt"] = "something else", "  "
    with pytest.raises(BadRecordError, match="record 1, field 'prompt'"):
        ROSEDPOTrainer(tiny_base, validation_dpo_config(str(tmp_path), use_cpu=True), Dataset.from_list(rows), tokenizer)


def test_subtask_aggregation_modes():
    g = np.array([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    names, normalized = aggregate_by_subtask(g, ["a", "a", "b"])
    assert names == ["a", "b"]
    np.testing.assert_allclose(normalized[0], [0.5, 0.5])  # each pair counts the same
    names, eq6 = aggregate_by_subtask(g, ["a", "a", "b"], mode="eq6")
    np.testing.assert_allclose(eq6[0], np.array([3.0, 1.0]) / np.sqrt(10), rtol=1e-6)  # big gradients weigh more
    np.testing.assert_allclose(eq6[1], np.array([1.0, 1.0]) / np.sqrt(2), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown validation aggregation"):
        aggregate_by_subtask(g, ["a", "a", "b"], mode="sum")
