"""models.state_tokens: first-token classification, the token budget, history state, visible text."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from models.state_tokens import (
    STATE_TOKEN_TEXT,
    StateTokens,
    VisibleText,
    classify_first_token,
    history_state,
    reply_token_budget,
    split_state_prefix,
    strip_special_tokens,
)

V15 = StateTokens.vita15()
V10 = StateTokens.vita10(642, 643, 644)


def test_classify_first_token() -> None:
    assert [classify_first_token(i, V15) for i in (144766, 146164, 145789, 198)] == [
        "query",
        "noise",
        "text",
        "unknown",
    ]
    assert [V10.kind_of(i) for i in (642, 643, 644, 1)] == ["query", "noise", "text", "unknown"]
    assert classify_first_token(144766, None) == "unknown"  # a checkpoint without state tokens
    assert classify_first_token(None, V15) == "unknown"  # no token at all
    config_ids = SimpleNamespace(query=5, noise=6, text=7)  # models.config.StateTokens has the same fields
    assert classify_first_token(6, config_ids) == "noise"


def test_state_tokens_of_a_layout() -> None:
    assert StateTokens.for_layout("vita15", {"query": 144766, "noise": 146164, "text": 145789}) == V15
    assert StateTokens.for_layout("vita10", SimpleNamespace(query=642, noise=643, text=644)) == V10
    assert [V10.text_of(k) for k in ("query", "noise", "text", "unknown")] == ["<1>", "<2>", "<3>", ""]
    with pytest.raises(ValueError, match="layout"):
        StateTokens.for_layout("vita20", {"query": 1, "noise": 2, "text": 3})


def test_token_budget_counts_the_state_token_apart() -> None:
    assert reply_token_budget(32, V15) == 33
    assert reply_token_budget(32, None) == 32
    with pytest.raises(ValueError, match=">= 1"):
        reply_token_budget(0, V15)


def test_history_state_and_prefix() -> None:
    assert history_state(user_had_audio=True) == "query"
    assert history_state(user_had_audio=False) == "text"
    assert split_state_prefix("☞Hello", "vita15") == ("query", "Hello")
    assert split_state_prefix("<2>", "vita10") == ("noise", "")
    assert split_state_prefix("<2>x", "vita15") == (None, "<2>x")  # not a VITA-1.5 state token
    assert split_state_prefix("Hello☞", "vita15") == (None, "Hello☞")


def test_strip_special_tokens() -> None:
    assert strip_special_tokens("<1>a☜b<3>c<|im_start|>d</s><s><unk><pad>e") == "abcde"
    assert strip_special_tokens("a <b> c < d <|x y|> <2 >") == "a <b> c < d <|x y|> <2 >"
    assert strip_special_tokens("a<END>b", extra=("<END>",)) == "ab"
    assert set(STATE_TOKEN_TEXT) == {"vita15", "vita10"}


def test_visible_text_is_the_same_however_split() -> None:
    raw = "☞ Hello<|im_end|> wor<3>ld ☜<b> a<|x"
    for i in range(len(raw) + 1):
        for j in range(i, len(raw) + 1):
            text = VisibleText()
            out = text.push(raw[:i]) + text.push(raw[i:j]) + text.push(raw[j:]) + text.flush()
            assert out == "Hello world <b> a<|x", (i, j)


def test_a_special_token_split_across_two_deltas_is_hidden() -> None:
    text = VisibleText()
    assert text.push("<2>") == ""
    assert text.push("Sure, it is sunny.<|im_") == "Sure, it is sunny."
    assert text.push("end|>") == ""
    assert text.flush() == ""
    text = VisibleText()
    assert text.push("☞ Fine</") == "Fine"
    assert text.push("s>") == ""
    assert text.flush() == ""


def test_a_held_tail_that_is_not_a_token_comes_out() -> None:
    text = VisibleText()
    assert text.push("1 <") == "1 "
    assert text.push(" 2") == "< 2"  # "< " cannot start a special token: emitted at once
    assert text.push(" <u") == " "
    assert text.push("s>") == "<us>"
    assert text.push(" <|im") == " "
    assert text.flush() == "<|im"


def test_leading_blanks_after_the_state_token_are_dropped() -> None:
    text = VisibleText()
    assert text.push("☜") == ""
    assert text.push("\n ") == ""
    assert text.started is False
    assert text.push(" Hi  there") == "Hi  there"
    assert text.started is True
    assert text.push(" \n") == " \n"


def test_extra_hidden_strings_are_held_back_too() -> None:
    text = VisibleText(extra=("[END]",))
    assert text.push("done [EN") == "done "
    assert text.push("D] more") == " more"
