"""The GPTModel builder: parameter counts (meta device) and the pad-row loss masking."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_yuyuan.config import RunConfig, get_preset
from megatron_yuyuan.model import (
    build_model,
    count_model_parameters,
    count_parameters,
    language_model_loss,
    mask_padded_vocab,
)
from megatron_yuyuan.training import loss_func


def test_yuyuan_parameter_count_on_meta_device(single_process_group):
    cfg = RunConfig(model=get_preset("yuyuan-3.5b"))
    with torch.device("meta"):
        model = build_model(cfg, single_process_group, seed=None)
    assert all(p.is_meta for p in model.parameters())
    padded = cfg.model.padded_vocab_size(1)
    assert padded == 50304
    built = count_model_parameters(model)
    # The analytic count (shared/notes/weight_layout.md): 30(12h^2 + 13h) + Vh + Ph + 2h.
    h = 3072
    assert built == 30 * (12 * h * h + 13 * h) + padded * h + 1024 * h + 2 * h == 3_556_270_080
    assert built == count_parameters(cfg.model, padded_vocab=padded)
    # Without the 47 padding rows: the HF GPT2LMHeadModel count.
    assert count_parameters(cfg.model) == 3_556_125_696


def test_tiny_model_count_matches_analytic(single_process_group):
    cfg = RunConfig(model=get_preset("tiny"))
    model = build_model(cfg, single_process_group, seed=1)
    padded = cfg.model.padded_vocab_size(1)
    assert count_model_parameters(model) == count_parameters(cfg.model, padded_vocab=padded)
    emb = model.embedding.word_embeddings.weight
    assert torch.all(emb[cfg.model.vocab_size :] == 0), "pad rows must start at zero"
    assert emb[: cfg.model.vocab_size].std() > 0.01


def test_initial_weights_depend_only_on_seed(single_process_group):
    cfg = RunConfig(model=get_preset("tiny"))
    a = build_model(cfg, single_process_group, seed=7).state_dict()
    b = build_model(cfg, single_process_group, seed=7).state_dict()
    c = build_model(cfg, single_process_group, seed=8).state_dict()
    key = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


def test_padded_vocab_rows_are_excluded_from_the_loss(single_process_group):
    torch.manual_seed(0)
    vocab, padded = 10, 16
    logits = torch.randn(2, 5, padded, requires_grad=True)
    labels = torch.randint(vocab, (2, 5))
    mask = torch.ones(2, 5)
    mask[0, :2] = 0
    loss_sum, num_tokens, report = loss_func(mask, language_model_loss(logits, labels, vocab))
    ref = F.cross_entropy(
        logits[..., :vocab].reshape(-1, vocab), labels.reshape(-1), reduction="none"
    ).reshape(2, 5)
    torch.testing.assert_close(loss_sum, (ref * mask).sum(), rtol=1e-6, atol=1e-6)
    assert int(num_tokens) == 8 and float(report["lm loss"][1]) == 8
    loss_sum.backward()
    assert torch.all(logits.grad[..., vocab:] == 0), "pad columns must get no gradient"
    assert torch.all(logits.grad[0, :2] == 0), "masked positions must get no gradient"
    # A shard entirely past the real vocabulary (high TP rank) is fully masked.
    assert torch.isinf(mask_padded_vocab(torch.zeros(1, 1, 8), vocab_size=10, tp_rank=2)).all()
