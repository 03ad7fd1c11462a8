"""The prompt template, carried from preprocessing to training, export, generation and serving.

A training document is ``{prompt}{answer}<|endoftext|>``: the prompt is the template filled from
the row (default ``Question:{question} answer:``, upstream Yuyuan QA's exact spelling), then the
answer with one leading space, then EOS. A chat is the same turn after turn: the template filled
with each user message, the assistant's answer with its space and EOS, the next turn.

The prompt must end where a pre-tokenizer boundary is (before the answer's space), so that
tokenizing prompt and answer separately gives the same tokens as tokenizing the whole text:
:func:`check_split_point` proves that for a template before any data is written.

Where the template lives: ``P_meta.json`` (``template``: the prompt template followed by
`` {answer}<eod>``), each checkpoint trained on ``P`` (``model_config.yaml``), and an HF export's
``chat_template`` (:meth:`PromptTemplate.to_jinja`), so every consumer rebuilds the exact training
prompt without being told.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from megatron_yuyuan.errors import UserError
from megatron_yuyuan.tokenizer import GPT2_EOS as EOS_TEXT

PROMPT_TEMPLATE = "Question:{question} answer:"
META_SUFFIX = " {answer}<eod>"  # how P_meta.json writes what follows the prompt
_ANSWER_MARK = re.compile(r"answer:", re.IGNORECASE)  # upstream's widget also wrote "Answer:"
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class PromptTemplate:
    """A checked prompt template: literal text and ``{field}`` slots, ``{question}`` among them."""

    text: str = PROMPT_TEMPLATE
    """The template, Python ``str.format`` syntax with plain field names only."""

    @classmethod
    def parse(cls, text: str, flag: str = "--prompt-template") -> PromptTemplate:
        """Check ``text``; a :class:`UserError` naming ``flag`` when it is not a usable template."""
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{flag}: the template is empty; e.g. {PROMPT_TEMPLATE!r}")
        try:
            parts = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise UserError(
                f"{flag} {text!r}: not a valid template ({exc}); write fields as {{name}} and a "
                f"literal brace as {{{{ or }}}}"
            ) from exc
        for _, name, spec, conversion in parts:
            if name is None:
                continue
            if not _FIELD_NAME.fullmatch(name) or spec or conversion:
                raise UserError(
                    f"{flag} {text!r}: {{{name}{'!' + conversion if conversion else ''}"
                    f"{':' + spec if spec else ''}}} is not a plain field; use {{name}} with a "
                    f"column name of your data (letters, digits, _)"
                )
        template = cls(text)
        if "question" not in template.fields:
            raise UserError(
                f"{flag} {text!r}: has no {{question}} field, so the question would never reach "
                f"the model; e.g. 'Context: {{context}}\\nQuestion: {{question}} answer:'"
            )
        if "answer" in template.fields:
            raise UserError(
                f"{flag} {text!r}: the template is the prompt only; the answer follows it (with "
                f"one space) and must not appear in it"
            )
        if text != text.rstrip():
            raise UserError(
                f"{flag} {text!r}: ends with whitespace; the answer brings its own leading space "
                f"(end the template at e.g. 'answer:')"
            )
        return template

    @property
    def fields(self) -> tuple[str, ...]:
        """Field names in order of first appearance."""
        names: list[str] = []
        for _, name, _, _ in string.Formatter().parse(self.text):
            if name is not None and name not in names:
                names.append(name)
        return tuple(names)

    @property
    def extra_fields(self) -> tuple[str, ...]:
        """Fields other than ``question`` (taken from the row, e.g. ``context``)."""
        return tuple(f for f in self.fields if f != "question")

    def prompt(self, question: str, fields: Mapping[str, str] | None = None) -> str:
        """The prompt for one question; ``fields`` holds the template's other fields."""
        values = dict(fields or {})
        missing = [f for f in self.extra_fields if not isinstance(values.get(f), str)]
        if missing:
            raise UserError(
                f"the prompt template {self.text!r} needs the field(s) {', '.join(missing)}: "
                f"give them with the question"
            )
        return self.text.format(**values, question=question)

    def chat_pieces(
        self, messages: Sequence[Mapping[str, str]], fields: Mapping[str, str] | None = None
    ) -> list[str]:
        """A conversation as alternating prompt / answer texts (answers with space, no EOS).

        ``messages`` are OpenAI-shaped (``role``, ``content``): an optional leading ``system``
        message (its text and a newline open the first prompt), then user and assistant turns
        alternating; a final user turn gives a last prompt without answer (what to generate)."""
        pieces: list[str] = []
        system = ""
        for k, m in enumerate(messages):
            role, content = m["role"], m["content"]
            if role == "system" and k == 0:
                system = content + "\n"
            elif role == "user" and len(pieces) % 2 == 0:
                values = {**(fields or {}), **{f: m[f] for f in self.extra_fields if f in m}}
                pieces.append((system if not pieces else "") + self.prompt(content, values))
            elif role == "assistant" and len(pieces) % 2 == 1:
                pieces.append(format_answer(content))
            else:
                raise UserError(
                    f"message {k} ({role!r}): a chat is an optional first 'system' message, then "
                    f"'user' and 'assistant' turns alternating, starting with 'user'"
                )
        return pieces

    def to_meta(self) -> str:
        """How ``P_meta.json`` records the template (the prompt, then what follows it)."""
        return self.text + META_SUFFIX

    @classmethod
    def from_meta(cls, meta: Mapping, where: str) -> PromptTemplate:
        """The template a ``P_meta.json`` records (datasets written before templates were
        configurable record the default)."""
        recorded = meta.get("template", PROMPT_TEMPLATE + META_SUFFIX)
        if not isinstance(recorded, str) or not recorded.endswith(META_SUFFIX):
            raise UserError(
                f"{where}: its template {recorded!r} does not end with {META_SUFFIX!r}; the file "
                f"is damaged: rerun the preprocessing"
            )
        return cls.parse(recorded[: -len(META_SUFFIX)], where)

    def to_jinja(self) -> str:
        """A Hugging Face ``chat_template`` that renders exactly :meth:`chat_pieces` (EOS after
        each answer). User messages carry the template's other fields as keys of their own
        (``{"role": "user", "content": q, "context": c}``), or as keyword arguments of
        ``apply_chat_template``."""
        user = []
        for literal, name, _, _ in string.Formatter().parse(self.text):
            if literal:
                user.append(_jinja_str(literal))
            if name == "question":
                user.append("message['content']")
            elif name is not None:
                user.append(f"(message['{name}'] if message['{name}'] is defined else {name})")
        return (
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n' }}"
            f"{{%- elif message['role'] == 'user' -%}}{{{{ {' + '.join(user)} }}}}"
            "{%- elif message['role'] == 'assistant' -%}{{ ' ' + message['content'] + eos_token }}"
            "{%- endif -%}"
            "{%- endfor -%}"
        )


