"""One row of the user's QA data -> a checked example -> token sequences (run in worker processes).

Rows come as raw lines (JSON, or the upstream Yuyuan-QA's Python-literal dicts read with
``ast.literal_eval``, which evaluates literals only and never runs code) or as already decoded
dicts (CSV, Parquet, Arrow, JSON arrays, MedQuAD XML). Each becomes either an example — its JSON
record for the split files and its token sequences, alternating prompt / answer — or a bad row
with a reason. Kept free of torch and megatron imports so that spawned workers start quickly.
"""

from __future__ import annotations

import ast
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from megatron_yuyuan.data.medquad import normalize_answer, normalize_question
from megatron_yuyuan.prompts import PromptTemplate, format_answer
from megatron_yuyuan.tokenizer import Tokenizer, load_tokenizer

# Shapes recognised when --question-field / --answer-field are not given, in order.
KNOWN_SHAPES = (
    ("question", "answer"),
    ("instruction", "output"),  # alpaca; a non-empty "input" joins the instruction after "\n"
    ("prompt", "completion"),
    ("query", "response"),
)
CHAT_FIELDS = {"messages": ("role", "content"), "conversations": ("from", "value")}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_SHAREGPT_ROLES |= {"system": "system", "chatgpt": "assistant", "bing": "assistant"}


@dataclass(frozen=True)
class FieldMap:
    """Which of a row's fields hold what."""

    question: str = "question"
    answer: str = "answer"
    chat: str | None = None
    """``messages`` (OpenAI role/content) or ``conversations`` (ShareGPT from/value)."""
    alpaca_input: str | None = None
    """Alpaca's ``input``: appended to the question after a newline when not empty."""
    id: str | None = None
    group: str | None = None
    extra: tuple[str, ...] = ()
    """The prompt template's fields besides the question, read from the row."""

    def describe(self) -> str:
        if self.chat:
            what = f"chat turns from '{self.chat}'"
        else:
            q = f"'{self.question}'" + (f" + '{self.alpaca_input}'" if self.alpaca_input else "")
            what = f"question <- {q}, answer <- '{self.answer}'"
        for name, value in (("id", self.id), ("group", self.group)):
            if value:
                what += f", {name} <- '{value}'"
        if self.extra:
            what += ", template fields " + ", ".join(f"'{f}'" for f in self.extra)
        return what


@dataclass
class BatchResult:
    """What a worker sends back for one batch of rows."""

    records: list[bytes] = field(default_factory=list)
    """One JSON line per kept row, UTF-8 encoded with its newline (as the split files hold it)."""
    ids: list[str] = field(default_factory=list)
    keys: list[tuple[int, int, int, int]] = field(default_factory=list)
    """(question key, answer key, duplicate key, group key) per kept row: 63-bit hashes."""
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    """Every kept row's sequences, end to end."""
    seq_lengths: list[int] = field(default_factory=list)
    seq_counts: list[int] = field(default_factory=list)
    """Sequences per kept row (2 for a QA pair, 2 per turn for a chat)."""
    bad: list[tuple[str, str]] = field(default_factory=list)
    """(reason, location) per dropped row."""


class BadRow(Exception):
    """A row that cannot be used; the message is the reason counted in the report."""


