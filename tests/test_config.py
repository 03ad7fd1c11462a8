"""Config dataclasses: presets, YAML round trip, Megatron-named flags, and clear errors."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import REPO
from megatron_yuyuan.cli.arguments import parse_config
from megatron_yuyuan.config import (
    PRESETS,
    SECTIONS,
    ConfigError,
    RunConfig,
    get_preset,
    load_config,
    validate_layout,
)
from megatron_yuyuan.dataclass_fields import field_docs
from megatron_yuyuan.finetune import main


def test_every_field_has_a_docstring():
    for cls in SECTIONS.values():
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without docstring: {missing}"


def test_yuyuan_preset_shape():
    m = get_preset("yuyuan-3.5b")
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_size) == (30, 3072, 32, 12288)
    assert (m.max_position_embeddings, m.vocab_size, m.layernorm_epsilon) == (1024, 50257, 1e-5)
    assert m.activation == "gelu_tanh"
    # Megatron's padding rule: multiple of 128 * TP.
    assert [m.padded_vocab_size(tp) for tp in (1, 2, 4, 8)] == [50304, 50432, 50688, 51200]
    assert get_preset("small").vocab_size == 50257
    tiny = get_preset("tiny")
    assert tiny.hidden_size <= 128


def test_yaml_round_trip(tmp_path):
    cfg = parse_config(
        [
            "--config",
            "small",
            "--tensor-model-parallel-size",
            "2",
            "--lr",
            "3e-5",
            "--mock-data",
            "--seq-length",
            "256",
            "--recompute-granularity",
            "full",
        ]
    )
    path = cfg.to_yaml(tmp_path / "run.yaml")
    again = RunConfig.from_yaml(path)
    assert again == cfg
    assert again.parallel.tensor_model_parallel_size == 2 and again.train.lr == 3e-5
    assert again.data.mock_data and again.model.num_layers == PRESETS["small"].num_layers


def test_yaml_preset_with_overrides_and_flags_win(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {preset: tiny, num_layers: 2}\ntrain: {train_iters: 7, lr: 0.001}\n")
    cfg = parse_config(["--config", str(path), "--train-iters", "3"])
    assert cfg.model.num_layers == 2 and cfg.model.hidden_size == PRESETS["tiny"].hidden_size
    assert cfg.train.train_iters == 3 and cfg.train.lr == 0.001


@pytest.mark.parametrize(
    "text, needle",
    [
        ("model: {preset: huge}\n", "unknown model preset 'huge'"),
        ("model: tiny\ntrain: {learning_rate: 1}\n", "unknown field(s) ['learning_rate']"),
        ("optim: {}\n", "unknown section(s) ['optim']"),
        ("train: {lr: 1.0}\n", "missing section 'model'"),
        ("model: {num_layers: 2}\n", "missing"),
    ],
)
def test_bad_yaml_names_the_problem(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as err:
        RunConfig.from_yaml(path)
    assert needle in str(err.value)


def test_load_config_unknown_preset():
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config("gpt-17")


def test_validate_layout_returns_dp():
    cfg = parse_config(
        [
            "--config",
            "tiny",
            "--tensor-model-parallel-size",
            "2",
            "--micro-batch-size",
            "2",
            "--global-batch-size",
            "8",
        ]
    )
    assert validate_layout(cfg, world_size=4) == 2


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--config", "nope"], "neither a preset"),
        (["--mock-data"], "no --config given"),
        (
            ["--config", "tiny", "--tensor-model-parallel-size", "3"],
            "does not divide num_attention_heads 4",
        ),
        (
            ["--config", "tiny", "--tensor-model-parallel-size", "2"],
            "world size 1 is not divisible",
        ),
        (
            ["--config", "tiny", "--micro-batch-size", "3", "--global-batch-size", "4"],
            "--global-batch-size 4 is not divisible by --micro-batch-size 3",
        ),
        (
            ["--config", "tiny", "--pipeline-model-parallel-size", "3"],
            "does not divide num_layers 4",
        ),
        (
            ["--config", "tiny", "--seq-length", "4096", "--mock-data"],
            "exceeds max_position_embeddings",
        ),
        (["--config", "tiny"], "no training data"),
        (
            ["--config", "tiny", "--data-prefix", "/nonexistent/mq"],
            "/nonexistent/mq_train.bin/.idx not found",
        ),
        (["--config", "tiny", "--data-prefix", "x", "--mock-data"], "exclude each other"),
        (["--config", "tiny", "--bf16", "--fp16"], "mutually exclusive"),
        (
            ["--config", "tiny", "--train-iters", "4", "--lr-warmup-iters", "5"],
            "must exceed --lr-warmup-iters",
        ),
    ],
)
def test_cli_rejects_bad_config_before_any_work(flags, message, capsys):
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


@pytest.mark.parametrize(
    "name, world_size, dp",
    [
        ("demo_cpu.yaml", 2, 1),
        ("yuyuan_3.5b_medquad.yaml", 8, 8),  # one node: TP=1 PP=1, DP over its 8 GPUs
        ("yuyuan_3.5b_medquad_tp2pp2.yaml", 16, 4),
        ("yuyuan_3.5b_medquad_lora.yaml", 1, 1),  # LoRA on one GPU
    ],
)
def test_run_configs_fit_their_documented_layout(monkeypatch, name, world_size, dp):
    from megatron_yuyuan import config

    monkeypatch.setattr(config, "_cuda_available", lambda: True)  # their bf16 needs a GPU
    cfg = RunConfig.from_yaml(REPO / "run" / "configs" / name)
    assert validate_layout(cfg, world_size) == dp
