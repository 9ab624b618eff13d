"""Votes into preference data: TRL's conversational preference format, OpenAI's DPO format or
TRL's unpaired KTO format, with lineage (vote ids, models, annotators) in a side file.

Rule for one comparison item judged by several annotators (overlap): the verdict most of
them gave wins; without a strict majority the item is dropped as a conflict. A tie or both
bad makes no pair (dropped and counted) unless asked for. Two answers with the same text make
no pair either (nothing to prefer). A hand-written better answer is `chosen` against both
answers of its vote. A model compared with itself (the campaign's `self_pairs`) gives a pair
of its own two samples, named in the lineage as the model and the model + '#2'."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from ftservice.feedback.campaign import answer_slots
from ftservice.feedback.leaderboard import vote_label

FORMATS = ("trl", "openai", "kto")


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _pair_row(fmt: str, prompt: list[dict], chosen: str, rejected: str) -> dict:
    if fmt == "openai":
        return {
            "input": {"messages": prompt},
            "preferred_output": _assistant(chosen),
            "non_preferred_output": _assistant(rejected),
        }
    return {"prompt": prompt, "chosen": _assistant(chosen), "rejected": _assistant(rejected)}


def export_rows(votes: list[dict], items: dict[str, str], fmt: str) -> tuple[list, list, dict]:
    """(rows, lineage of each row, counts) from the votes that count (dicts as vote_json
    makes them)."""
    if fmt not in FORMATS:
        raise ValueError(f"format '{fmt}': use one of {', '.join(FORMATS)}")
    by_item: dict[str, list[dict]] = defaultdict(list)
    for v in votes:
        by_item[items.get(v["comparison_id"], v["comparison_id"])].append(v)
    rows, lineage, counts = [], [], Counter()
    for item, group in by_item.items():
        first = group[0]
        slot_a, slot_b = answer_slots(
            first["model_a"], first["model_b"], bool(first.get("swapped"))
        )
        answers = {slot_a: first["response_a"], slot_b: first["response_b"]}
        labels = Counter(vote_label(v) for v in group)
        (top, n), *rest = labels.most_common()
        source = {
            "item": item,
            "vote_ids": [v["vote_id"] for v in group],
            "annotators": sorted({v["annotator"] for v in group}),
            "models": sorted(answers),
        }
        prompt = group[0]["prompt"]
        if first["response_a"] == first["response_b"]:
            counts["dropped_same_answer"] += 1
        elif rest and rest[0][1] == n:
            counts["dropped_conflict"] += 1
        elif top in ("tie", "both_bad"):
            if fmt == "kto" and top == "both_bad":  # two undesirable answers
                for m, text in answers.items():
                    rows.append({"prompt": prompt, "completion": _assistant(text), "label": False})
                    lineage.append(source | {"completion_model": m})
                counts["kto_both_bad"] += 1
            else:
                counts[f"dropped_{top}"] += 1
        else:
            loser = next(m for m in answers if m != top)
            if fmt == "kto":
                for m, label in ((top, True), (loser, False)):
                    rows.append(
                        {"prompt": prompt, "completion": _assistant(answers[m]), "label": label}
                    )
                    lineage.append(source | {"completion_model": m})
            else:
                rows.append(_pair_row(fmt, prompt, answers[top], answers[loser]))
                lineage.append(source | {"chosen_model": top, "rejected_model": loser})
            counts["pairs" if fmt != "kto" else "decided"] += 1
        made = set()  # (written, answer): once per item, whoever wrote it
        for v in group:  # a hand-written better answer beats both answers
            edit = (v.get("better_answer") or "").strip()
            if not edit:
                continue
            for m, text in answers.items():
                if fmt == "kto" or text == edit or (edit, text) in made:
                    continue
                made.add((edit, text))
                rows.append(_pair_row(fmt, prompt, edit, text))
                lineage.append(source | {"vote_ids": [v["vote_id"]], "annotators": [
                    v["annotator"]], "chosen_model": "human", "rejected_model": m})  # fmt: skip
                counts["pairs_from_edits"] += 1
            if fmt == "kto" and (edit, None) not in made:
                made.add((edit, None))
                rows.append({"prompt": prompt, "completion": _assistant(edit), "label": True})
                lineage.append(source | {"completion_model": "human"})
    counts["rows"] = len(rows)
    counts["items"] = len(by_item)
    return rows, lineage, dict(counts)


def write_export(rows: list, lineage: list, counts: dict, out: Path, meta: dict) -> Path:
    """FILE (JSON lines) and FILE.lineage.json beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(out)
    side = out.with_name(out.name + ".lineage.json")
    side.write_text(json.dumps(meta | {"counts": counts, "rows": lineage}, indent=1))
    return side