def _jinja_str(text: str) -> str:
    """``text`` as a Jinja string literal (Jinja reads literals with Python's unicode escapes)."""
    out = []
    for ch in text:
        if ch.isascii() and ch.isprintable() and ch not in "'\\":
            out.append(ch)
        else:
            out.append(f"\\U{ord(ch):08x}")
    return "'" + "".join(out) + "'"


DEFAULT_TEMPLATE = PromptTemplate()


def check_split_point(template: PromptTemplate, tokenizer, flag: str = "--prompt-template") -> None:
    """Prompt and answer tokenized apart must give the tokens of the whole text; otherwise the
    model would be trained on token sequences it never sees when it generates after the prompt."""
    probe = {f: f"some {f} text" for f in template.extra_fields}
    for question, answer in (("What is it?", "It is rare."), ("Why", "Because.")):
        prompt = template.prompt(question, probe)
        apart = tokenizer.encode(prompt) + tokenizer.encode(format_answer(answer))
        if apart != tokenizer.encode(prompt + format_answer(answer)):
            raise UserError(
                f"{flag} {template.text!r}: the prompt's last characters merge with the answer's "
                f"first token, so prompt and answer cannot be split cleanly; end the template "
                f"with punctuation such as ':' (e.g. '... answer:')"
            )


def format_prompt(question: str, template: PromptTemplate = DEFAULT_TEMPLATE, **fields) -> str:
    """The prompt for ``question`` (default ``Question:{question} answer:``)."""
    return template.prompt(question, fields)


def format_answer(answer: str) -> str:
    """The answer as it follows the prompt: one leading space."""
    return " " + answer


def format_example(question: str, answer: str) -> str:
    """The full training text with the default template, without the EOS token."""
    return format_prompt(question) + format_answer(answer)


def extract_answer(text: str) -> str:
    """The answer in a full generation ``Question:... answer: ...<|endoftext|>...`` (upstream's
    rule).

    Text after the first ``answer:`` (any case) up to the first EOS, whitespace-trimmed. Without an
    ``answer:`` marker the whole text (up to EOS) is the answer; empty text gives "".
    """
    text = text.split(EOS_TEXT, 1)[0]
    match = _ANSWER_MARK.search(text)
    return (text[match.end() :] if match else text).strip()


def answer_from_continuation(continuation: str) -> str:
    """The answer in text generated *after* the prompt: up to the first EOS, trimmed."""
    return continuation.split(EOS_TEXT, 1)[0].strip()
