"""The leaderboard of a campaign: Bradley–Terry ratings with ties (fitted as Chatbot Arena
fits them: a logistic regression without intercept, a tie half a win for each side), on an
Elo-like scale (400 points per factor of 10 in odds) centred so the base scores 1000 (the
mean when the base does not compete), bootstrap intervals, the win-rate matrix, annotator
agreement and each annotator's votes and time."""

from __future__ import annotations

import json
import warnings
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path

import numpy as np

from ftservice.feedback.campaign import answer_slots

SCALE, CENTRE = 400.0, 1000.0
PRIOR_C = 1e4
"""The logistic regression's L2 strength (sklearn's C): negligible; the virtual ties below
are what keep a model that never lost finite."""
VIRTUAL_TIES = 1
"""Ties added between every pair of models that met (add-one smoothing, as rating systems
seed new players): 12 wins of 12 give +559 points, not infinity; with tens of votes per pair
the shift is a few points."""


def outcomes(votes: list[dict]) -> list[tuple[str, str, float]]:
    """(model on the left, model on the right, the left's score: 1 win, 0 loss, 0.5 tie or
    both bad) of each vote between two models (a model against itself rates nothing)."""
    score = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}
    return [(v["model_a"], v["model_b"], score[v["verdict"]]) for v in votes
            if v["model_a"] != v["model_b"]]  # fmt: skip


def virtual_ties(games: list[tuple[str, str, float]]) -> list[tuple[str, str, float]]:
    pairs = sorted({tuple(sorted((i, j))) for i, j, _ in games})
    return [(i, j, 0.5) for i, j in pairs for _ in range(VIRTUAL_TIES)]


