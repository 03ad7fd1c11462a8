"""HF <-> megatron-core conversion: bitwise round trips, logit parity with transformers at TP=2,
resharding through a parallel run, legacy Megatron-LM import, and clear errors."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from checkpoints_convert.to_hf import main as to_hf
from checkpoints_convert.to_megatron import main as to_megatron
from conftest import TORCHRUN_ENV, run_torchrun, torchrun_cmd
from megatron_yuyuan.config import RunConfig, get_preset
from megatron_yuyuan.convert.weight_map import (
    HF_IGNORED,
    HF_TO_MCORE,
    MCORE_TO_HF,
    TRANSFORMS,
    Shapes,
    expected_mcore_names,
    hf_to_mcore,
    mcore_to_hf,
)
from megatron_yuyuan.errors import ConversionError
from megatron_yuyuan.model import build_model


def make_hf(path: Path, vocab=1037, layers=2, heads=4, hidden=64, positions=128, seed=0, **save):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab,
            n_positions=positions,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )
    with torch.no_grad():  # non-trivial LayerNorms and biases, so every transform is exercised
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    if save.pop("bin", False):  # the pickle format older checkpoints (Yuyuan's own) use
        model.config.save_pretrained(str(path))
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    else:
        model.save_pretrained(str(path), **save)
    return model


def hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_bitwise(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def hf_odd(tmp_path_factory):
    """Odd vocabulary (1037), 4 heads, 2 layers."""
    path = tmp_path_factory.mktemp("hf") / "odd"
    make_hf(path)
    return path


def test_name_table_is_one_bijection_covering_both_models(single_process_group):
    from transformers import GPT2Config, GPT2LMHeadModel

    assert len({m for m, _ in HF_TO_MCORE.values()}) == len(HF_TO_MCORE)
    assert {h: (m, t) for m, (h, t) in MCORE_TO_HF.items()} == HF_TO_MCORE
    shapes = Shapes(64, 4, 1100, 1152)
    hf = GPT2LMHeadModel(
        GPT2Config(vocab_size=1100, n_positions=256, n_embd=64, n_layer=4, n_head=4)
    )
    mapped = {
        hf_to_mcore(k, v, shapes)[0]
        for k, v in hf.state_dict().items()
        if hf_to_mcore(k, v, shapes) is not None
    }
    mc = build_model(RunConfig(model=get_preset("tiny")), single_process_group, seed=1).state_dict()
    back = {mcore_to_hf(k, v, shapes)[0] for k, v in mc.items() if mcore_to_hf(k, v, shapes)}
    assert mapped == expected_mcore_names(4) == {k for k in mc if not k.endswith("_extra_state")}
    assert back == {k for k in hf.state_dict() if k != "lm_head.weight"}
    assert "lm_head.weight" in HF_IGNORED
    with pytest.raises(ConversionError, match="unexpected HF weight"):
        hf_to_mcore("transformer.h.0.attn.q_proj.weight", torch.zeros(1), shapes)


@pytest.mark.parametrize("hidden, heads", [(64, 4), (96, 3), (48, 8)])
def test_transforms_invert_exactly(hidden, heads):
    s = Shapes(hidden, heads, 50, 64)
    for name, shape in (
        ("qkv_weight", (hidden, 3 * hidden)),
        ("qkv_bias", (3 * hidden,)),
        ("transpose", (hidden, 2 * hidden)),
        ("pad_vocab", (50, hidden)),
    ):
        fwd, inv = TRANSFORMS[name]
        t = torch.randn(shape)
        assert torch.equal(inv(fwd(t, s), s), t), name
    # head h of mcore's interleaved QKV holds HF's q, k and v columns of that head
    w = torch.randn(hidden, 3 * hidden)
    d = hidden // heads
    mc = TRANSFORMS["qkv_weight"][0](w, s)
    assert torch.equal(mc[d : 2 * d], w[:, hidden : hidden + d].t())  # k of head 0


@pytest.mark.parametrize("tp, pp", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_hf_megatron_hf_round_trip_is_bitwise(hf_odd, tmp_path, tp, pp):
    ckpt, out = tmp_path / "mc", tmp_path / "hf"
    assert (
        to_megatron(
            [
                "--hf-dir",
                str(hf_odd),
                "--save",
                str(ckpt),
                "--tensor-model-parallel-size",
                str(tp),
                "--pipeline-model-parallel-size",
                str(pp),
            ]
        )
        == 0
    )
    assert to_hf(["--load", str(ckpt), "--out", str(out)]) == 0
    assert_bitwise(hf_tensors(hf_odd), hf_tensors(out))
    src, dst = (
        json.loads((hf_odd / "config.json").read_text()),
        json.loads((out / "config.json").read_text()),
    )
    for key in (
        "vocab_size",
        "n_embd",
        "n_layer",
        "n_head",
        "n_positions",
        "activation_function",
        "layer_norm_epsilon",
    ):
        assert src[key] == dst[key], key


@pytest.mark.slow
def test_tp2_logits_match_transformers(hf_odd, tmp_path):
    ckpt = tmp_path / "mc"
    assert (
        to_megatron(
            ["--hf-dir", str(hf_odd), "--save", str(ckpt), "--verify", "--tolerance", "1e-4"]
        )
        == 0
    )
    cmd = torchrun_cmd(
        2,
        "megatron_yuyuan.convert.verify",
        "--hf-dir",
        str(hf_odd),
        "--load",
        str(ckpt),
        "--tensor-model-parallel-size",
        "2",
        "--tolerance",
        "1e-4",
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=TORCHRUN_ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if "logit parity" in x)
    assert "TP=2" in line and "top-1 agreement = 100.00%" in line
    assert float(line.split("max |diff| = ")[1].split(",")[0]) <= 1e-4


@pytest.mark.slow
def test_reshard_through_tp2_pp2_run_is_lossless(hf_odd, tmp_path):
    """HF -> checkpoint padded for TP=1 -> loaded at TP=2 x PP=2 (re-padded), one step at lr 0,
    saved -> HF: every tensor unchanged."""
    ckpt, resaved, out = tmp_path / "mc", tmp_path / "mc2", tmp_path / "hf"
    assert to_megatron(["--hf-dir", str(hf_odd), "--save", str(ckpt)]) == 0
    run_torchrun(
        4,
        [
            "--load",
            str(ckpt),
            "--mock-data",
            "--tensor-model-parallel-size",
            "2",
            "--pipeline-model-parallel-size",
            "2",
            "--lr",
            "0",
            "--weight-decay",
            "0",
            "--train-iters",
            "1",
            "--micro-batch-size",
            "1",
            "--global-batch-size",
            "2",
            "--seq-length",
            "32",
            "--save",
            str(resaved),
        ],
        tmp_path,
    )
    assert (resaved / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert to_hf(["--load", str(resaved), "--out", str(out)]) == 0
    assert_bitwise(hf_tensors(hf_odd), hf_tensors(out))


def test_export_loads_and_generates_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tmp_path / "src"
    original = make_hf(src, vocab=50257, layers=2, heads=2, hidden=32)
    ckpt, out = tmp_path / "mc", tmp_path / "hf"
    assert (
        to_megatron(
            ["--hf-dir", str(src), "--save", str(ckpt), "--tensor-model-parallel-size", "2"]
        )
        == 0
    )
    assert to_hf(["--load", str(ckpt), "--out", str(out), "--verify", "--tolerance", "1e-4"]) == 0
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok("Question")["input_ids"] == [24361] and tok.eos_token_id == 50256
    model = AutoModelForCausalLM.from_pretrained(str(out))
    ids = tok("Question:What is glaucoma ? answer:", return_tensors="pt")["input_ids"]
    got = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=50256)
    want = original.eval().generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=50256)
    assert torch.equal(got, want)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 50256


def test_bin_and_sharded_safetensors_inputs(hf_odd, tmp_path):
    for name, save in (("bin", {"bin": True}), ("sharded", {"max_shard_size": "100KB"})):
        src = tmp_path / name
        make_hf(src, **save)
        assert (
            src / ("pytorch_model.bin" if name == "bin" else "model.safetensors.index.json")
        ).is_file()
        assert to_megatron(["--hf-dir", str(src), "--save", str(tmp_path / f"mc_{name}")]) == 0
        assert (
            to_hf(["--load", str(tmp_path / f"mc_{name}"), "--out", str(tmp_path / f"hf_{name}")])
            == 0
        )
        assert_bitwise(hf_tensors(hf_odd), hf_tensors(tmp_path / f"hf_{name}"))


def write_legacy(hf_dir: Path, root: Path, tp: int, pp: int, version: float) -> None:
    """A Megatron-LM legacy checkpoint of the HF weights, in the layout weight_layout.md §7
    documents."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    h, n, layers, vocab = cfg["n_embd"], cfg["n_head"], cfg["n_layer"], cfg["vocab_size"]
    padded = -(-vocab // (128 * tp)) * 128 * tp
    w = hf_tensors(hf_dir)
    args = argparse.Namespace(
        num_layers=layers,
        hidden_size=h,
        num_attention_heads=n,
        ffn_hidden_size=4 * h,
        max_position_embeddings=cfg["n_positions"],
        padded_vocab_size=padded,
        tokenizer_type="GPT2BPETokenizer",
        openai_gelu=False,
        bias_gelu_fusion=True,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
    )
    emb = torch.zeros(padded, h)
    emb[:vocab] = w["transformer.wte.weight"]
    d = h // n

    def qkv(t, r):  # HF [.., 3h] columns [Q|K|V] -> rank r's rows in the version's order
        t = t.t() if t.dim() == 2 else t
        q, k, v = (
            x.reshape(n, d, *x.shape[1:])[r * n // tp : (r + 1) * n // tp] for x in t.split(h)
        )
        order = {3.0: 1, 1.0: 2, 0.0: 0}[
            version
        ]  # where the 3 sits: [heads,3,hn] / [heads,hn,3] / [3,heads,hn]
        stacked = torch.stack([q, k, v], dim=order)
        return stacked.reshape(-1, *t.shape[1:])

    per = layers // pp
    (root / "latest_checkpointed_iteration.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "latest_checkpointed_iteration.txt").write_text("7")
    for p in range(pp):
        for r in range(tp):
            enc = {}
            for local in range(per):
                pre = f"transformer.h.{p * per + local}."
                L = f"layers.{local}."
                enc[L + "input_layernorm.weight"] = w[pre + "ln_1.weight"]
                enc[L + "input_layernorm.bias"] = w[pre + "ln_1.bias"]
                enc[L + "self_attention.query_key_value.weight"] = qkv(
                    w[pre + "attn.c_attn.weight"], r
                )
                enc[L + "self_attention.query_key_value.bias"] = qkv(w[pre + "attn.c_attn.bias"], r)
                enc[L + "self_attention.dense.weight"] = (
                    w[pre + "attn.c_proj.weight"].t().chunk(tp, 1)[r]
                )
                enc[L + "self_attention.dense.bias"] = w[pre + "attn.c_proj.bias"]
                enc[L + "post_attention_layernorm.weight"] = w[pre + "ln_2.weight"]
                enc[L + "post_attention_layernorm.bias"] = w[pre + "ln_2.bias"]
                enc[L + "mlp.dense_h_to_4h.weight"] = w[pre + "mlp.c_fc.weight"].t().chunk(tp, 0)[r]
                enc[L + "mlp.dense_h_to_4h.bias"] = w[pre + "mlp.c_fc.bias"].chunk(tp, 0)[r]
                enc[L + "mlp.dense_4h_to_h.weight"] = (
                    w[pre + "mlp.c_proj.weight"].t().chunk(tp, 1)[r]
                )
                enc[L + "mlp.dense_4h_to_h.bias"] = w[pre + "mlp.c_proj.bias"]
            lm = {"encoder": {k: v.clone().contiguous() for k, v in enc.items()}}
            if p == 0:
                lm["embedding"] = {
                    "word_embeddings": {"weight": emb.chunk(tp, 0)[r].clone()},
                    "position_embeddings": {"weight": w["transformer.wpe.weight"]},
                }
            if p == pp - 1:
                lm["encoder"]["final_layernorm.weight"] = w["transformer.ln_f.weight"]
                lm["encoder"]["final_layernorm.bias"] = w["transformer.ln_f.bias"]
            rank_dir = (
                root / "iter_0000007" / (f"mp_rank_{r:02d}" + (f"_{p:03d}" if pp > 1 else ""))
            )
            rank_dir.mkdir(parents=True)
            torch.save(
                {
                    "args": args,
                    "checkpoint_version": version,
                    "iteration": 7,
                    "model": {"language_model": lm},
                },
                rank_dir / "model_optim_rng.pt",
            )


@pytest.mark.parametrize("tp, pp, version", [(2, 2, 3.0), (2, 1, 0.0), (1, 2, 1.0)])
def test_legacy_megatron_lm_import(hf_odd, tmp_path, tp, pp, version):
    legacy = tmp_path / "mlm"
    write_legacy(hf_odd, legacy, tp, pp, version)
    ckpt, out = tmp_path / "mc", tmp_path / "hf"
    assert (
        to_megatron(["--megatron-lm-dir", str(legacy), "--vocab-size", "1037", "--save", str(ckpt)])
        == 0
    )
    assert to_hf(["--load", str(ckpt), "--out", str(out)]) == 0
    # Megatron-LM's bias-gelu fusion is tanh GELU: the export says gelu_new like the source.
    assert_bitwise(hf_tensors(hf_odd), hf_tensors(out))


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_embd": 32}, "has shape"),
        ({"n_head": 3}, "must be divisible"),
        ({"vocab_size": 1000}, "word embeddings have 1037 rows, config vocab_size is 1000"),
        ({"activation_function": "relu"}, "activation_function 'relu' is not supported"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ],
)
def test_config_mismatch_is_reported(hf_odd, tmp_path, capsys, change, message):
    bad = _edit_config(hf_odd, tmp_path / "bad", **change)
    assert to_megatron(["--hf-dir", str(bad), "--save", str(tmp_path / "mc")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "mc" / "latest_checkpointed_iteration.txt").exists()


def test_missing_files_and_bad_tp_are_reported(hf_odd, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert to_megatron(["--hf-dir", str(tmp_path / "empty"), "--save", str(tmp_path / "x")]) == 2
    assert "config.json not found" in capsys.readouterr().err
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((hf_odd / "config.json").read_text())
    assert to_megatron(["--hf-dir", str(no_weights), "--save", str(tmp_path / "x")]) == 2
    assert "no model.safetensors" in capsys.readouterr().err
    assert (
        to_megatron(
            [
                "--hf-dir",
                str(hf_odd),
                "--save",
                str(tmp_path / "x"),
                "--tensor-model-parallel-size",
                "3",
            ]
        )
        == 2
    )
    assert "does not divide num_attention_heads 4" in capsys.readouterr().err
    assert to_hf(["--load", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "no checkpoint there" in capsys.readouterr().err


def test_finetune_rejects_a_checkpoint_of_another_shape(hf_odd, tmp_path, capsys):
    from megatron_yuyuan.finetune import main

    assert to_megatron(["--hf-dir", str(hf_odd), "--save", str(tmp_path / "mc")]) == 0
    assert main(["--config", "tiny", "--load", str(tmp_path / "mc"), "--mock-data"]) == 2
    err = capsys.readouterr().err
    assert (
        "does not match the config" in err and "vocab_size: checkpoint 1037 vs config 1100" in err
    )
