import numpy as np
import pytest
import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from rose_trl.config import ROSEConfig
from rose_trl.data.sft import BadRecordError
from rose_trl.scoring.scores import pair_vectors, subtask_means, zero_gradient_pairs
from rose_trl.stores.validation import KeepLastTokens, ROSEDPOTrainer, validation_dpo_config, validation_loss_tag
from tests.helpers import trained_adapter_model


def aggregate_by_subtask(grads, subtasks, mode="normalized_mean", usable=None):
    """Each subtask's target: the mean of its usable pairs' vectors."""
    names, vectors = pair_vectors(grads, subtasks, mode, usable)
    return names, subtask_means(vectors, subtasks, names, usable)


def summed_logps(model, input_ids, completion_mask):
    logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (logp * completion_mask[:, 1:]).sum(-1)


def test_reference_is_the_base_model_not_a_copy_of_the_adapter(planted, tiny_base, tmp_path):
    _, validation, tokenizer, _ = planted
    model = trained_adapter_model(tiny_base)
    trainer = ROSEDPOTrainer(
        model, validation_dpo_config(str(tmp_path), batch_size=1, use_cpu=True), validation.select(range(3)), tokenizer
    )
    assert list(model.peft_config) == ["default"]  # TRL's frozen "ref" adapter copy is gone
    model.eval()
    batches = list(DataLoader(trainer.train_dataset, batch_size=1, collate_fn=trainer.data_collator))
    with torch.no_grad():  # TRL's reference log-probs (chosen, rejected) of each pair
        ref = torch.stack([torch.stack(trainer.compute_ref_log_probs(model, b)).reshape(-1).float() for b in batches])
    with torch.no_grad(), model.disable_adapter():
        base = torch.stack([summed_logps(model, b["input_ids"], b["completion_mask"]) for b in batches])
    with torch.no_grad():
        policy = torch.stack([summed_logps(model, b["input_ids"], b["completion_mask"]) for b in batches])
    torch.testing.assert_close(ref, base, rtol=1e-4, atol=1e-3)
    assert not torch.allclose(ref, policy, atol=1e-2)  # and it is not the warm-up policy


def test_bad_pairs_are_named(planted, tiny_base, tmp_path):
    _, validation, tokenizer, _ = planted
    rows = validation.to_list()
    rows[2]["rejected"] = rows[2]["chosen"]
    with pytest.raises(BadRecordError, match=r"record 2, field 'chosen,rejected'.*identical"):
        ROSEDPOTrainer(
            tiny_base, validation_dpo_config(str(tmp_path), use_cpu=True), Dataset.from_list(rows), tokenizer
        )
    rows[2]["rejected"], rows[1]["prompt"] = "something else", "  "
    with pytest.raises(BadRecordError, match="record 1, field 'prompt'"):
        ROSEDPOTrainer(
            tiny_base, validation_dpo_config(str(tmp_path), use_cpu=True), Dataset.from_list(rows), tokenizer
        )


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