def key(text: str) -> int:
    """A 63-bit hash of ``text`` (split and duplicate keys: memory stays flat in the rows)."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def decode_line(line: bytes) -> Any:
    """A JSON value, or a Python literal (the upstream's ``{'question': ..., 'answer': ...}``)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRow("not UTF-8") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    except RecursionError as exc:
        raise BadRow("nested too deeply") from exc
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        raise BadRow("not a JSON object or Python-literal dict") from exc


def _text(row: dict, name: str) -> str:
    if name not in row:
        raise BadRow(f"missing field '{name}'")
    if row[name] is None:
        raise BadRow(f"null field '{name}'")
    value = row[name]
    if not isinstance(value, str):
        raise BadRow(f"field '{name}' is not a string")
    value = value.replace("\r\n", "\n").strip()  # CSV cells keep Windows line ends
    if not value:
        raise BadRow(f"empty field '{name}'")
    return value


def _messages(row: dict, name: str) -> list[dict]:
    turns = row.get(name)
    if turns is None:
        raise BadRow(f"missing field '{name}'")
    if not isinstance(turns, list) or not turns:
        raise BadRow(f"field '{name}' is not a non-empty list of messages")
    role_key, content_key = CHAT_FIELDS[name]
    out = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise BadRow(f"a message in '{name}' is not an object")
        role = turn.get(role_key)
        role = _SHAREGPT_ROLES.get(role) if name == "conversations" else role
        if role not in ("system", "user", "assistant"):
            raise BadRow(f"a message in '{name}' has an unknown {role_key} {turn.get(role_key)!r}")
        content = turn.get(content_key)
        if isinstance(content, list):  # OpenAI's content parts: [{"type": "text", "text": ...}]
            parts = [p.get("text") for p in content if isinstance(p, dict)]
            if all(isinstance(p, str) for p in parts) and len(parts) == len(content):
                content = "".join(parts)
        if not isinstance(content, str) or not content.strip():
            raise BadRow(f"a message in '{name}' has no text in '{content_key}'")
        out.append({"role": role, "content": content.replace("\r\n", "\n").strip()})
    while out and out[-1]["role"] != "assistant":  # a trailing question has no answer to learn
        out.pop()
    if not any(m["role"] == "assistant" for m in out):
        raise BadRow(f"'{name}' has no assistant answer")
    return out


def _row_id(row: dict, fields: FieldMap, default: str) -> str:
    if not fields.id:
        return default
    value = row.get(fields.id)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
        raise BadRow(f"field '{fields.id}' (the id) is missing or not a string or integer")
    return str(value)


def make_example(row: Any, fields: FieldMap, template: PromptTemplate, default_id: str):
    """(JSON record, texts alternating prompt / answer, keys) of one decoded row."""
    if not isinstance(row, dict) or not all(isinstance(k, str) for k in row):
        raise BadRow("not an object with named fields")
    extra = {f: _text(row, f) for f in fields.extra}
    rec: dict[str, Any] = {"id": _row_id(row, fields, default_id)}
    if fields.chat:
        messages = _messages(row, fields.chat)
        try:
            pieces = template.chat_pieces(messages, extra)
        except ValueError as exc:
            raise BadRow("chat turns out of order (system first, then user/assistant)") from exc
        users = [m["content"] for m in messages if m["role"] == "user"]
        assistants = [m["content"] for m in messages if m["role"] == "assistant"]
        question, answer = users[-1], assistants[-1]
        rec.update(messages=messages, question=question, answer=answer)
        dup = json.dumps(messages, ensure_ascii=False)
        # split keys: the whole conversation's user side and assistant side (two chats that
        # merely end with the same "More?" are not one group)
        keys_q, keys_a = "\n".join(users), "\n".join(assistants)
    else:
        question = _text(row, fields.question)
        if fields.alpaca_input and isinstance(row.get(fields.alpaca_input), str):
            more = row[fields.alpaca_input].strip()
            question = f"{question}\n{more}" if more else question
        answer = _text(row, fields.answer)
        pieces = [template.prompt(question, extra), format_answer(answer)]
        rec.update(question=question, answer=answer)
        dup = question + "\x00" + answer + "\x00" + json.dumps(extra, sort_keys=True)
        keys_q, keys_a = question, answer
    rec.update(extra)
    group = row.get(fields.group) if fields.group else None
    if fields.group and (group is None or isinstance(group, (dict, list))):
        raise BadRow(f"field '{fields.group}' (the group) is missing or not a plain value")
    keys = (
        key(normalize_question(keys_q)),
        key(normalize_answer(keys_a)),
        key(dup),
        key(f"{fields.group}={group}") if fields.group else 0,
    )
    return rec, pieces, keys


_worker: dict[str, Any] = {}


def init_worker(tokenizer_spec: str, fields_by_input: dict, template_text: str) -> None:
    _worker.update(
        tok=load_tokenizer(tokenizer_spec),
        fields=fields_by_input,
        template=PromptTemplate(template_text),
    )


def process_rows(
    job: tuple[int, str, Sequence[Any], Sequence[str], int],
    tok: Tokenizer | None = None,
    fields_by_input: dict | None = None,
    template: PromptTemplate | None = None,
) -> BatchResult:
    """Check, format and tokenise one batch: ``(input no, kind, items, locations, first row
    ordinal)``; ``kind`` is ``lines`` (raw bytes) or ``rows`` (decoded dicts)."""
    tok = tok or _worker["tok"]
    fields = (fields_by_input or _worker["fields"])[job[0]]
    template = template or _worker["template"]
    input_no, kind, items, locations, first = job
    out = BatchResult()
    texts: list[str] = []
    for n, (item, where) in enumerate(zip(items, locations)):
        try:
            row = decode_line(item) if kind == "lines" else item
            rec, pieces, keys = make_example(row, fields, template, f"{input_no + 1}:{first + n}")
            # encoding here also finds unpaired surrogates (from \udfff escapes): not writable
            line = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
        except BadRow as exc:
            out.bad.append((str(exc), where))
            continue
        except UnicodeEncodeError:
            out.bad.append(("text with unpaired surrogates (not valid Unicode)", where))
            continue
        out.records.append(line)
        out.ids.append(rec["id"])
        out.keys.append(keys)
        out.seq_counts.append(len(pieces))
        texts.extend(pieces)
    ids = tok.encode_batch(texts) if texts else []
    eod = tok.eod
    seqs = []
    for k, seq in enumerate(ids):
        # pieces alternate prompt, answer: every answer ends with EOS
        seqs.append(np.asarray(seq + [eod] if k % 2 else seq, dtype=np.int32))
    if seqs:
        # a turn boundary inside one row is where pieces alternate: per row they come in order
        out.tokens = np.concatenate(seqs)
    out.seq_lengths = [len(s) for s in seqs]
    return out
