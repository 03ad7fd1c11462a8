"""The QA prompt template, shared by preprocessing, training, generation and evaluation.

A training document is ``Question:{question} answer: {answer}<|endoftext|>``: the prompt
``Question:{question} answer:`` (upstream Yuyuan QA's exact spelling), then the answer with its
leading space, then EOS. The prompt ends where a pre-tokenizer boundary is (before the space), so
tokenizing prompt and answer separately gives the same GPT-2 tokens as tokenizing the whole text.
"""

from __future__ import annotations

import re

PROMPT_TEMPLATE = "Question:{question} answer:"
EOS_TEXT = "<|endoftext|>"
_ANSWER_MARK = re.compile(r"answer:", re.IGNORECASE)  # upstream's widget also wrote "Answer:"


def format_prompt(question: str) -> str:
    """``Question:{question} answer:``"""
    return PROMPT_TEMPLATE.format(question=question)


def format_answer(answer: str) -> str:
    """The answer as it follows the prompt: one leading space."""
    return " " + answer


def format_example(question: str, answer: str) -> str:
    """The full training text, without the EOS token."""
    return format_prompt(question) + format_answer(answer)


def extract_answer(text: str) -> str:
    """The answer in a full generation ``Question:... answer: ...<|endoftext|>...`` (upstream's rule).

    Text after the first ``answer:`` (any case) up to the first EOS, whitespace-trimmed. Without an
    ``answer:`` marker the whole text (up to EOS) is the answer; empty text gives "".
    """
    text = text.split(EOS_TEXT, 1)[0]
    match = _ANSWER_MARK.search(text)
    return (text[match.end() :] if match else text).strip()


def answer_from_continuation(continuation: str) -> str:
    """The answer in text generated *after* the prompt: up to the first EOS, trimmed."""
    return continuation.split(EOS_TEXT, 1)[0].strip()
