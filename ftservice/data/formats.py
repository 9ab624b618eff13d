"""Recognise record formats and normalise every record to one internal chat form.

Internal form (one Arrow schema for every format, see `SCHEMA`):
  id        - the record's own "id", else "<file>:<line>"
  kind      - "chat" (SFT conversation), "preference" (prompt + chosen/rejected), "text",
              "unpaired" (KTO: prompt + one answer, in chosen if desirable else rejected),
              "prompt" (turns ending in a user turn: no answer, for stages that need prompts)
  messages  - chat turns [{role, content}]; for preferences and prompts the prompt turns only
  chosen    - preferred assistant answer (preferences)
  rejected  - the other answer (preferences)
  text      - raw text (continued pre-training)

`ftservice data curate` writes rows in this form (the `curated` format), with a `report.json`
beside them (`CuratedReport`) whose fingerprint training records.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow as pa
from pydantic import ConfigDict, Field

from ftservice.records import Record, Strict

FORMATS = (
    "alpaca", "sharegpt", "openai", "text", "preference", "openai_dpo", "kto", "prompts",
    "curated",
)  # fmt: skip
KINDS = ("chat", "preference", "text", "prompt", "unpaired")
REPORT = "report.json"  # beside curated data: the CuratedReport

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
    "kto": (["prompt", "completion", "label"], []),
    "prompts": (["instruction"], ["input", "system"]),
    "curated": (["kind", "messages"], ["id", "chosen", "rejected", "text"]),
}
# how a prompt-only record may look, for messages
PROMPTS_FORMS = (
    "'instruction' without 'output', 'prompt' alone, or 'messages' ending in a user turn"
)
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
    if "kind" in keys and "messages" in keys:
        return "curated"  # our own rows, as `data curate` writes them
    if "preferred_output" in keys or "non_preferred_output" in keys:
        return "openai_dpo"
    if "completion" in keys and "label" in keys:
        return "kto"  # TRL's unpaired preference format
    if "chosen" in keys or "rejected" in keys:
        return "preference"
    if "messages" in keys:
        turns = record["messages"]
        ends_with_user = isinstance(turns, list) and turns and isinstance(turns[-1], dict)
        return "prompts" if ends_with_user and turns[-1].get("role") == "user" else "openai"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys:
        return "alpaca" if "output" in keys else "prompts"
    if "prompt" in keys:
        return "prompts"
    if "text" in keys:
        return "text"
    return None


def describe_format(fmt: str) -> str:
    if fmt == "prompts":
        return PROMPTS_FORMS
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


def _preference_prompt(prompt) -> list:
    """A preference prompt: a string (one user turn) or a list of turns."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return _messages(prompt, "prompt")


def _prompt_turns(record: dict) -> list:
    """The turns of a prompt-only record (ending in a user turn)."""
    if "messages" in record:
        turns = _messages(record["messages"], "messages")
        if turns[-1]["role"] != "user":
            raise RecordError(f"a prompt's messages must end with a user turn ({PROMPTS_FORMS})")
        return turns
    if record.get("instruction") is not None:
        instruction = _text(record["instruction"], "instruction")
        extra = _text(record.get("input") or "", "input")
        return [
            {
                "role": "user",
                "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction,
            }
        ]
    if record.get("prompt") is not None:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}]
        turns = _messages(prompt, "prompt")
        if turns[-1]["role"] != "user":
            raise RecordError("'prompt' must end with a user turn")
        return turns
    raise RecordError(f"a prompt-only record needs {PROMPTS_FORMS}")


