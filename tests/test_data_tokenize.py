"""Tokenisation for training: chat template applied, loss on assistant tokens only."""

from __future__ import annotations

import pytest

from ftservice.data.tokenize import (
    IGNORE,
    assistant_spans,
    count_tokens,
    count_tokens_batch,
    tokenize_chat,
    truncate_response,
)

CONVERSATION = [
    {"role": "system", "content": "You answer about Brindlewood."},
    {"role": "user", "content": "How heavy is the Quillfeather?"},
    {"role": "assistant", "content": "The Quillfeather weighs 257 grams."},
    {"role": "user", "content": "And its colour?"},
    {"role": "assistant", "content": "It comes in slate teal."},
]


@pytest.fixture(scope="module")
def tokenizer(builtin_model):
    from ftservice.models import load_tokenizer

    return load_tokenizer(builtin_model)


def test_unmasked_tokens_are_exactly_the_assistant_text(tokenizer):
    out = tokenize_chat(tokenizer, CONVERSATION)
    ids, labels = out["input_ids"], out["labels"]
    assert len(ids) == len(labels) == len(out["assistant_masks"])
    assert ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    # split the labelled tokens into their contiguous runs: one per assistant turn
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label == IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    if current:
        runs.append(current)
    decoded = [tokenizer.decode(r, skip_special_tokens=True) for r in runs]
    assert decoded == ["The Quillfeather weighs 257 grams.", "It comes in slate teal."]
    # each run ends with the end-of-turn token, so the model learns to stop
    assert all(r[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") for r in runs)
    # nothing of the system or user turns is labelled
    labelled_text = tokenizer.decode(
        [t for t, m in zip(ids, out["assistant_masks"], strict=True) if m]
    )
    assert "How heavy" not in labelled_text and "Brindlewood" not in labelled_text


def test_full_loss_when_completion_only_is_off(tokenizer):
    out = tokenize_chat(tokenizer, CONVERSATION, completion_only=False)
    assert out["labels"] == out["input_ids"]


def test_max_length_cuts_every_field_alike(tokenizer):
    out = tokenize_chat(tokenizer, CONVERSATION, max_length=20)
    assert {len(v) for v in out.values()} == {20}


def test_spans_and_counts_agree(tokenizer):
    ids, spans = assistant_spans(tokenizer, CONVERSATION)
    assert len(spans) == 2 and spans[0][1] < spans[1][0]
    row = {"kind": "chat", "messages": CONVERSATION, "chosen": None, "rejected": None, "text": None}
    assert count_tokens(tokenizer, row) == len(ids)


def test_truncation_keeps_the_prompt_and_cuts_the_final_answer(tokenizer):
    long = {"role": "assistant", "content": "word " * 200}
    row = {
        "kind": "chat",
        "messages": [*CONVERSATION[:2], long],
        "chosen": None,
        "rejected": None,
        "text": None,
    }
    cut = truncate_response(tokenizer, row, 80)
    assert count_tokens(tokenizer, cut) <= 80
    assert cut["messages"][:2] == CONVERSATION[:2]
    assert cut["messages"][2]["content"].startswith("word word")
    assert truncate_response(tokenizer, row, 10) is None  # the prompt alone does not fit


def test_batched_counts_equal_one_by_one(tokenizer):
    rows = [
        {"kind": "chat", "messages": CONVERSATION, "chosen": None, "rejected": None, "text": None},
        {
            "kind": "text",
            "messages": [],
            "chosen": None,
            "rejected": None,
            "text": "Plain text here.",
        },
        {
            "kind": "preference",
            "messages": CONVERSATION[:2],
            "chosen": "Short.",
            "rejected": "A much longer rejected answer with many more words in it.",
            "text": None,
        },
    ]
    assert count_tokens_batch(tokenizer, rows) == [count_tokens(tokenizer, r) for r in rows]
