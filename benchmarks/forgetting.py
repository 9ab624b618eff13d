"""The quickstart's old recipe against the forgetting-aware one, side by side, two seeds each.

Runs `ftservice train cluster/jobs/quickstart.yaml` as a user would (each run its own local
Ray, registry and runs folder, so nothing is reused between them but the converted model and
the base's cached evaluation numbers), for each recipe and seed:
- old: the quickstart without replay or the KL term (`data.replay=null train.kl_to_base=0`);
- new: the quickstart as shipped (replay of the base's answers, KL to the base on them).
Reports the held-out domain score and loss, KL(base‖tuned) and the perplexity of the base's
answers on the held-out general prompts, training seconds and the whole command's wall time;
writes `forgetting.json` and `forgetting.png` (domain score against drift) into --out.

    .venv/bin/python benchmarks/forgetting.py [--seeds 42 2] [--out docs]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    "old": ["data.replay=null", "train.kl_to_base=0"],
    "new": [],
}


def run(recipe: str, seed: int, env: dict, work: Path) -> dict:
    folder = work / f"{recipe}-{seed}"
    cmd = [
        sys.executable, "-m", "ftservice", "train", "cluster/jobs/quickstart.yaml",
        *RECIPES[recipe], f"train.seed={seed}", f"output.registry={folder / 'registry'}",
        f"output.storage_path={folder / 'runs'}", "--json",
    ]  # fmt: skip
    print(f"== {recipe} recipe, seed {seed}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"{recipe} seed {seed}: ftservice train exited {out.returncode}")
    text = "\n" + out.stdout  # the JSON is last, after whatever the workers printed
    meta = json.loads(text[text.rindex("\n{\n") :])
    m = meta["metrics"]
    ev = m["evaluation"]
    runtime = next(h["train_runtime"] for h in reversed(m_history(meta)) if "train_runtime" in h)
    return {
        "recipe": recipe,
        "seed": seed,
        "domain_score": ev["domain"]["accuracy"],
        "domain_correct": ev["domain"]["correct"],
        "domain_total": ev["domain"]["total"],
        "domain_loss": ev["domain"]["loss"],
        "kl_from_base": ev["forgetting"]["kl_from_base"],
        "perplexity_tuned": ev["forgetting"]["perplexity_tuned"],
        "base": {
            "domain_score": ev["domain_base"]["accuracy"],
            "domain_loss": ev["domain_base"]["loss"],
            "perplexity": ev["forgetting"]["perplexity_base"],
        },
        "train_seconds": runtime,
        "steps": m["global_step"],
        "wall_seconds": round(wall, 1),
        "replay": m.get("replay"),
    }


def m_history(meta: dict) -> list[dict]:
    return json.loads((Path(meta["artifact"]) / "log_history.json").read_text())


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    colors = {"old": "tab:gray", "new": "tab:green"}
    for recipe in RECIPES:
        mine = [r for r in rows if r["recipe"] == recipe]
        ax.scatter([r["kl_from_base"] for r in mine], [100 * r["domain_score"] for r in mine],
                   color=colors[recipe], s=60, label=f"{recipe} recipe")  # fmt: skip
        for i, r in enumerate(mine):  # labels alternately above and below: seeds lie close
            ax.annotate(f"seed {r['seed']}", (r["kl_from_base"], 100 * r["domain_score"]),
                        fontsize=8, xytext=(5, 3 if i % 2 == 0 else -11),
                        textcoords="offset points")  # fmt: skip
    ax.scatter([0], [100 * rows[0]["base"]["domain_score"]], color="black", marker="x", s=60,
               label="base")  # fmt: skip
    ax.set_xlabel("KL(base ‖ tuned), nats/token, held-out general prompts")
    ax.set_ylabel("held-out domain score (%)")
    ax.set_title("quickstart: domain learned against drift from the base")
    ax.set_xlim(left=-0.03)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 2])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ftservice-forgetting-") as work:
        for seed in args.seeds:
            for recipe in args.recipes:
                rows.append(run(recipe, seed, env, Path(work)))
                (args.out / "forgetting.json").write_text(json.dumps(rows, indent=1))
    plot(rows, args.out / "forgetting.png")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
