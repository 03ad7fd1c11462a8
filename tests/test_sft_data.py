"""QA training samples: answer-only loss masks, EOS trained, and exact packing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_yuyuan.config import DataConfig, RunConfig, get_preset
from megatron_yuyuan.data.sft_dataset import QADataset, pack_first_fit
from megatron_yuyuan.model import build_model, thd_params
from megatron_yuyuan.training import loss_func

SEQ = 256


@pytest.fixture
def gpt2_tiny(single_process_group):
    model_cfg = dataclasses.replace(get_preset("tiny"), vocab_size=50257)
    cfg = RunConfig(model=model_cfg, data=DataConfig(seq_length=SEQ))
    model = build_model(cfg, single_process_group, seed=5)
    return model


def logits_and_grad(model, batch):
    """Forward with labels through the real loss path; returns logits [b, s, V] and
    d loss / d logits."""
    captured = {}
    packed = None
    if "cu_seqlens" in batch:
        packed = thd_params(batch["cu_seqlens"], int(batch["max_seqlen"]))

    def keep(_module, _inputs, output):
        logits = output[0]  # [s, b, V]
        logits.retain_grad()
        captured["logits"] = logits

    handle = model.output_layer.register_forward_hook(keep)
    losses = model(
        batch["tokens"],
        batch["position_ids"],
        batch.get("attention_mask"),
        labels=batch["labels"],
        packed_seq_params=packed,
    )  # [b, s]
    handle.remove()
    loss_sum, _, _ = loss_func(batch["loss_mask"], losses)
    loss_sum.backward()
    logits = captured["logits"]
    return logits.transpose(0, 1), logits.grad.transpose(0, 1)


def test_prompt_and_padding_get_zero_gradient_and_eos_trains(gpt2_tiny, sample_dataset):
    ds = QADataset(f"{sample_dataset}_train", SEQ, packing=False, seed=0)
    short = sorted(range(len(ds.pairs)), key=lambda i: len(ds.pairs[i].tokens))[:2]
    ds._epochs, ds._epoch_starts = [[[i] for i in short]], [0, 2]
    batch = ds.micro_batch([0, 1])  # two pairs of different length: the shorter one is padded
    _, grad = logits_and_grad(gpt2_tiny, batch)
    per_position = grad.abs().sum(-1)  # [b, s]
    for row, i in enumerate(short):
        pair = ds.pairs[i]
        n = len(pair.tokens) - 1
        prompt_labels = slice(0, pair.prompt_len - 1)  # labels that are question tokens
        assert torch.all(per_position[row, prompt_labels] == 0), "prompt tokens must not train"
        assert torch.all(per_position[row, n:] == 0), "padding must not train"
        assert torch.all(per_position[row, pair.prompt_len - 1 : n] > 0), "answer tokens train"
        assert batch["labels"][row, n - 1] == 50256 and per_position[row, n - 1] > 0, "EOS trains"
    assert per_position[0, len(ds.pairs[short[0]].tokens) - 1 :].numel() > 0


def test_train_on_prompt_trains_question_tokens(sample_dataset):
    ds = QADataset(f"{sample_dataset}_train", SEQ, packing=False, train_on_prompt=True, seed=0)
    sample = ds.build_sample([0], SEQ)
    n = len(ds.pairs[0].tokens) - 1
    assert torch.all(sample["loss_mask"][:n] == 1) and torch.all(sample["loss_mask"][n:] == 0)


def test_packed_pairs_match_pairs_run_alone(gpt2_tiny, sample_dataset):
    gpt2_tiny.eval()
    ds = QADataset(f"{sample_dataset}_train", SEQ, packing=True, seed=0)
    multi = [i for i in range(ds.samples_per_epoch()) if len(ds.sample_pairs(i)) >= 2][:2]
    batch = ds.micro_batch(multi)
    assert batch["tokens"].shape == (2, SEQ)
    with torch.no_grad():
        packed = gpt2_tiny(batch["tokens"], batch["position_ids"], batch["attention_mask"])
    checked = 0
    for row in range(2):
        pos = 0
        for i in ds.sample_pairs(multi[row]):
            tokens = torch.as_tensor(ds.pairs[i].tokens[:-1]).unsqueeze(0)
            n = tokens.shape[1]
            with torch.no_grad():
                alone = gpt2_tiny(tokens, torch.arange(n).unsqueeze(0), None)
            torch.testing.assert_close(packed[row, pos : pos + n], alone[0], rtol=1e-5, atol=1e-5)
            pos += n
            checked += 1
    assert checked >= 4


def test_thd_layout_gives_the_masked_batch_its_logits_and_gradients(gpt2_tiny, sample_dataset):
    ds = QADataset(f"{sample_dataset}_train", SEQ, packing=True, seed=0)
    rows = [i for i in range(ds.samples_per_epoch()) if len(ds.sample_pairs(i)) >= 2][:3]
    masked = ds.micro_batch(rows)
    thd = ds.micro_batch(rows, thd=True)
    assert thd["tokens"].shape == (1, 3 * SEQ) and "attention_mask" not in thd
    cu = thd["cu_seqlens"].tolist()
    # one run per pair, plus each row's padding tail; every row starts a run
    pairs = sum(len(ds.sample_pairs(i)) for i in rows)
    assert pairs <= len(cu) - 1 <= pairs + 3 and {0, SEQ, 2 * SEQ} <= set(cu) and cu[-1] == 3 * SEQ
    assert int(thd["max_seqlen"]) == max(b - a for a, b in zip(cu, cu[1:]))
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        assert torch.equal(thd[key].view(3, SEQ), masked[key])
    logits_m, grad_m = logits_and_grad(gpt2_tiny, masked)
    gpt2_tiny.zero_grad()
    logits_t, grad_t = logits_and_grad(gpt2_tiny, thd)
    torch.testing.assert_close(logits_t.reshape(3, SEQ, -1), logits_m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_t.reshape(3, SEQ, -1), grad_m, rtol=1e-5, atol=1e-7)


def test_packing_is_dense_and_deterministic(sample_dataset):
    ds = QADataset(f"{sample_dataset}_train", SEQ, packing=True, seed=3)
    again = QADataset(f"{sample_dataset}_train", SEQ, packing=True, seed=3)
    assert [ds.sample_pairs(i) for i in range(30)] == [again.sample_pairs(i) for i in range(30)]
    used = sum(len(p.tokens) - 1 for p in ds.pairs)
    assert used / (ds.samples_per_epoch() * SEQ) > 0.9
    # every pair exactly once per epoch
    epoch = [i for s in range(ds.samples_per_epoch()) for i in ds.sample_pairs(s)]
    assert sorted(epoch) == list(range(len(ds.pairs)))
    assert ds.sample_pairs(ds.samples_per_epoch()) != ds.sample_pairs(0)  # next epoch reshuffled


def test_first_fit_respects_capacity():
    lengths = [5, 7, 3, 9, 1, 10, 2]
    bins = pack_first_fit(lengths, 10, torch.arange(len(lengths)).numpy())
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