def test_left_out_pairs_and_pair_vectors():
    g = np.array([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    labels = ["a", "a", "a", "b", "b"]
    usable = np.array([True, True, False, True, True])
    for mode in ("normalized_mean", "eq6"):
        names, vectors = pair_vectors(g, labels, mode, usable)
        _, targets = aggregate_by_subtask(g, labels, mode, usable)
        # each target is the mean of its usable pairs' vectors: the identity behind the contributions
        np.testing.assert_allclose(targets, [vectors[:2].mean(0), vectors[3:].mean(0)], rtol=1e-6)
        assert not vectors[2].any()
    np.testing.assert_allclose(
        aggregate_by_subtask(g, labels, usable=usable)[1][0], [0.5, 0.5]
    )  # not diluted by pair 2
    np.testing.assert_allclose(
        pair_vectors(g, labels, "eq6", usable)[1][0], np.array([3.0, 0.0]) / np.linalg.norm([1.5, 0.5])
    )
    assert zero_gradient_pairs(g).tolist() == [2]
    with pytest.raises(
        ValueError, match=r"subtask 'b' has no usable validation pair: every one of its pairs \[3, 4\]"
    ):
        pair_vectors(g, labels, usable=np.array([True, True, True, False, False]))


def test_validation_loss_options_fail_at_config_time():
    assert ROSEConfig(validation_loss_type="ipo").validation_loss_type == ["ipo"]  # one name, as DPOConfig takes
    with pytest.raises(ValueError, match=r"unknown \['dpo'\]; TRL's DPO loss types are \['sigmoid', 'hinge', 'ipo'"):
        ROSEConfig(validation_loss_type=["sigmoid", "dpo"])
    with pytest.raises(ValueError, match="validation_loss_weights has 1 weights for 2"):
        ROSEConfig(validation_loss_type=["sigmoid", "sft"], validation_loss_weights=[1.0])
    with pytest.raises(ValueError, match="exo_pair needs validation_label_smoothing > 0"):
        ROSEConfig(validation_loss_type="exo_pair")
    with pytest.raises(ValueError, match=r"validation_label_smoothing must be in \[0, 0.5\)"):
        ROSEConfig(validation_loss_type="robust", validation_label_smoothing=0.5)
    # store folders: rose/val_dpo/ for the paper's target, rose/val_dpo_<tag>/ for the others
    assert validation_loss_tag(["sigmoid"]) == ""
    assert validation_loss_tag(["ipo"]) == "ipo"
    assert validation_loss_tag(["sigmoid", "sft"], [1.0, 0.2]) == "sigmoid+sft_w1,0.2"
    assert validation_loss_tag(["exo_pair"], None, 1e-3) == "exo_pair_ls0.001"


def test_sequences_keep_their_last_tokens_as_trls_keep_end_did(planted, tiny_base, tmp_path):
    """TRL 2.0 drops truncation_mode="keep_end": KeepLastTokens cuts the same tokens (compared with TRL 1.16's
    collator while it still has the mode), and no pair is dropped however long its prompt."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    _, validation, tokenizer, _ = planted
    trainer = ROSEDPOTrainer(
        trained_adapter_model(tiny_base),
        validation_dpo_config(str(tmp_path), max_length=6, use_cpu=True),
        validation,
        tokenizer,
    )
    assert len(trainer.train_dataset) == len(validation) and trainer.args.max_length is None
    assert isinstance(trainer.data_collator, KeepLastTokens)
    examples = [trainer.train_dataset[i] for i in range(4)]
    assert max(len(e["prompt_ids"]) for e in examples) >= 6  # prompts alone fill max_length
    ours = trainer.data_collator(examples)
    trls = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=6, truncation_mode="keep_end")(
        examples
    )
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(ours[key], trls[key]), key


@pytest.mark.parametrize("loss_type", [["sigmoid"], ["ipo"]])
def test_reference_logps_once_per_run_give_the_same_gradients(planted, tiny_base, tmp_path, loss_type):
    """The reference's log-probs of the pairs are computed once per run (its first checkpoint) and reused at every
    later one; the gradients equal those of TRL's loss running its own reference forward in every pass."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from rose_trl.gradients.featurizer import Featurizer
    from rose_trl.gradients.projection import build_projector
    from rose_trl.stores.validation import ValidationGradients

    _, validation, tokenizer, _ = planted
    validation = validation.select(range(6))
    model = trained_adapter_model(tiny_base)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    featurizer = Featurizer(build_projector("sjlt", n, 64, 0))
    config = ROSEConfig(validation_batch_size=2, validation_loss_type=loss_type)
    stores = ValidationGradients(validation, tokenizer, config, tmp_path / "rose", "fp", max_length=128, use_cpu=True)
    calls = []
    real = ROSEDPOTrainer.compute_ref_log_probs

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    identity = dict(model="m", projection=featurizer.projector.describe(), dtype="float32")
    states = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ROSEDPOTrainer, "compute_ref_log_probs", counted)
        for step in range(3):  # three checkpoints: the adapter moves, the reference does not
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_" in name:
                        p.add_(0.05 * torch.randn_like(p))
            states.append({k: v.clone() for k, v in get_peft_model_state_dict(model).items()})
            stores.store(model, f"checkpoint-{step}", featurizer, {**identity, "checkpoint": f"c{step}"})
    assert len(calls) == 3  # 6 pairs, 2 a pass: one reference pass each, at the first checkpoint only
    trainer = stores._dpo_trainer(model)
    for step, state in enumerate(states):
        set_peft_model_state_dict(model, state)
        per_pass = trainer.pair_gradients(featurizer, reuse_reference=False).numpy()
        np.testing.assert_allclose(
            stores.read(f"checkpoint-{step}", featurizer.projector.describe()), per_pass, rtol=0, atol=0
        )


def test_the_validation_passes_score_the_labelled_positions_only_and_give_the_same_numbers(
    planted, tiny_base, tmp_path, monkeypatch
):
    """On a CPU, TRL's fused LM head scores every position (the prompt's and the padding's too, then masked to 0);
    the validation and reference passes have it score the labelled positions only: fewer positions through the
    head, and bit for bit the same reference log-probs and pair gradients as TRL's own choice."""
    import trl.trainer.utils as trl_utils

    from rose_trl.gradients.featurizer import Featurizer
    from rose_trl.gradients.projection import build_projector

    _, validation, tokenizer, _ = planted
    model = trained_adapter_model(tiny_base)
    model.eval()
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    featurizer = Featurizer(build_projector("sjlt", n, 256, 0))
    trainer = ROSEDPOTrainer(
        model, validation_dpo_config(str(tmp_path), batch_size=3, use_cpu=True), validation.select(range(6)), tokenizer
    )
    scored = []
    real = trl_utils._ChunkedLogProbFunction

    class Counted(real):
        @staticmethod
        def forward(ctx, hidden, *args):
            scored.append(hidden.shape[0])
            return real.forward(ctx, hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Counted)
    batches = list(DataLoader(trainer.train_dataset, batch_size=3, collate_fn=trainer.data_collator))
    labelled = [int(b["completion_mask"][:, 1:].sum()) for b in batches]
    every = [b["input_ids"].shape[0] * (b["input_ids"].shape[1] - 1) for b in batches]
    assert all(a < b for a, b in zip(labelled, every, strict=True))
    # TRL's own choice on a CPU: every position.
    with torch.no_grad():
        ref = [trainer.compute_ref_log_probs(trainer.model, b) for b in batches]
    ref = tuple(torch.cat(x) for x in zip(*ref, strict=True))
    whole = trainer._pair_gradients(featurizer, ref, 3)
    assert scored == every + every
    scored.clear()
    assert trainer.reference_logps()[0].equal(ref[0]) and trainer.reference_logps()[1].equal(ref[1])
    assert trainer.pair_gradients(featurizer).equal(whole)
    assert scored == labelled + labelled  # one reference pass (kept) and one validation pass a batch
    assert trl_utils._use_triton(torch.device("cpu")) is False  # TRL's own choice is back after the passes