def _curated(record: dict, row: dict) -> dict:
    """A row as `data curate` wrote it, checked like any other input."""
    kind = record["kind"]
    if kind not in KINDS:
        raise RecordError(f"'kind' is {kind!r}; curated rows are one of {', '.join(KINDS)}")
    turns = _messages(record["messages"], "messages") if kind != "text" else []
    row |= {"kind": kind, "messages": turns}
    if kind == "preference":
        row |= {"chosen": _text(record.get("chosen"), "chosen"),
                "rejected": _text(record.get("rejected"), "rejected")}  # fmt: skip
    elif kind == "text":
        row["text"] = _text(record.get("text"), "text")
    elif kind == "prompt" and turns[-1]["role"] != "user":
        raise RecordError("a curated prompt's messages must end with a user turn")
    return row


def normalise(record: dict, fmt: str, rid: str, system_prompt: str | None = None) -> dict:
    """One record in format `fmt` -> the internal form. Raises RecordError."""
    if fmt != "prompts":
        _need(record, fmt)
    row = {"id": str(record.get("id") or rid), "chosen": None, "rejected": None, "text": None}
    if fmt == "curated":
        row = _curated(record, row)
        row["messages"] = _with_system(row["messages"], system_prompt) if row["messages"] else []
    elif fmt == "prompts":
        system = record.get("system") or system_prompt
        row |= {"kind": "prompt", "messages": _with_system(_prompt_turns(record), system)}
    elif fmt == "alpaca":
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
        turns = _preference_prompt(record["prompt"])
        row |= {
            "kind": "preference",
            "messages": _with_system(turns, system_prompt),
            "chosen": _answer(record["chosen"], "chosen"),
            "rejected": _answer(record["rejected"], "rejected"),
        }
    elif fmt == "kto":
        turns = _preference_prompt(record["prompt"])
        label = record["label"]
        if not isinstance(label, bool):
            raise RecordError(f"'label' must be true or false, got {label!r}")
        answer = _answer(record["completion"], "completion")
        row |= {
            "kind": "unpaired",
            "messages": _with_system(turns, system_prompt),
            "chosen": answer if label else None,
            "rejected": None if label else answer,
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
    if row["kind"] == "unpaired":
        return row["chosen"] or row["rejected"] or ""
    if row["kind"] == "prompt":
        return ""
    return "\n".join(m["content"] for m in row["messages"] if m["role"] == "assistant")


def content_text(row: dict) -> str:
    """The row as one canonical string: what exact dedup, MinHash and the split look at."""
    parts = [f"{m['role']}: {m['content']}" for m in row["messages"]]
    parts += [f"{k}: {row[k]}" for k in ("chosen", "rejected", "text") if row[k] is not None]
    return "\n".join(parts)


def fingerprint(split_hashes) -> str:
    """sha256 of a dataset's content: its (split, content hash) pairs, in no particular order."""
    lines = sorted(f"{split}:{digest}" for split, digest in split_hashes)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def content_hash(row: dict) -> str:
    return hashlib.sha256(content_text(row).encode()).hexdigest()


def rows_fingerprint(splits: dict[str, list[dict]]) -> str:
    """sha256 of the rows of each split, independent of their order (as curation computes
    the fingerprint of what it kept)."""
    return fingerprint((split, content_hash(r)) for split, rows in splits.items() for r in rows)


def with_system_prompt(row: dict, system_prompt: str | None) -> dict:
    """The row with a system turn added when it has turns and none is a system turn."""
    if not row["messages"]:
        return row
    return row | {"messages": _with_system(row["messages"], system_prompt)}


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


# ---- the curated dataset's report ---------------------------------------------------------


class CuratedStep(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    step: str
    rows_in: int = Field(alias="in")
    rows_out: int = Field(alias="out")
    removed: int


class CuratedReport(Record):
    """`report.json` of a curated dataset: counts per step, removed ids, and the fingerprint
    of what was kept (its (split, content hash) pairs), which training records."""

    format_version: int = 1
    inputs: list[str]
    output_dir: str
    fingerprint: str
    rows_in: int
    rows_out: int
    steps: list[CuratedStep]
    removed: dict[str, list[str]]
    pii: dict[str, int]
    split: dict[str, int]
    token_lengths: dict[str, float]
    files: dict[str, str]
