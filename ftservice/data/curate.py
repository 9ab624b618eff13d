"""The curation pipeline on Ray Data: normalise, clean, deduplicate, decontaminate, filter by
length, split; then write curated files, a report and a token-length histogram.

Per-row work (reading, normalisation, PII, hashes, MinHash signatures, n-gram checks, token
counts) runs in Ray Data tasks, on the embedded local Ray or a cluster alike. The two global
steps (exact and near-duplicate removal) need every row's hash or signature at once: the
driver collects those small columns only, never the rows.

Steps run in the order of `STEPS`; a row removed by one step is counted there and nowhere
later, as if the steps ran one after the other.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import unicodedata
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ftservice.config import CurateSpec, JobSpec
from ftservice.data.formats import (
    REPORT,
    SCHEMA,
    CuratedReport,
    CuratedStep,
    content_hash,
    content_text,
    fingerprint,
    response_text,
)
from ftservice.data.loaders import (
    DataError,
    Piece,
    expand,
    file_format,
    iter_examples,
    iter_records,
    split_jsonl,
)
from ftservice.data.tokenize import count_tokens, count_tokens_batch, truncate_response
from ftservice.models import resolve_model

STEPS = [
    "empty_response",
    "exact_duplicate",
    "near_duplicate",
    "contaminated",
    "too_short",
    "too_long",
]
MIN_PIECE_BYTES = 1 << 20  # smaller read tasks cost more in scheduling than they save
MINHASH_SCHEME = "affine64"  # datasketch >= 2: 64-bit bijective permutations, no 32-bit fold
PII_PATTERNS = {
    "email": re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b"),
    "api_key": re.compile(
        r"\b(?:sk-[A-Za-z0-9_-]{16,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,}"
        r"|xox[abpr]-[A-Za-z0-9-]{10,}|(?=[A-Za-z0-9_-]*\d)(?=[A-Za-z0-9_-]*[A-Za-z])[A-Za-z0-9_-]{32,})\b"
    ),
    "ip_address": re.compile(
        r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b"
    ),
    "phone": re.compile(r"(?<![\w.])\+?\d{1,3}?[ .-]?\(?\d{2,4}\)?(?:[ .-]?\d{2,4}){2,4}(?![\w.])"),
}
PII_TOKENS = {"email": "<EMAIL>", "api_key": "<SECRET>", "ip_address": "<IP>", "phone": "<PHONE>"}
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200b\u3000]+")
_WORDS = re.compile(r"\w+")
_DROP_CONTROL = {c: None for c in [*range(32), 0x7F] if chr(c) not in "\n\t"}

ROW_TYPE = pa.schema(
    [
        *SCHEMA,
        ("source", pa.string()),
        ("content_hash", pa.string()),
        ("flag", pa.string()),
        ("n_tokens", pa.int64()),
        ("signature", pa.list_(pa.uint64())),
        *[(f"pii_{k}", pa.int64()) for k in PII_PATTERNS],
    ]
)


# ---- per-row transformations ------------------------------------------------------------


def normalise_text(text: str) -> str:
    """NFKC, no control characters, runs of spaces collapsed, ends of lines trimmed."""
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = text.translate(_DROP_CONTROL)
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def scrub_pii(text: str, counts: dict[str, int]) -> str:
    for kind, pattern in PII_PATTERNS.items():
        text, n = pattern.subn(PII_TOKENS[kind], text)
        counts[kind] += n
    return text


def _map_text(row: dict, fn) -> dict:
    row = dict(row)
    row["messages"] = [{"role": m["role"], "content": fn(m["content"])} for m in row["messages"]]
    for key in ("chosen", "rejected", "text"):
        if row[key] is not None:
            row[key] = fn(row[key])
    return row


def word_ngrams(text: str, n: int) -> set[int]:
    words = _WORDS.findall(text.lower())
    return {
        int.from_bytes(hashlib.blake2b(" ".join(words[i : i + n]).encode(), digest_size=8).digest())
        for i in range(len(words) - n + 1)
    }


def split_of(content_hash: str, fraction: float, seed: int) -> str:
    """'eval' or 'train' from the content alone: stable when the input is reordered."""
    digest = hashlib.sha256(f"{seed}:{content_hash}".encode()).digest()
    return "eval" if int.from_bytes(digest[:8]) / 2**64 < fraction else "train"


class CurateRows:
    """Every per-row step over one batch; marks rows, removes none."""

    def __init__(self, cfg: dict, tokenizer_path: str, banned_ngrams, max_tokens: int):
        import ray
        from datasketch import MinHash
        from transformers import AutoTokenizer

        self.cfg = CurateSpec.model_validate(cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        if isinstance(banned_ngrams, ray.ObjectRef):
            banned_ngrams = ray.get(banned_ngrams)
        self.banned = banned_ngrams or set()
        self.max_tokens = max_tokens
        self.MinHash = MinHash

    def _signature(self, text: str) -> list[int]:
        k = self.cfg.near_dedup.shingle_size
        low = text.lower()
        shingles = {low[i : i + k] for i in range(max(1, len(low) - k + 1))}
        mh = self.MinHash(num_perm=self.cfg.near_dedup.num_perm, seed=1, scheme=MINHASH_SCHEME)
        mh.update_batch([s.encode() for s in shingles])
        return mh.hashvalues.tolist()

    def __call__(self, batch: pa.Table) -> pa.Table:
        cfg = self.cfg
        rows, flags, pii = [], [], []
        for row in batch.to_pylist():
            counts = dict.fromkeys(PII_PATTERNS, 0)
            if cfg.normalize_unicode:
                row = _map_text(row, normalise_text)
            if cfg.pii:
                row = _map_text(row, lambda t, c=counts: scrub_pii(t, c))
            # a prompt has no answer by design: only an empty prompt is empty
            empty = (
                not (row["messages"][-1]["content"] if row["messages"] else "").strip()
                if row["kind"] == "prompt"
                else not response_text(row).strip()
                or (row["kind"] == "preference" and not (row["rejected"] or "").strip())
            )
            rows.append(row)
            flags.append("empty_response" if cfg.drop_empty and empty else None)
            pii.append(counts)
        # one batched tokenizer call for the whole batch (Rust, multi-threaded)
        lengths = count_tokens_batch(self.tokenizer, rows)
        out = []
        for row, flag, n_tokens, counts in zip(rows, flags, lengths, pii, strict=True):
            if flag is None:
                grams = word_ngrams(content_text(row), cfg.decontaminate.n) if self.banned else ()
                if grams and grams & self.banned:
                    flag = "contaminated"
                elif n_tokens < cfg.length.min_tokens:
                    flag = "too_short"
                elif n_tokens > self.max_tokens:
                    cut = None
                    if cfg.length.mode == "truncate":
                        cut = truncate_response(self.tokenizer, row, self.max_tokens)
                    if cut is None:
                        flag = "too_long"
                    else:
                        row, n_tokens = cut, count_tokens(self.tokenizer, cut)
            text = content_text(row)
            row["content_hash"] = content_hash(row)
            row["flag"] = flag
            row["n_tokens"] = n_tokens if flag != "empty_response" else 0
            row["signature"] = self._signature(text) if cfg.near_dedup.enabled else []
            row |= {f"pii_{k}": v for k, v in counts.items()}
            out.append(row)
        return pa.Table.from_pylist(out, schema=ROW_TYPE)


_STATE: dict[str, CurateRows] = {}


def curate_rows(batch: pa.Table, run_id: str, **settings) -> pa.Table:
    """Ray Data task function: reuses this worker process's CurateRows (tokenizer loaded once
    per run, not once per batch). Tasks rather than an actor pool leave Ray Data free to fuse
    reading with this step and to use every CPU."""
    if run_id not in _STATE:
        _STATE.clear()
        _STATE[run_id] = CurateRows(**settings)
    return _STATE[run_id](batch)


# ---- reading ------------------------------------------------------------------------------


def _read_piece(piece: Piece, fmt: str, known: str, system_prompt: str | None, batch_rows: int):
    rows = []
    for loc, _, row in iter_examples(piece.path, fmt, system_prompt, piece, known):
        row["source"] = str(loc)
        rows.append(row)
        if len(rows) >= batch_rows:
            yield _table(rows)
            rows = []
    if rows:
        yield _table(rows)


def _table(rows: list[dict]) -> pa.Table:
    schema = pa.schema([*SCHEMA, ("source", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


def read_dataset(paths: list[Path], fmt: str, system_prompt: str | None, batch_rows: int):
    """A Ray Dataset of normalised rows. JSONL files are cut into line-aligned byte ranges,
    so even one big file is read and processed by every CPU; other files are one task each.
    Each file's format is settled here, on the driver, so a piece cannot drift from it."""
    import ray.data
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    formats = {p: file_format(p, fmt) for p in paths}
    total = sum(_size(p) for p in paths)

    class ExampleFiles(Datasource):
        def estimate_inmemory_data_size(self):
            return total * 2

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            target = max(MIN_PIECE_BYTES, total // max(1, parallelism))
            pieces = [
                piece
                for p in paths
                for piece in (
                    split_jsonl(p, target)
                    if p.suffix.lower() in (".jsonl", ".ndjson")
                    else [Piece(p)]
                )
            ]
            return [
                ReadTask(
                    lambda piece=piece: _read_piece(
                        piece, fmt, formats[piece.path], system_prompt, batch_rows
                    ),
                    BlockMetadata(
                        num_rows=None,
                        size_bytes=(piece.end or _size(piece.path)) - piece.start,
                        input_files=[str(piece.path)],
                        exec_stats=None,
                    ),
                )
                for piece in pieces
            ]

    return ray.data.read_datasource(ExampleFiles())


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def reference_ngrams(paths: list[Path], n: int) -> set[int]:
    """n-grams of every text field of the eval and benchmark files (any format or none)."""
    grams: set[int] = set()
    for path in paths:
        for _, record in iter_records(path):
            grams |= word_ngrams(" ".join(_strings(record)), n)
    return grams


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


# ---- the driver ---------------------------------------------------------------------------


def report_table(report: CuratedReport) -> str:
    """The report as `ftservice data curate` prints it."""
    lengths = report.token_lengths
    lines = [f"{'step':<16}{'in':>9}{'removed':>9}{'out':>9}"]
    lines += [f"{s.step:<16}{s.rows_in:>9}{s.removed:>9}{s.rows_out:>9}" for s in report.steps]
    pii = ", ".join(f"{k} {v}" for k, v in report.pii.items() if v) or "none"
    lines += [
        f"split: train {report.split.get('train', 0)}, eval {report.split.get('eval', 0)}",
        f"pii replaced: {pii}",
        f"tokens: min {lengths.get('min', 0):.0f}, median {lengths.get('p50', 0):.0f}, "
        f"p95 {lengths.get('p95', 0):.0f}, max {lengths.get('max', 0):.0f}",
        f"fingerprint: {report.fingerprint}",
        f"written to: {report.output_dir}",
    ]
    return "\n".join(lines)


def _dedup(meta: dict, cfg: CurateSpec) -> dict[str, str]:
    """Reasons for the rows the two global steps remove: id -> reason.

    Rows are visited in content-hash order (not input order), so what is kept does not
    depend on how the input was ordered. Rows already flagged empty are out of the running;
    rows flagged by later steps (contamination, length) still take part, as they would if
    the steps ran one after the other.
    """
    order = np.argsort(meta["content_hash"], kind="stable")
    reasons: dict[str, str] = {}
    seen: set[str] = set()
    lsh = None
    if cfg.near_dedup.enabled:
        from datasketch import LeanMinHash, MinHashLSH

        lsh = MinHashLSH(threshold=cfg.near_dedup.threshold, num_perm=cfg.near_dedup.num_perm)
    for i in order:
        if meta["flag"][i] == "empty_response":
            continue
        rid, digest = meta["id"][i], meta["content_hash"][i]
        if cfg.exact_dedup:
            if digest in seen:
                reasons[rid] = "exact_duplicate"
                continue
            seen.add(digest)
        if lsh is not None:
            mh = LeanMinHash(
                seed=1,
                hashvalues=np.asarray(meta["signature"][i], dtype=np.uint64),
                scheme=MINHASH_SCHEME,
            )
            if lsh.query(mh):
                reasons[rid] = "near_duplicate"
                continue
            lsh.insert(f"{i}", mh)
    return reasons


def curate(spec: JobSpec, output_dir: str | None = None, progress: bool = True) -> CuratedReport:
    """Run the pipeline of `spec.data.curate` over `spec.data.train`; returns the report."""
    import ray

    cfg = spec.data.curate
    out = Path(output_dir or cfg.output_dir or f"curated/{spec.name}")
    inputs = expand(spec.data.train)
    max_tokens = cfg.length.max_tokens or spec.data.max_seq_length
    tokenizer_path = str(resolve_model(spec.model).path)
    banned: set[int] = set()
    if cfg.decontaminate.enabled:
        refs = [*spec.data.eval, *cfg.decontaminate.benchmarks]
        if spec.eval.domain and Path(spec.eval.domain).exists():
            refs.append(spec.eval.domain)
        banned = reference_ngrams(expand(refs), cfg.decontaminate.n) if refs else set()

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ds = read_dataset(inputs, spec.data.format, spec.data.system_prompt, cfg.batch_rows)
    ds = ds.map_batches(
        curate_rows,
        fn_kwargs={
            "run_id": uuid.uuid4().hex,
            "cfg": cfg.model_dump(),
            "tokenizer_path": tokenizer_path,
            "banned_ngrams": ray.put(banned) if banned else None,
            "max_tokens": max_tokens,
        },
        batch_format="pyarrow",
        batch_size=cfg.batch_rows,
    )
    try:
        ds = ds.materialize()
        columns = ["id", "content_hash", "flag", "n_tokens", "signature"]
        meta = _collect(ds, columns + [f"pii_{k}" for k in PII_PATTERNS])
    except Exception as e:  # Ray wraps errors raised in tasks; show ours as they are
        raise _unwrap(e) from None
    return _finish(spec, cfg, ds, meta, inputs, out)


def _collect(ds, columns: list[str]) -> dict[str, list]:
    meta: dict[str, list] = {c: [] for c in columns}
    for batch in ds.select_columns(columns).iter_batches(batch_format="pyarrow", batch_size=65536):
        for c in columns:
            meta[c].extend(batch.column(c).to_pylist())
    return meta


def _unwrap(err: BaseException) -> BaseException:
    """The DataError a Ray task raised, without Ray's wrapping; other errors as they are.

    Ray re-raises task errors as subclasses of the original type whose message is a
    traceback and advice; the original is further down the cause chain."""
    seen: BaseException | None = err
    for _ in range(10):
        if seen is None:
            break
        if type(seen) is DataError:
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
    return err


def _finish(spec, cfg: CurateSpec, ds, meta, inputs, out: Path) -> CuratedReport:
    import ray

    n = len(meta["id"])
    ids = meta["id"]
    repeated = sorted(i for i, c in Counter(ids).items() if c > 1)
    if repeated:
        raise DataError(
            f"record ids must be unique across the inputs; repeated: {', '.join(repeated[:5])} "
            "(give each record its own 'id', or drop the 'id' fields to use file:line ids)"
        )
    reasons = {
        rid: flag for rid, flag in zip(ids, meta["flag"], strict=True) if flag == "empty_response"
    }
    reasons |= _dedup(meta, cfg)
    for rid, flag in zip(ids, meta["flag"], strict=True):
        if flag and rid not in reasons:
            reasons[rid] = flag
    steps, rows = [], n
    for step in STEPS:
        removed = sum(1 for r in reasons.values() if r == step)
        steps.append(CuratedStep(step=step, rows_in=rows, rows_out=rows - removed, removed=removed))
        rows -= removed
    if rows == 0:
        emptied = next(s for s in steps if s.rows_out == 0)
        raise DataError(
            f"curation removed every example of {', '.join(map(str, inputs))}: the "
            f"'{emptied.step}' step removed the last {emptied.removed} of {n}; check that "
            "step's settings under data.curate (or switch it off)"
        )
    kept_hashes = {
        h: rid for rid, h in zip(ids, meta["content_hash"], strict=True) if rid not in reasons
    }
    splits = {h: split_of(h, cfg.eval_fraction, cfg.split_seed) for h in kept_hashes}
    dataset_fingerprint = fingerprint((s, h) for h, s in splits.items())
    lengths = [t for rid, t in zip(ids, meta["n_tokens"], strict=True) if rid not in reasons]

    dropped = ray.put(set(reasons))
    fraction, seed = cfg.eval_fraction, cfg.split_seed
    columns = [c.name for c in SCHEMA]

    def tag(batch: pa.Table) -> pa.Table:
        """Kept rows only, in the output schema, with their split."""
        gone = ray.get(dropped)
        mask = pa.array([rid not in gone for rid in batch.column("id").to_pylist()])
        kept = batch.filter(mask)
        split = [split_of(h, fraction, seed) for h in kept.column("content_hash").to_pylist()]
        return kept.select(columns).append_column("split", pa.array(split, pa.string()))

    def only(batch: pa.Table, split: str) -> pa.Table:
        return batch.filter(pc.equal(batch.column("split"), split)).drop_columns(["split"])

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published folder is an ordinary one
    try:
        tagged = ds.map_batches(tag, batch_format="pyarrow").materialize()
        files = {}
        for split in ("train", "eval"):
            if not any(s == split for s in splits.values()):
                continue
            part = tagged.map_batches(only, fn_kwargs={"split": split}, batch_format="pyarrow")
            target = tmp / split
            if cfg.output_format == "parquet":
                part.write_parquet(str(target))
            else:
                part.write_json(str(target))
            files[split] = str(out / split)
        split_counts = {s: sum(1 for v in splits.values() if v == s) for s in ("train", "eval")}
        report = CuratedReport(
            inputs=[str(p) for p in inputs],
            output_dir=str(out),
            fingerprint=dataset_fingerprint,
            rows_in=n,
            rows_out=sum(split_counts.values()),
            steps=steps,
            removed={s: sorted(r for r, why in reasons.items() if why == s) for s in STEPS},
            pii={k: int(sum(meta[f"pii_{k}"])) for k in PII_PATTERNS},
            split=split_counts,
            token_lengths=_length_stats(lengths),
            files=files | {"report": str(out / REPORT), "histogram": str(out / "lengths.png")},
        )
        plot_lengths(
            lengths,
            max_tokens=cfg.length.max_tokens or spec.data.max_seq_length,
            path=tmp / "lengths.png",
        )
        report.write(tmp / REPORT)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _length_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    arr = np.asarray(lengths)
    return {
        "min": float(arr.min()),
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
        "max": float(arr.max()),
        "mean": float(arr.mean()),
    }


def plot_lengths(lengths: list[int], max_tokens: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    low, high = min(lengths), max(lengths)
    bins = np.arange(low, high + 2) - 0.5 if high - low < 60 else 50  # one bar per length if few
    ax.hist(lengths, bins=bins, color="#3b7dd8", edgecolor="white")
    ax.axvline(max_tokens, color="#d83b3b", linestyle="--", label=f"max_tokens = {max_tokens}")
    ax.set_xlabel("tokens per example (chat template applied)")
    ax.set_ylabel("examples")
    ax.set_title(f"Token lengths of {len(lengths)} curated examples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