def fit_ratings(games: list[tuple[str, str, float]], models: list[str], base: str | None):
    """Ratings of the models from (i, j, i's score) games (plus the virtual ties)."""
    from sklearn.linear_model import LogisticRegression

    games = games + virtual_ties(games)
    index = {m: k for k, m in enumerate(models)}
    rows, ys, weights = [], [], []
    for i, j, s in games:
        x = np.zeros(len(models))
        x[index[i]], x[index[j]] = np.log(10), -np.log(10)
        for y, w in ((1, s), (0, 1 - s)):
            if w > 0:
                rows.append(x)
                ys.append(y)
                weights.append(w)
    lr = LogisticRegression(fit_intercept=False, C=PRIOR_C, tol=1e-8, max_iter=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lr.fit(np.array(rows), np.array(ys), sample_weight=np.array(weights))
    raw = SCALE * lr.coef_[0]
    anchor = raw[index[base]] if base in index else raw.mean()
    return {m: float(CENTRE + raw[k] - anchor) for m, k in index.items()}


def leaderboard(
    votes: list[dict],
    base: str | None = None,
    resamples: int = 1000,
    seed: int = 0,
    items: dict[str, str] | None = None,
) -> dict:
    """Everything the leaderboard shows, from the votes that count (dicts with model_a,
    model_b, verdict, annotator, comparison_id, latency). `items`: comparison id -> item, for
    agreement between annotators who saw the same comparison."""
    games = outcomes(votes)
    models = sorted({m for i, j, _ in games for m in (i, j)})
    out: dict = {
        "votes": len(votes),
        "models": models,
        "scale": (
            f"Bradley–Terry, {SCALE:g} points per factor of 10 in odds, one virtual tie per "
            "pair, "
            + (f"the base '{base}' at {CENTRE:g}" if base in models else f"mean {CENTRE:g}")
        ),
    }
    if len(models) < 2:  # nothing to rate (no votes, or a model against itself only)
        out |= {"ratings": [], "winrate": {},
                "agreement": agreement(votes, items) if items and votes else None,
                "annotators": annotator_stats(votes) if votes else []}  # fmt: skip
        return out
    ratings = fit_ratings(games, models, base)
    rng = np.random.default_rng(seed)
    boot = defaultdict(list)
    for _ in range(resamples):
        sample = [games[k] for k in rng.integers(0, len(games), len(games))]
        present = sorted({m for i, j, _ in sample for m in (i, j)})
        if len(present) < 2:
            continue
        for m, r in fit_ratings(sample, present, base).items():
            boot[m].append(r)
    counts = Counter(m for i, j, _ in games for m in (i, j))
    lost = Counter(i if s == 0 else j for i, j, s in games if s in (0.0, 1.0))
    won = Counter(i if s == 1 else j for i, j, s in games if s in (0.0, 1.0))
    table = []
    for m in sorted(models, key=lambda m: -ratings[m]):
        lo, hi = np.percentile(boot[m], [2.5, 97.5]) if boot[m] else (np.nan, np.nan)
        row = {"model": m, "rating": round(ratings[m], 1),
               "ci95": [round(float(lo), 1), round(float(hi), 1)],
               "votes": counts[m], "won": won[m], "lost": lost[m]}  # fmt: skip
        # a model that never lost (or never won) has no upper (lower) bound the votes support:
        # every resample is the same clean sweep, so the bootstrap cannot see the spread
        if m != base and won[m] and not lost[m]:
            row["open"] = "above"
        elif m != base and lost[m] and not won[m]:
            row["open"] = "below"
        table.append(row)
    for rank, row in enumerate(table, 1):
        row["rank"] = rank
    out |= {
        "ratings": table,
        "resamples": resamples,
        "winrate": winrate(games, models),
        "agreement": agreement(votes, items) if items else None,
        "annotators": annotator_stats(votes),
    }
    return out


def winrate(games, models) -> dict:
    """winrate[i][j]: the share of i's decided games against j that i won (ties and both-bad
    left out); None where they never met with a decision."""
    won, played = Counter(), Counter()
    for i, j, s in games:
        if s in (0.0, 1.0):
            played[(i, j)] += 1
            played[(j, i)] += 1
            won[(i, j) if s == 1.0 else (j, i)] += 1
    return {i: {j: (round(won[(i, j)] / played[(i, j)], 3) if played[(i, j)] else None)
                for j in models if j != i} for i in models}  # fmt: skip


def vote_label(vote: dict) -> str:
    """A vote in the item's own terms (which answer won: the model's, or its sample's where a
    model is compared with itself), not the page's left/right."""
    if vote["verdict"] in ("tie", "both_bad"):
        return vote["verdict"]
    slots = answer_slots(vote["model_a"], vote["model_b"], bool(vote.get("swapped")))
    return slots[0] if vote["verdict"] == "a" else slots[1]


def fleiss_kappa(table: np.ndarray) -> float | None:
    """Fleiss' kappa of an items × categories count table (the same raters per item)."""
    n = table.sum(axis=1)
    if len(table) < 2 or not np.all(n == n[0]) or n[0] < 2:
        return None
    n = n[0]
    p_j = table.sum(axis=0) / table.sum()
    p_i = ((table**2).sum(axis=1) - n) / (n * (n - 1))
    p_bar, p_e = p_i.mean(), (p_j**2).sum()
    return None if p_e == 1 else float((p_bar - p_e) / (1 - p_e))


def agreement(votes: list[dict], items: dict[str, str]) -> dict | None:
    """Pairwise agreement over items several annotators judged, Cohen's kappa for each pair
    of annotators with shared items, Fleiss' kappa over items with the most common number
    of judgements."""
    from sklearn.metrics import cohen_kappa_score

    by_item: dict[str, dict[str, str]] = defaultdict(dict)
    for v in votes:
        by_item[items[v["comparison_id"]]][v["annotator"]] = vote_label(v)
    shared = {k: d for k, d in by_item.items() if len(d) >= 2}
    if not shared:
        return None
    agree = total = 0
    pairs: dict[tuple, list] = defaultdict(list)
    for d in shared.values():
        for x, y in combinations(sorted(d), 2):
            total += 1
            agree += d[x] == d[y]
            pairs[(x, y)].append((d[x], d[y]))
    cohen = {}
    for (x, y), labels in pairs.items():
        if len(labels) >= 2:
            a, b = zip(*labels, strict=True)
            k = cohen_kappa_score(a, b) if len(set(a) | set(b)) > 1 else None
            cohen[f"{x}|{y}"] = None if k is None or np.isnan(k) else round(float(k), 3)
    size = Counter(len(d) for d in shared.values()).most_common(1)[0][0]
    cats = sorted({label for d in shared.values() for label in d.values()})
    rows = [[list(d.values()).count(c) for c in cats] for d in shared.values() if len(d) == size]
    fleiss = fleiss_kappa(np.array(rows)) if rows else None
    return {
        "items": len(shared),
        "pairwise": round(agree / total, 3),
        "cohen_kappa": cohen,
        "fleiss_kappa": None if fleiss is None else round(fleiss, 3),
        "fleiss_raters": size,
    }


def annotator_stats(votes: list[dict]) -> list[dict]:
    per: dict[str, list[float]] = defaultdict(list)
    for v in votes:
        latency = v["latency"] if isinstance(v["latency"], dict) else json.loads(v["latency"])
        per[v["annotator"]].append(latency.get("issue_to_vote_ms") or 0.0)
    return [{"annotator": a, "votes": len(ms), "median_s_per_vote": round(
        float(np.median(ms)) / 1000, 1)} for a, ms in sorted(per.items())]  # fmt: skip


def plots(board: dict, folder: Path) -> list[Path]:
    """leaderboard.png (ratings with 95% intervals) and winrate.png (the matrix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    rows = list(reversed(board["ratings"]))
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.45 * len(rows)))
    y = np.arange(len(rows))
    r = np.array([row["rating"] for row in rows])
    lo = np.array([row["ci95"][0] for row in rows])
    hi = np.array([row["ci95"][1] for row in rows])
    ax.errorbar(r, y, xerr=[r - lo, hi - r], fmt="o", capsize=4, color="#2b6cb0")
    span = max(float(np.nanmax(hi) - np.nanmin(lo)), 200.0)
    for k, row in enumerate(rows):  # an open end: an arrow, not a cap
        if row.get("open"):
            edge, step = (hi[k], 1) if row["open"] == "above" else (lo[k], -1)
            ax.annotate("", xy=(edge + step * 0.25 * span, k), xytext=(edge, k),
                        arrowprops={"arrowstyle": "->", "color": "#2b6cb0", "lw": 1.5})  # fmt: skip
    ax.set_xlim(np.nanmin(lo) - 0.3 * span, np.nanmax(hi) + 0.3 * span)
    ax.set_yticks(
        y,
        [f"{row['model']} ({row['votes']} vote{'' if row['votes'] == 1 else 's'})" for row in rows],
    )
    ax.axvline(CENTRE, color="#999", lw=0.8, ls="--")
    ax.set_xlabel("rating (95% bootstrap interval)")
    ax.set_title(f"Leaderboard: {board['votes']} votes")
    fig.tight_layout()
    paths = [folder / "leaderboard.png", folder / "winrate.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    models = [row["model"] for row in board["ratings"]]
    grid = np.full((len(models), len(models)), np.nan)
    for a, i in enumerate(models):
        for b, j in enumerate(models):
            if i != j and board["winrate"][i][j] is not None:
                grid[a, b] = board["winrate"][i][j]
    size = max(4.5, 2 + 0.8 * len(models))
    fig, ax = plt.subplots(figsize=(size, 2.5 + 0.7 * len(models)))
    im = ax.imshow(grid, cmap="RdBu", vmin=0, vmax=1)
    ax.set_xticks(range(len(models)), models, rotation=45, ha="right")
    ax.set_yticks(range(len(models)), models)
    for a in range(len(models)):
        for b in range(len(models)):
            if not np.isnan(grid[a, b]):
                ax.text(b, a, f"{grid[a, b]:.2f}", ha="center", va="center", fontsize=9)
    ax.set_title("Win rate, row against column")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths
