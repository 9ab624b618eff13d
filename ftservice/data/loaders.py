"""Stream records out of JSONL, JSON arrays, CSV, Parquet and `datasets` folders.

Every record comes with its location (file and line or row), so every error can name it.
Memory stays bounded by one chunk or batch, never the whole file.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from ftservice import storage
from ftservice.data.formats import (
    FORMATS,
    REPORT,
    CuratedReport,
    Location,
    RecordError,
    describe_format,
    normalise,
    recognise,
    response_text,
    rows_fingerprint,
    with_system_prompt,
)
from ftservice.errors import FtserviceError
from ftservice.records import Strict

SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
CHUNK = 1 << 20


class DataError(FtserviceError):
    """Input data that cannot be used; the message names file, line and the fix."""


def _is_datasets_folder(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def is_curated(path: Path) -> bool:
    """A folder `ftservice data curate` wrote: its splits beside a report.json."""
    return path.is_dir() and (path / REPORT).is_file()


def curated_split(path: Path, split: str) -> Path:
    """The folder of one split of a curated dataset."""
    part = path / split
    if not part.is_dir():
        report = CuratedReport.read(path / REPORT)
        kept = ", ".join(f"{k} {v}" for k, v in report.split.items())
        raise DataError(
            f"{path}: this curated dataset has no {split} split (its rows: {kept}); "
            + (
                "curate with data.curate.eval_fraction above 0 to split some off, or name "
                "held-out files in data.eval"
                if split == "eval"
                else f"name {path}/<split> directly"
            )
        )
    return part


def expand(paths: list[str | Path], split: str = "train") -> list[Path]:
    """Files (and `datasets` folders) behind the given paths, folders searched in name order.
    A curated dataset's folder stands for its `split` (train for training data, eval for
    held-out data)."""
    out: list[Path] = []
    for p in map(storage.localize, map(str, paths)):  # a stored file: this node's copy
        if not p.exists():
            raise DataError(
                f"{p}: no such file or folder; check the path "
                f"(relative paths start at {Path.cwd()})."
            )
        if is_curated(p):
            p = curated_split(p, split)
        if p.is_file():
            if p.suffix.lower() not in SUFFIXES:
                raise DataError(
                    f"{p}: unsupported file type '{p.suffix}'; use one of {', '.join(SUFFIXES)} "
                    "or a folder saved by datasets"
                )
            out.append(p)
        elif _is_datasets_folder(p):
            out.append(p)
        else:
            saved = [d for d in p.rglob("*") if d.is_dir() and _is_datasets_folder(d)]
            files = [
                f
                for f in p.rglob("*")
                if f.is_file()
                and f.suffix.lower() in SUFFIXES
                and not f.name.startswith(".")
                and not any(f.is_relative_to(d) for d in saved)  # a saved dataset's own files
            ]
            found = sorted(files + saved)
            if not found:
                raise DataError(
                    f"{p}: folder holds no {', '.join(SUFFIXES)} files or datasets folders"
                )
            out.extend(found)
    return out


@dataclass(frozen=True)
class Piece:
    """A byte range of a JSONL file that starts on a line boundary, for parallel reading."""

    path: Path
    start: int = 0
    end: int | None = None
    first_line: int = 1


def split_jsonl(path: Path, target_bytes: int) -> list[Piece]:
    """Cut a JSONL file into pieces of about target_bytes, each knowing its first line number."""
    size = path.stat().st_size
    if size <= target_bytes:
        return [Piece(path)]
    pieces, start, line = [], 0, 1
    with open(path, "rb") as f:
        while start < size:
            f.seek(min(size, start + target_bytes))
            f.readline()  # extend to the end of the line the cut falls in
            end = min(size, f.tell())
            pieces.append(Piece(path, start, end, line))
            f.seek(start)
            remaining = end - start
            while remaining:
                chunk = f.read(min(CHUNK, remaining))
                line += chunk.count(b"\n")
                remaining -= len(chunk)
            start = end
    return pieces


def _jsonl(path: Path, piece: Piece | None = None) -> Iterator[tuple[Location, dict]]:
    piece = piece or Piece(path)
    offset = piece.start
    with open(path, "rb") as f:
        f.seek(piece.start)
        for number, raw in enumerate(f, piece.first_line):
            if piece.end is not None and offset >= piece.end:
                return
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{number}: not UTF-8 text (byte offset {offset + e.start}); "
                    "re-save the file as UTF-8"
                ) from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno}); "
                    "each line of a JSONL file must be one JSON object"
                ) from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{path}:{number}: a record must be a JSON object, got {type(record).__name__}"
                )
            yield Location(str(path), number), record


class _Utf8Chunks:
    """Decode a binary file chunk by chunk, carrying characters cut at chunk edges."""

    def __init__(self, path: Path, f):
        self.path, self.f, self.pending, self.offset = path, f, b"", 0

    def read(self) -> str | None:
        chunk = self.f.read(CHUNK)
        if not chunk:
            if self.pending:
                self._fail(0)
            return None
        data, start = self.pending + chunk, self.offset - len(self.pending)
        self.offset += len(chunk)
        try:
            text, self.pending = data.decode("utf-8"), b""
        except UnicodeDecodeError as e:
            if e.start < len(data) - 4:  # a bad byte, not a character cut at the edge
                self._fail(start + e.start)
            text, self.pending = data[: e.start].decode("utf-8"), data[e.start :]
        return text

    def _fail(self, offset: int):
        raise DataError(
            f"{self.path}: not UTF-8 text (byte offset {offset}); re-save the file as UTF-8"
        )


def _json(path: Path) -> Iterator[tuple[Location, dict]]:
    """A JSON array, decoded one element at a time from 1 MiB chunks."""
    decoder = json.JSONDecoder()
    with open(path, "rb") as f:
        chunks = _Utf8Chunks(path, f)
        buf = chunks.read() or ""
        if not buf.lstrip().startswith("["):
            yield from _jsonl(path)  # many .json files are really JSON Lines
            return
        pos = buf.index("[") + 1
        line = 1 + buf.count("\n", 0, pos)  # line number at buf[pos]
        eof = False

        def more() -> bool:
            nonlocal buf, pos, eof
            text = chunks.read()
            if text is None:
                eof = True
                return False
            buf, pos = buf[pos:] + text, 0
            return True

        def advance(to: int) -> None:
            nonlocal pos, line
            line += buf.count("\n", pos, to)
            pos = to

        index = 0
        while True:
            start = pos
            while start < len(buf) and buf[start] in " \t\r\n,":
                start += 1
            advance(start)
            if pos >= len(buf):
                if more():
                    continue
                raise DataError(f"{path}:{line}: the JSON array is not closed with ']'")
            if buf[pos] == "]":
                return
            try:
                record, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if not eof and more():
                    continue
                at = line + buf.count("\n", pos, e.pos)
                raise DataError(
                    f"{path}:{at}: not valid JSON ({e.msg}); fix the array element there"
                ) from None
            if end == len(buf) and not eof and more():
                continue  # the value may go on in the next chunk: decode it again whole
            index += 1
            if not isinstance(record, dict):
                raise DataError(
                    f"{path}:{line}: array element {index} must be a JSON object, "
                    f"got {type(record).__name__}"
                )
            yield Location(str(path), line), record
            advance(end)


def _csv(path: Path) -> Iterator[tuple[Location, dict]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for row in reader:
                yield (
                    Location(str(path), reader.line_num),
                    {k: v for k, v in row.items() if k is not None},
                )
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not UTF-8 text (near byte offset {e.start}); re-save the file as UTF-8"
        ) from None


def _parquet(path: Path, batch_size: int) -> Iterator[tuple[Location, dict]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
        for record in batch.to_pylist():
            row += 1
            yield Location(str(path), row, "row"), record


def _datasets_folder(path: Path, batch_size: int) -> Iterator[tuple[Location, dict]]:
    from datasets import DatasetDict, load_from_disk

    loaded = load_from_disk(str(path))
    splits = loaded.items() if isinstance(loaded, DatasetDict) else [("", loaded)]
    for split, ds in splits:
        where = f"{path}[{split}]" if split else str(path)
        row = 0
        for batch in ds.iter(batch_size=batch_size):
            for i in range(len(next(iter(batch.values()), []))):
                row += 1
                yield Location(where, row, "row"), {k: v[i] for k, v in batch.items()}


def iter_records(
    path: Path, batch_size: int = 1024, piece: Piece | None = None
) -> Iterator[tuple[Location, dict]]:
    """Raw records of one file or datasets folder (or one piece of a JSONL file)."""
    if piece is not None and piece.start > 0:
        yield from _jsonl(path, piece)
        return
    if path.is_dir():
        yield from _datasets_folder(path, batch_size)
        return
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty; it needs at least one record")
    kind = SUFFIXES[path.suffix.lower()]
    if kind == "jsonl":
        records = _jsonl(path, piece)
    elif kind == "json":
        records = _json(path)
    elif kind == "csv":
        records = _csv(path)
    else:
        records = _parquet(path, batch_size)
    any_record = False
    for item in records:
        any_record = True
        yield item
    if not any_record:
        raise DataError(f"{path}: holds no records (only blank lines or an empty list)")


def file_format(path: Path, fmt: str = "auto") -> str:
    """The format of a file: the named one, or the one its first record is in."""
    if fmt != "auto":
        if fmt not in FORMATS:
            raise DataError(f"unknown data format '{fmt}'; use auto or one of {', '.join(FORMATS)}")
        return fmt
    loc, record = next(iter(iter_records(path)))
    seen = recognise(record)
    if seen is None:
        raise DataError(_unrecognised(loc, record))
    return seen


def iter_examples(
    path: Path,
    fmt: str = "auto",
    system_prompt: str | None = None,
    piece: Piece | None = None,
    known_format: str | None = None,
) -> Iterator[tuple[Location, str, dict]]:
    """Normalised examples of one file: (location, format, internal row).

    With fmt='auto' the first record fixes the file's format (or `known_format`, found by
    `file_format` for a file read in pieces) and every later record must share it; a named
    format is checked on every record.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"unknown data format '{fmt}'; use auto or one of {', '.join(FORMATS)}")
    file_fmt = fmt if fmt != "auto" else known_format
    first_at = "its first record" if known_format else None
    for loc, record in iter_records(path, piece=piece):
        seen = recognise(record)
        if file_fmt is None:
            if seen is None:
                raise DataError(_unrecognised(loc, record))
            file_fmt, first_at = seen, loc
        elif fmt == "auto" and seen not in (None, file_fmt, "prompts"):
            # (a record without its answer in a file of answers is that format's error,
            # said by normalise below: "lacks 'output'")
            raise DataError(
                f"{path} mixes formats: {first_at} is {file_fmt} but {loc} is {seen}; "
                "put each format in its own file (or name the format with data.format)"
            )
        rid = record.get("id")
        rid = str(rid) if rid is not None else f"{Path(loc.file).name}:{loc.line}"
        try:
            yield loc, file_fmt, normalise(record, file_fmt, rid, system_prompt)
        except RecordError as e:
            how = "recognised" if fmt == "auto" else "named in the spec"
            raise DataError(f"{loc}: {e} (format {file_fmt}, {how})") from None


