"""The reward of the shipped `reward-es` recipe: a review's sentiment, answered in words.

A verifiable reward from rotten_tomatoes' labels (1 = fresh, 0 = rotten), with trl's signature."""

from __future__ import annotations

import re

WORDS = {0: "negative", 1: "positive"}
FORMAT_CREDIT = 0.2  # answering with either word, even the wrong one: the shape of the answer is learned first


def first_word(completion: str) -> str:
    match = re.search(r"[a-z]+", completion.lower())
    return match.group(0) if match else ""


def answer(completions: list[str], label: list[int], **columns) -> list[float]:
    """1 when a completion's first word is its review's sentiment, `FORMAT_CREDIT` when it is the other
    sentiment word, else 0."""
    return [1.0 if first_word(c) == WORDS[int(y)] else FORMAT_CREDIT if first_word(c) in WORDS.values() else 0.0
            for c, y in zip(completions, label)]
