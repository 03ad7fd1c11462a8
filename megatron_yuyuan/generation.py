"""Answer generation with a KV cache on the megatron-core model (TP/PP under torchrun), or with a
transformers model through the same interface.

    torchrun --nproc-per-node 2 -m megatron_yuyuan.generate --load ckpt \\
        --tensor-model-parallel-size 2 --input runs/data/medquad_test.jsonl \\
        --output runs/eval/predictions.jsonl --max-new-tokens 128
    python -m megatron_yuyuan.generate --hf-dir hf/yuyuan-qa --question "What causes glaucoma ?"

Prompts are ``Question:{q} answer:`` (:mod:`megatron_yuyuan.prompts`), left-padded into batches.
Decoding is incremental (:mod:`megatron_yuyuan.slots`): one prefill pass fills megatron-core's
static KV cache, then one token per step, chosen on the device (:mod:`megatron_yuyuan.decoding`);
greedy by default, or sampling with temperature / top-k / top-p, each answer from its own generator
seeded ``--seed`` (so an answer does not depend on its batch; every rank draws the same token).
Generation stops at EOS or ``--max-new-tokens``. The answer is the text
generated before EOS. Data-parallel ranks split the questions.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_yuyuan import parallel, runtime
from megatron_yuyuan.data.manifest import check_member
from megatron_yuyuan.errors import UserError
from megatron_yuyuan.files import read_jsonl, write_jsonl
from megatron_yuyuan.prompts import DEFAULT_TEMPLATE, PromptTemplate, answer_from_continuation
from megatron_yuyuan.sampling import SamplingConfig
from megatron_yuyuan.slots import SlotBatch, generate_batch, left_pad
from megatron_yuyuan.tokenizer import Tokenizer, load_tokenizer


def finish_reason(new_tokens: int, budget: int) -> str:
    """``"eos"`` or ``"length"``: generated ids stop before EOS, so an answer shorter than its
    budget ended at EOS."""
    return "eos" if new_tokens < budget else "length"


def row_budgets(
    prompts: Sequence[Sequence[int]], cfg: SamplingConfig, budgets: Sequence[int] | None
) -> torch.Tensor:
    """[b] new-token limits: ``budgets`` (or ``cfg.max_new_tokens``), at least 1 each."""
    limits = torch.full((len(prompts),), cfg.max_new_tokens, dtype=torch.long)
    if budgets is not None:
        limits = torch.as_tensor(list(budgets), dtype=torch.long).clamp(min=1)
    return limits


class MegatronGenerator:
    """Batched generation with this rank's part of a megatron-core ``GPTModel``.

    Args:
        model: this rank's pipeline stage (in memory, e.g. right after training).
        layout: its TP/PP/DP position.
        model_cfg: the model's ModelConfig.
        tokenizer: the tokenizer the model was trained with.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layout: parallel.Layout,
        model_cfg,
        tokenizer: Tokenizer,
        template: PromptTemplate | None = None,
    ) -> None:
        self.template = template or DEFAULT_TEMPLATE
        """The prompt template the model was trained with."""
        self.model = model.eval()
        parallel.use_plain_linear_for_inference(model)
        self.layout = layout
        self.model_cfg = model_cfg
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.tokenizer = tokenizer
        self.vocab_size = model_cfg.vocab_size
        self.max_positions = model_cfg.max_position_embeddings
        self.decoding: dict = {}
        """The decoding its run's evaluation used (a server's defaults; see from_checkpoint)."""

    @classmethod
    def from_checkpoint(
        cls,
        load: str,
        tp: int = 1,
        pp: int = 1,
        tokenizer: str | None = None,
        dtype: torch.dtype = torch.float32,
        lora_base: str | None = None,
    ) -> MegatronGenerator:
        """Load a checkpoint (saved at any TP/PP) at this layout (launch tp * pp * dp processes).
        The tokenizer defaults to the checkpoint's own files, else GPT-2."""
        from megatron_yuyuan.checkpoint import loader, storage

        ckpt = storage.resolve(load)
        layout = parallel.init_distributed(tp, pp)
        # a LoRA checkpoint: its base plus the adapters, merged into the weights
        model, info = loader.load_model(ckpt, layout, dtype, lora_base=lora_base)
        if torch.cuda.is_available():
            model = model.cuda()
        tok_dir = ckpt / "tokenizer"
        spec = tokenizer or (str(tok_dir) if tok_dir.is_dir() else "gpt2")
        tok = load_tokenizer(spec)
        if tok.vocab_size > info.model.vocab_size:
            raise UserError(
                f"--load {load}: the model has {info.model.vocab_size} token ids but the tokenizer "
                f"({spec}) has {tok.vocab_size}; give the model's own --tokenizer"
            )
        template = PromptTemplate(info.prompt_template) if info.prompt_template else None
        generator = cls(model, layout, info.model, tok, template)
        generator.decoding = storage.recorded_decoding(ckpt)
        return generator

    def stepper(self):
        """This model's forward over a slot cache (:mod:`megatron_yuyuan.slots`)."""
        from megatron_yuyuan.steppers import MegatronStepper

        return MegatronStepper(self.model, self.layout, self.model_cfg.hidden_size, self.vocab_size)

    def slot_batch(self, slots: int):
        """Rows that requests join and leave between steps (a server's engine)."""
        return SlotBatch(self.stepper(), slots, self.max_positions, self.tokenizer.eod)

    @torch.inference_mode()  # lighter than no_grad: no version counters on the KV cache
    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        cfg: SamplingConfig,
        use_cache: bool = True,
        budgets: Sequence[int] | None = None,
    ) -> list[list[int]]:
        """New token ids per prompt, up to and excluding EOS.

        Args:
            budgets: per-prompt new-token limits (default: ``cfg.max_new_tokens`` for all).
            use_cache: False recomputes every position at every step (a reference for tests).
        """
        longest = check_prompt_lengths(prompts, self.max_positions)
        limits = row_budgets(prompts, cfg, budgets).clamp(max=self.max_positions - longest)
        configs = [dataclasses.replace(cfg, max_new_tokens=int(n)) for n in limits]
        if not use_cache:
            return self._generate_without_cache(prompts, configs)
        return generate_batch(
            self.stepper(), prompts, configs, self.max_positions, self.tokenizer.eod
        )

    def _generate_without_cache(self, prompts, configs) -> list[list[int]]:
        """Every step recomputes the whole row: the slow reference the KV cache is checked
        against (one prompt at a time, through the same per-row choice)."""
        from megatron_yuyuan.decoding import RowSettings, choose

        eos = self.tokenizer.eod
        stepper = self.stepper()
        out = []
        for prompt, cfg in zip(prompts, configs):
            settings = RowSettings(1, self.device)
            settings.set([0], [cfg])
            ids = list(prompt)
            new: list[int] = []
            while len(new) < cfg.max_new_tokens:
                tokens = torch.as_tensor([ids], device=self.device)
                positions = torch.arange(len(ids), device=self.device)[None]
                causal = torch.ones(len(ids), len(ids), dtype=torch.bool, device=self.device)
                mask = ~causal.tril()[None, None]
                logits = stepper.run(tokens, positions, mask)
                nxt = torch.zeros(1, dtype=torch.long, device=self.device)
                if logits is not None:
                    lengths = torch.tensor([len(ids)], device=self.device)
                    nxt = choose(logits, [0], settings, tokens, lengths, {0: len(ids)})
                token = int(parallel.broadcast_from_last_stage(nxt)[0])
                if token == eos:
                    break
                ids.append(token)
                new.append(token)
            out.append(new)
        return out


def check_prompt_lengths(prompts: Sequence[Sequence[int]], max_positions: int) -> int:
    """The longest prompt's length; a prompt that leaves no room to generate is refused.

    Both generators then generate ``min(max_new_tokens, max_positions - longest)`` tokens at most,
    so a long prompt shortens the answer instead of failing.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("empty prompt: every question must be non-empty")
    longest = max(len(p) for p in prompts)
    if longest >= max_positions:
        raise UserError(
            f"a prompt has {longest} tokens; the model takes at most {max_positions} positions, "
            f"so prompts must be at most {max_positions - 1} tokens: shorten the question"
        )
    return longest


class HFGenerator:
    """The same interface over a transformers causal LM (e.g. an exported checkpoint).

    Args:
        hf_dir: a transformers model directory.
        tokenizer: tokenizer spec (default: the directory's own files).
        dtype: weights dtype (default float32; bfloat16/float16 halve the memory on GPUs).
        device: where to run (default: this process's GPU when there is one, else the CPU).
    """

    def __init__(
        self,
        hf_dir: str,
        tokenizer: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM

        if not (Path(hf_dir) / "config.json").is_file():
            raise UserError(
                f"--hf-dir {hf_dir}: no config.json there; give a transformers model directory "
                f"(e.g. one written by checkpoints_convert.to_hf)"
            )
        self.device = device or runtime.device()
        try:
            model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(
                f"--hf-dir {hf_dir}: transformers cannot load it "
                f"({' '.join(str(exc).split())[:300]})"
            ) from exc
        self.model = model.to(self.device).eval()
        self.tokenizer = load_tokenizer(tokenizer or hf_dir)
        cfg = self.model.config
        positions = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", 0)
        self.max_positions = int(positions or 1 << 30)  # none named: generate as transformers does
        self.layout = None
        self.template = export_template(Path(hf_dir))
        self.decoding = export_decoding(Path(hf_dir))
        """The decoding its run's evaluation used, as the export records it (or nothing)."""

    def slot_batch(self, slots: int):
        """Rows that requests join and leave between steps (a server's engine)."""
        from megatron_yuyuan.steppers import HFStepper

        if self.max_positions >= 1 << 30:
            raise UserError(
                "--hf-dir: the model's config.json names no position limit (n_positions or "
                "max_position_embeddings), which the server sizes its KV cache by; add one"
            )
        vocab = int(self.model.config.vocab_size)
        stepper = HFStepper(self.model, vocab)
        return SlotBatch(stepper, slots, self.max_positions, self.tokenizer.eod)

    @torch.no_grad()
    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        cfg: SamplingConfig,
        use_cache: bool = True,
        budgets: Sequence[int] | None = None,
    ) -> list[list[int]]:
        """As :meth:`MegatronGenerator.generate_ids`, by ``transformers.generate`` itself."""
        eos = self.tokenizer.eod
        longest = check_prompt_lengths(prompts, self.max_positions)
        limits = row_budgets(prompts, cfg, budgets)
        tokens, valid = left_pad(prompts, longest, eos)
        extra = {}
        if budgets is not None:
            extra["stopping_criteria"] = [_RowBudgets(longest, limits, eos)]
        torch.manual_seed(cfg.seed)
        kwargs = (
            dict(do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
            if cfg.do_sample
            else dict(do_sample=False)
        )
        out = self.model.generate(
            input_ids=tokens.to(self.device),
            attention_mask=valid.long().to(self.device),
            # as the megatron generator: stop at the last position the model has
            max_new_tokens=min(int(limits.max()), self.max_positions - longest),
            eos_token_id=eos,
            pad_token_id=eos,
            use_cache=use_cache,
            repetition_penalty=cfg.repetition_penalty,
            no_repeat_ngram_size=cfg.no_repeat_ngram_size,
            **kwargs,
            **extra,
        )
        rows = out[:, longest:].tolist()
        return [row[: row.index(eos)] if eos in row else row for row in rows]


class _RowBudgets:
    """A transformers stopping criterion: per-row budgets (transformers fills a stopped row with
    the pad token, EOS here, so the row is cut there)."""

    def __init__(self, prompt_len: int, limits: torch.Tensor, eos: int) -> None:
        self.prompt_len, self.limits, self.eos = prompt_len, limits, eos
        self.finished = torch.zeros(len(limits), dtype=torch.bool)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        nxt = input_ids[:, -1].cpu()
        count = input_ids.shape[1] - self.prompt_len
        self.finished |= (nxt == self.eos) | (count >= self.limits)
        return self.finished.to(input_ids.device)


def export_template(hf_dir: Path) -> PromptTemplate:
    """The prompt template an export of ours records (the default for other HF models)."""
    from megatron_yuyuan.convert.hf_io import EXPORT_MARKER
    from megatron_yuyuan.files import read_json_object

    marker = hf_dir / EXPORT_MARKER
    if not marker.is_file():
        return DEFAULT_TEMPLATE
    text = read_json_object(marker, "re-export the model").get("prompt_template")
    return PromptTemplate.parse(text, str(marker)) if text else DEFAULT_TEMPLATE


def export_decoding(hf_dir: Path) -> dict:
    """The evaluation decoding an export of ours records (nothing for other HF models)."""
    from megatron_yuyuan.convert.hf_io import EXPORT_MARKER
    from megatron_yuyuan.files import read_json_object

    marker = hf_dir / EXPORT_MARKER
    if not marker.is_file():
        return {}
    decoding = read_json_object(marker, "re-export the model").get("decoding")
    return decoding if isinstance(decoding, dict) else {}


def prompt_ids(tokenizer: Tokenizer, template: PromptTemplate, row) -> list[int]:
    """A row's prompt tokens exactly as training saw them.

    ``row`` is a question string, or a dict with ``question`` and the template's other fields,
    or with ``messages`` (a chat: a final assistant message, the reference, is left out; every
    earlier answer is followed by EOS, as in training)."""
    if isinstance(row, str):
        row = {"question": row}
    fields = {f: row[f] for f in template.extra_fields if f in row}
    if row.get("messages"):
        messages = list(row["messages"])
        if messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        pieces = template.chat_pieces(messages, fields)
        if len(pieces) % 2 == 0:
            raise UserError("a chat to answer must end with a user message")
    else:
        pieces = [template.prompt(row["question"], fields)]
    ids: list[int] = []
    for k, piece in enumerate(pieces):
        ids += tokenizer.encode(piece) + ([tokenizer.eod] if k % 2 else [])
    return ids


def answer_questions(
    generator,
    questions: Sequence,
    cfg: SamplingConfig,
    batch_size: int = 8,
    progress: bool = True,
) -> list[dict]:
    """Generate an answer for each question (a string, or a row: see :func:`prompt_ids`), in the
    generator's prompt template (this rank's share when data parallel)."""
    tok: Tokenizer = generator.tokenizer
    out = []
    batches = range(0, len(questions), batch_size)
    for i in tqdm(batches, desc="generate", unit="batch", disable=not progress, file=sys.stderr):
        chunk = questions[i : i + batch_size]
        prompts = [prompt_ids(tok, generator.template, q) for q in chunk]
        ids = generator.generate_ids(prompts, cfg)
        # both generators stop at this budget (see check_prompt_lengths) or before it, at EOS
        budget = min(cfg.max_new_tokens, generator.max_positions - max(map(len, prompts)))
        for q, new in zip(chunk, ids):
            text = tok.decode(new)
            out.append(
                {
                    "question": q if isinstance(q, str) else q["question"],
                    "prediction": answer_from_continuation(text),
                    "generation": text,
                    "new_tokens": len(new),
                    "finish_reason": finish_reason(len(new), budget),
                }
            )
    return out


def read_questions(path: Path) -> list[dict]:
    """Rows of a JSONL file, each with a non-empty ``question`` string (a dataset's split file
    checked against its manifest first)."""
    check_member(path)
    return read_jsonl(path, required=("question",))


def generate_file(
    generator,
    input_path: Path,
    output_path: Path,
    cfg: SamplingConfig,
    batch_size: int = 8,
    limit: int | None = None,
) -> Path | None:
    """Answer every question of a JSONL file; rank 0 writes the predictions (atomically).
    Rows carry the template's other fields, or a chat's ``messages``."""
    rows = read_questions(input_path)[:limit]
    # Every rank checks every prompt before anything is generated: a too-long question fails
    # the same way on all ranks (no rank left waiting in a collective), and at once.
    tok = generator.tokenizer
    prompts = []
    for n, r in enumerate(rows, 1):
        try:
            prompts.append(prompt_ids(tok, generator.template, r))
        except (UserError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{input_path}:{n}: {exc}") from exc
    check_prompt_lengths(prompts, generator.max_positions)
    layout = generator.layout
    dp, dp_rank = (layout.dp, layout.dp_rank) if layout else (1, 0)
    mine = rows[dp_rank::dp]  # data-parallel ranks split the questions
    answers = answer_questions(generator, mine, cfg, batch_size, progress=parallel.is_rank_0())
    results = [{**{k: r[k] for k in ("id", "qtype") if k in r}, **a} for r, a in zip(mine, answers)]
    if layout and dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size() if parallel.is_rank_0() else None
        dist.gather_object(results, gathered, dst=0)
        if not parallel.is_rank_0():
            return None
        # rank r's first DP peer holds rows r::dp; interleave back into input order
        per_dp = [gathered[r] for r in range(dist.get_world_size()) if _dp_leader(r, layout)]
        results = [None] * len(rows)
        for d, part in enumerate(per_dp):
            results[d::dp] = part
    return write_jsonl(output_path, results)


def _dp_leader(rank: int, layout: parallel.Layout) -> bool:
    """Whether global ``rank`` is (tp 0, pp 0) of its data-parallel replica (megatron's rank order
    is tp fastest, then dp, then pp)."""
    return rank % layout.tp == 0 and rank < layout.tp * layout.dp


def build_generator(
    load: str | None = None,
    hf_dir: str | None = None,
    tp: int = 1,
    pp: int = 1,
    tokenizer: str | None = None,
    dtype: torch.dtype = torch.float32,
    lora_base: str | None = None,
):
    """A generator over a megatron-core checkpoint (``load``; a LoRA one with its base, from the
    recorded path or ``lora_base``) or a transformers dir (``hf_dir``)."""
    if hf_dir:
        return HFGenerator(hf_dir, tokenizer, dtype=dtype)
    return MegatronGenerator.from_checkpoint(
        load, tp, pp, tokenizer, dtype=dtype, lora_base=lora_base
    )