def load_rows(
    paths: list[str], fmt: str = "auto", system_prompt: str | None = None, split: str = "train"
) -> list:
    """Every normalised row of the given files (small enough to hold: one worker's data)."""
    return [row for p in expand(paths, split) for _, _, row in iter_examples(p, fmt, system_prompt)]


class DataSource(Strict):
    """One training input as an artifact records it."""

    path: str
    kind: Literal["file", "curated"]
    fingerprint: str = Field(
        description="A curated dataset's own fingerprint (its report.json), else that of the "
        "rows read from the path."
    )


@dataclass
class TrainingInputs:
    rows: list[dict]
    sources: list[DataSource]
    fingerprint: str
    """The curated dataset's fingerprint when the data is one curated dataset, else that of
    every row trained on."""


def check_curated(path: Path, fmt: str = "auto") -> tuple[CuratedReport, dict[str, list]]:
    """A curated dataset's report and its rows by split (as curated: no system prompt
    added), after checking that the files hold what the report says: the fingerprint of
    both splits' rows must equal the report's."""
    report = CuratedReport.read(path / REPORT)
    splits = {s: load_rows([str(path)], fmt, None, s) for s in ("train", "eval")
              if (path / s).is_dir()}  # fmt: skip
    found = rows_fingerprint(splits)
    if found != report.fingerprint:
        raise DataError(
            f"{path}: its files do not hold what {path / REPORT} says (fingerprint "
            f"{found[:12]} against the report's {report.fingerprint[:12]}): they changed after "
            "curation; run `ftservice data curate` again."
        )
    return report, splits


