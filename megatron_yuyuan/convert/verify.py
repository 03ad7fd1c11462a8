"""``--verify``: run the source and the converted model on sample text and compare logits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_yuyuan import parallel
from megatron_yuyuan.checkpoint import loader, storage
from megatron_yuyuan.tokenizer import load_tokenizer

SAMPLE_TEXT = (
    "Question:What are the symptoms of Holmes-Adie syndrome ? answer: Holmes-Adie "
    "syndrome is a neurological disorder affecting the pupil of the eye and the "
    "autonomic nervous system. Most people with the syndrome have a larger pupil."
)


@dataclass
class Parity:
    max_abs_diff: float
    top1_agreement: float
    tokens: int

    def line(self) -> str:
        return (
            f"logit parity over {self.tokens} tokens (fp32): max |diff| = {self.max_abs_diff:.3e}, "
            f"top-1 agreement = {100 * self.top1_agreement:.2f}%"
        )


def sample_ids(vocab_size: int, max_len: int) -> torch.Tensor:
    """GPT-2 tokens of SAMPLE_TEXT (folded into the vocabulary for non-GPT-2 test models)."""
    ids = torch.tensor(load_tokenizer("gpt2").encode(SAMPLE_TEXT)) % vocab_size
    return ids[:max_len].unsqueeze(0)  # [1, s]


def megatron_logits(
    load: str | Path, ids: torch.Tensor, tp: int = 1, lora_base: str | Path | None = None
) -> torch.Tensor:
    """fp32 logits ``[b, s, V]`` of a megatron-core checkpoint at tensor-parallel size ``tp``
    (launch ``tp`` processes with torchrun for tp > 1)."""
    layout = parallel.init_distributed(tp, 1)
    # a LoRA checkpoint: the model as trained, base plus unmerged adapters
    model, info = loader.load_model(
        load, layout, torch.float32, merge_adapters=False, lora_base=lora_base
    )
    model.eval()
    device = next(model.parameters()).device  # megatron builds on the GPU when there is one
    with torch.no_grad():
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        logits = model(ids.to(device), positions.to(device), None)  # [b, s, Vp / tp]
        logits = parallel.gather_from_tensor_model_parallel_region(logits)  # [b, s, Vp]
    return logits[..., : info.model.vocab_size].float().cpu()


def hf_logits(hf_dir: str | Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def compare(a: torch.Tensor, b: torch.Tensor) -> Parity:
    return Parity(
        max_abs_diff=float((a - b).abs().max()),
        top1_agreement=float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        tokens=a.shape[0] * a.shape[1],
    )


def verify(
    hf_dir: str | Path,
    load: str | Path,
    tolerance: float,
    tp: int = 1,
    lora_base: str | Path | None = None,
) -> tuple[Parity, bool]:
    """Parity between an HF directory and a megatron-core checkpoint of the same weights."""
    info = storage.read_info(storage.resolve(load))
    ids = sample_ids(info.model.vocab_size, min(64, info.model.max_position_embeddings))
    parity = compare(hf_logits(hf_dir, ids), megatron_logits(load, ids, tp, lora_base))
    return parity, parity.max_abs_diff <= tolerance and parity.top1_agreement == 1.0


def report_verify(
    hf_dir: str | Path, load: str | Path, tolerance: float, lora_base: str | None = None
) -> int:
    """Run :func:`verify`, print its line, and return the CLI's exit status (1 on a mismatch)."""
    parity, ok = verify(hf_dir, load, tolerance, lora_base=lora_base)
    print(f"> {parity.line()} [{'OK' if ok else 'FAIL'}, tolerance {tolerance:g}]")
    return 0 if ok else 1


if (
    __name__ == "__main__"
):  # `python -m megatron_yuyuan.convert.verify`: see megatron_yuyuan.cli.verify
    from megatron_yuyuan.cli.verify import main

    raise SystemExit(main())
