"""Recognise record formats and normalise every record to one internal chat form.

Internal form (one Arrow schema for every format, see `SCHEMA`):
  id        - the record's own "id", else "<file>:<line>"
  kind      - "chat" (SFT conversation), "preference" (prompt + chosen/rejected), "text"
  messages  - chat turns [{role, content}]; for preferences the prompt turns only
  chosen    - preferred assistant answer (preferences)
  rejected  - the other answer (preferences)
  text      - raw text (continued pre-training)
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

FORMATS = ("alpaca", "sharegpt", "openai", "text", "preference", "openai_dpo")

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("kind", pa.string()),
        ("messages", pa.list_(MESSAGE_TYPE)),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("text", pa.string()),
    ]
)

# What each format needs, for error messages: (required, optional)
FIELDS = {
    "alpaca": (["instruction", "output"], ["input", "system"]),
    "sharegpt": (["conversations"], ["system"]),
    "openai": (["messages"], []),
    "text": (["text"], []),
    "preference": (["prompt", "chosen", "rejected"], []),
    "openai_dpo": (["input", "preferred_output", "non_preferred_output"], []),
}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
}
ROLES = {"system", "user", "assistant"}


class RecordError(ValueError):
    """A record that does not fit its format; the loader adds file and line."""


@dataclass(frozen=True)
class Location:
    file: str
    line: int
    """1-based line (JSONL), element index + 1 (JSON array) or row + 1 (CSV, Parquet)."""
    unit: str = "line"

    def __str__(self) -> str:
        return (
            f"{self.file}:{self.line}"
            if self.unit == "line"
            else f"{self.file} {self.unit} {self.line}"
        )


def recognise(record: dict) -> str | None:
    """The format a record is in, from its distinctive keys; None if none fits."""
    keys = record.keys()
    if "preferred_output" in keys or "non_preferred_output" in keys:
        return "openai_dpo"
    if "chosen" in keys or "rejected" in keys:
        return "preference"
    if "messages" in keys:
        return "openai"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    return None


def describe_format(fmt: str) -> str:
    required, optional = FIELDS[fmt]
    text = ", ".join(required)
    return f"{text} (optional: {', '.join(optional)})" if optional else text


def _need(record: dict, fmt: str) -> None:
    missing = [f for f in FIELDS[fmt][0] if record.get(f) is None]
    if missing:
        raise RecordError(
            f"record in the {fmt} format lacks {', '.join(repr(m) for m in missing)}; "
            f"{fmt} records need {describe_format(fmt)}"
        )


def _text(value, field: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"'{field}' must be a string, got {type(value).__name__}")
    return value


def _messages(turns, field: str, role_key="role", content_key="content", roles=None) -> list:
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"'{field}' must be a non-empty list of turns")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise RecordError(
                f"'{field}[{i}]' must be an object with '{role_key}' and '{content_key}'"
            )
        role = turn[role_key]
        role = roles.get(str(role).lower()) if roles else role
        if role not in ROLES:
            allowed = sorted(roles) if roles else sorted(ROLES)
            raise RecordError(
                f"'{field}[{i}].{role_key}' is {turn[role_key]!r}; use one of {', '.join(allowed)}"
            )
        out.append(
            {"role": role, "content": _text(turn[content_key], f"{field}[{i}].{content_key}")}
        )
    return out


def _with_system(messages: list, system_prompt: str | None) -> list:
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _answer(value, field: str) -> str:
    """A preference answer: a string, or a conversation whose last turn is the assistant's."""
    if isinstance(value, str):
        return value
    turns = _messages(value, field)
    if turns[-1]["role"] != "assistant":
        raise RecordError(f"'{field}' must end with an assistant turn")
    return turns[-1]["content"]


def normalise(record: dict, fmt: str, rid: str, system_prompt: str | None = None) -> dict:
    """One record in format `fmt` -> the internal form. Raises RecordError."""
    _need(record, fmt)
    row = {"id": str(record.get("id", rid)), "chosen": None, "rejected": None, "text": None}
    if fmt == "alpaca":
        instruction = _text(record["instruction"], "instruction")
        extra = _text(record.get("input") or "", "input")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user}]
        messages.append({"role": "assistant", "content": _text(record["output"], "output")})
        system = record.get("system") or system_prompt
        row |= {"kind": "chat", "messages": _with_system(messages, system)}
    elif fmt == "sharegpt":
        messages = _messages(
            record["conversations"], "conversations", "from", "value", SHAREGPT_ROLES
        )
        system = record.get("system") or system_prompt
        row |= {"kind": "chat", "messages": _with_system(messages, system)}
    elif fmt == "openai":
        row |= {
            "kind": "chat",
            "messages": _with_system(_messages(record["messages"], "messages"), system_prompt),
        }
    elif fmt == "text":
        row |= {"kind": "text", "messages": [], "text": _text(record["text"], "text")}
    elif fmt == "preference":
        prompt = record["prompt"]
        turns = (
            [{"role": "user", "content": prompt}]
            if isinstance(prompt, str)
            else _messages(prompt, "prompt")
        )
        row |= {
            "kind": "preference",
            "messages": _with_system(turns, system_prompt),
            "chosen": _answer(record["chosen"], "chosen"),
            "rejected": _answer(record["rejected"], "rejected"),
        }
    elif fmt == "openai_dpo":
        source = record["input"]
        if not isinstance(source, dict) or "messages" not in source:
            raise RecordError("'input' must be an object with 'messages' (OpenAI DPO format)")
        row |= {
            "kind": "preference",
            "messages": _with_system(
                _messages(source["messages"], "input.messages"), system_prompt
            ),
            "chosen": _answer(record["preferred_output"], "preferred_output"),
            "rejected": _answer(record["non_preferred_output"], "non_preferred_output"),
        }
    else:
        raise RecordError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if row["kind"] == "chat" and not any(m["role"] == "assistant" for m in row["messages"]):
        raise RecordError("conversation has no assistant turn to learn from")
    return row


def response_text(row: dict) -> str:
    """What the model is trained to produce: assistant turns, the chosen answer, or the text."""
    if row["kind"] == "text":
        return row["text"] or ""
    if row["kind"] == "preference":
        return row["chosen"] or ""
    return "\n".join(m["content"] for m in row["messages"] if m["role"] == "assistant")


def to_trl(row: dict) -> dict:
    """The row in TRL's conversational forms (messages, or prompt/chosen/rejected)."""
    if row["kind"] == "preference":
        return {
            "prompt": row["messages"],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}],
        }
    if row["kind"] == "text":
        return {"text": row["text"]}
    return {"messages": row["messages"]}


def to_openai_dpo(row: dict) -> dict:
    """A preference row in OpenAI's DPO fine-tuning format."""
    return {
        "input": {"messages": row["messages"]},
        "preferred_output": [{"role": "assistant", "content": row["chosen"]}],
        "non_preferred_output": [{"role": "assistant", "content": row["rejected"]}],
    }
