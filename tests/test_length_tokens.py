"""The approximate token-counting rule (approx-bpe-v1)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from throttllem._data import data_file
from throttllem._length.tokens import TOKEN_RULE, count_tokens, count_tokens_many


def test_rule_is_named_and_versioned() -> None:
    assert TOKEN_RULE == "approx-bpe-v1"


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("", 0),
        (" ", 0),
        ("hello", 1),
        ("hello world", 2),
        ("Hello, world!", 4),  # Hello , ␣world !
        ("information", 2),  # 11 letters: 1 + ceil(1/4)
        ("internationalization", 4),  # 20 letters: 1 + ceil(10/4)
        ("don't", 2),  # don 't
        ("12345678", 3),  # 123 456 78
        ("**Bold**", 3),
        ("\n\n1. Item", 4),  # \n\n 1 . ␣Item
        ("    code()", 3),  # indentation, code, ()
        ("日本語", 3),  # one per CJK character
    ],
)
def test_known_counts(text: str, tokens: int) -> None:
    assert count_tokens(text) == tokens


@given(st.text(max_size=200))
@settings(max_examples=200, deadline=None)
def test_bounded_and_deterministic(text: str) -> None:
    n = count_tokens(text)
    assert 0 <= n <= len(text)
    assert n == count_tokens(text)
    # only "" and a lone blank (merged into the next piece, like BPE does) are free
    lone_blank = len(text) == 1 and text.isspace() and text not in "\r\n"
    assert (n == 0) == (text == "" or lone_blank)


@given(st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC", min_size=1, max_size=30)))
@settings(max_examples=100, deadline=None)
def test_words_joined_by_spaces_add_up(words: list[str]) -> None:
    # a single space is merged into the next word, as BPE does
    assert count_tokens(" ".join(words)) == sum(count_tokens(w) for w in words)


def test_many_matches_single() -> None:
    texts = ["a b c", "", "Write a poem.", "x" * 100]
    assert count_tokens_many(texts).tolist() == [count_tokens(t) for t in texts]
    assert count_tokens_many([]).dtype == np.int64


def test_calibrated_to_llama3_rules_of_thumb() -> None:
    """~4–5 characters and ~0.75 words per token on real English chat answers."""
    rows = json.loads(data_file("alpaca-eval-outputs/Meta-Llama-3-8B-Instruct.json").read_text())
    outputs = [r["output"] for r in rows]
    tokens = int(count_tokens_many(outputs).sum())
    chars = sum(len(o) for o in outputs)
    words = sum(len(o.split()) for o in outputs)
    assert 4.0 <= chars / tokens <= 5.0
    assert 0.6 <= words / tokens <= 0.8
