"""Tokenise internal rows for training with the model's chat template.

By default the loss is on assistant tokens only: each assistant turn's content and its
end-of-turn token are labelled; system and user turns, role headers and the template's
separators are masked with -100.
"""

from __future__ import annotations

IGNORE = -100


def _ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            messages,
            tokenize=True,
            add_generation_prompt=add_generation_prompt,
            return_dict=False,
        )
    )


def _end_tokens(tokenizer) -> set[int]:
    ends = {tokenizer.eos_token_id}
    im_end = (
        tokenizer.convert_tokens_to_ids("<|im_end|>")
        if "<|im_end|>" in tokenizer.get_vocab()
        else None
    )
    ends.add(im_end)
    return {t for t in ends if t is not None}


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the whole conversation and the [start, end) span of each assistant turn.

    A span runs from the first token after the assistant header to the end-of-turn token,
    inclusive (so the model learns to stop), and excludes whatever the template puts after it.
    """
    ids = _ids(tokenizer, messages)
    ends = _end_tokens(tokenizer)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _ids(tokenizer, messages[:i], add_generation_prompt=True)
        start, stop = len(prompt), len(_ids(tokenizer, messages[: i + 1]))
        if ids[:start] != prompt:
            raise ValueError(
                "the chat template does not render conversations as a prefix of longer ones; "
                "set data.completion_only_loss: false to train on every token"
            )
        last_end = max((j for j in range(start, stop) if ids[j] in ends), default=stop - 1)
        spans.append((start, last_end + 1))
    return ids, spans


def tokenize_chat(
    tokenizer,
    messages: list[dict],
    max_length: int | None = None,
    completion_only: bool = True,
) -> dict[str, list[int]]:
    """input_ids, labels (-100 where no loss) and assistant_masks for one conversation."""
    ids, spans = assistant_spans(tokenizer, messages)
    mask = [0] * len(ids)
    for start, stop in spans:
        mask[start:stop] = [1] * (stop - start)
    if completion_only:
        labels = [t if m else IGNORE for t, m in zip(ids, mask, strict=True)]
    else:
        labels = list(ids)
    if max_length is not None:
        ids, labels, mask = ids[:max_length], labels[:max_length], mask[:max_length]
    return {"input_ids": ids, "labels": labels, "assistant_masks": mask}


def count_tokens(tokenizer, row: dict) -> int:
    """Tokens of a row as training sees it (chat template applied; longest preference side)."""
    if row["kind"] == "text":
        return len(tokenizer(row["text"], add_special_tokens=True)["input_ids"])
    if row["kind"] == "preference":
        return max(
            len(_ids(tokenizer, [*row["messages"], {"role": "assistant", "content": answer}]))
            for answer in (row["chosen"], row["rejected"])
        )
    return len(_ids(tokenizer, row["messages"]))


def count_tokens_batch(tokenizer, rows: list[dict]) -> list[int]:
    """count_tokens for many rows with one batched tokenizer call: templates are rendered to
    text here and tokenised together, exactly as apply_chat_template would one by one."""
    texts, owners = [], []
    for i, row in enumerate(rows):
        if row["kind"] == "text":
            continue
        answers = [row["chosen"], row["rejected"]] if row["kind"] == "preference" else [None]
        for answer in answers:
            turns = (
                row["messages"]
                if answer is None
                else [
                    *row["messages"],
                    {"role": "assistant", "content": answer or ""},
                ]
            )
            texts.append(tokenizer.apply_chat_template(turns, tokenize=False))
            owners.append(i)
    counts = [0] * len(rows)
    if texts:
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        for i, ids in zip(owners, encoded, strict=True):
            counts[i] = max(counts[i], len(ids))
    plain = [i for i, row in enumerate(rows) if row["kind"] == "text"]
    if plain:
        encoded = tokenizer([rows[i]["text"] or "" for i in plain], add_special_tokens=True)
        for i, ids in zip(plain, encoded["input_ids"], strict=True):
            counts[i] = len(ids)
    return counts


def truncate_response(tokenizer, row: dict, max_tokens: int) -> dict | None:
    """The row with its final response cut so the whole fits in max_tokens; None if the
    prompt alone does not fit."""
    over = count_tokens(tokenizer, row) - max_tokens
    if over <= 0:
        return row

    def cut(text: str, by: int) -> str | None:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = len(tokens) - by
        return tokenizer.decode(tokens[:keep]) if keep > 0 else None

    row = dict(row)
    if row["kind"] == "text":
        row["text"] = cut(row["text"], over)
        return row if row["text"] else None
    if row["kind"] == "preference":
        for side in ("chosen", "rejected"):
            extra = len(
                _ids(tokenizer, [*row["messages"], {"role": "assistant", "content": row[side]}])
            )
            if extra > max_tokens:
                row[side] = cut(row[side], extra - max_tokens)
                if row[side] is None:
                    return None
        return row
    messages = [dict(m) for m in row["messages"]]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = messages[: last + 1]
    over = len(_ids(tokenizer, messages)) - max_tokens
    if over > 0:
        messages[last]["content"] = cut(messages[last]["content"], over)
        if messages[last]["content"] is None:
            return None
    row["messages"] = messages
    # decoding and re-encoding can merge tokens differently: trim until it really fits
    while count_tokens(tokenizer, row) > max_tokens:
        messages[last]["content"] = cut(messages[last]["content"], 1)
        if not messages[last]["content"]:
            return None
    return row