def training_inputs(
    paths: list[str], fmt: str = "auto", system_prompt: str | None = None, split: str = "train"
) -> TrainingInputs:
    """The rows of `paths` with what an artifact records of each: a curated dataset by its
    report's fingerprint (checked against its files), a file by its rows' content."""
    rows, sources = [], []
    for path in paths:
        local = storage.localize(path)
        if is_curated(local):
            curated_split(local, split)  # a missing split is refused with the reason
            report, splits = check_curated(local, fmt)
            part = [with_system_prompt(r, system_prompt) for r in splits[split]]
            sources.append(DataSource(path=path, kind="curated", fingerprint=report.fingerprint))
        else:
            part = load_rows([path], fmt, system_prompt, split)
            fp = rows_fingerprint({split: part})
            sources.append(DataSource(path=path, kind="file", fingerprint=fp))
        rows += part
    if len(sources) == 1 and sources[0].kind == "curated":
        return TrainingInputs(rows, sources, sources[0].fingerprint)
    return TrainingInputs(rows, sources, rows_fingerprint({split: rows}))


def _unrecognised(loc: Location, record: dict) -> str:
    known = "; ".join(f"{f}: {describe_format(f)}" for f in FORMATS)
    keys = ", ".join(sorted(record)) or "none"
    return (
        f"{loc}: record fits no known format (its keys: {keys}); formats and their fields: {known}"
    )


def check_files(paths: list[str], fmt: str = "auto") -> list[dict]:
    """Validate every record of every file; one summary row per file. Raises DataError."""

    rows = []
    for path in expand(paths):
        formats, kinds = set(), {}
        records = turns = chars = 0
        for _, file_fmt, row in iter_examples(path, fmt):
            formats.add(file_fmt)
            kinds[row["kind"]] = kinds.get(row["kind"], 0) + 1
            records += 1
            turns += len(row["messages"])
            chars += len(response_text(row))
        rows.append(
            {
                "file": str(path),
                "format": ", ".join(sorted(formats)),
                "records": records,
                "kinds": ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())),
                "turns": round(turns / records, 2),
                "response_chars": round(chars / records, 1),
            }
        )
    return rows
