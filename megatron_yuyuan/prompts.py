"""The QA prompt template, shared by preprocessing, training, generation and evaluation.

A training document is ``Question:{question} answer: {answer}<|endoftext|>``: the prompt
``Question:{question} answer:`` (upstream Yuyuan QA's exact spelling), then the answer with its
leading space, then EOS. The prompt ends where a pre-tokenizer boundary is (before the space), so
tokenizing prompt and answer separately gives the same GPT-2 tokens as tokenizing the whole text.
"""

from __future__ import annotations

import re

PROMPT_TEMPLATE = "Question:{question} answer:"
_ANSWER_MARK = re.compile(r"answer:", re.IGNORECASE)


def format_prompt(question: str) -> str:
    """``Question:{question} answer:``"""
    return PROMPT_TEMPLATE.format(question=question)


def format_answer(answer: str) -> str:
    """The answer as it follows the prompt: one leading space."""
    return " " + answer


def format_example(question: str, answer: str) -> str:
    """The full training text, without the EOS token."""
    return format_prompt(question) + format_answer(answer)
