"""The README's screenshots of the comparison page, from a running app, as a person uses it:
sign in with an annotator key, vote on N comparisons with the keyboard (1-4, Enter), save the
page just after a vote (identities revealed) and the leaderboard page.

    ftservice serve run serve/quickstart.yaml        # in another shell, after make quickstart
    KEY=$(ftservice feedback annotators add ann1 --campaign quickstart)
    .venv/bin/python docs/screenshots.py --url http://127.0.0.1:8000 --key "$KEY" --votes 12

Needs Debian's Chromium (/usr/bin/chromium), as the browser tests do.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

HERE = Path(__file__).resolve().parent
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


def wait_enabled(page, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while not page.locator("#votes button[data-verdict='a']").is_enabled():
        if time.time() > deadline:
            raise TimeoutError("the answers did not finish")
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--key", required=True, help="an annotator key")
    parser.add_argument("--votes", type=int, default=12)
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args()
    out = Path(args.out)
    rng = random.Random(0)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 760})
        page.goto(f"{args.url}/arena")
        page.locator("#token").fill(args.key)
        page.keyboard.press("Enter")
        page.locator("#arena").wait_for()
        for n in range(args.votes):
            if not page.locator("#finished").is_hidden():
                break
            wait_enabled(page)
            # a person's judgement stands in here: the shorter answer, often the plain fact
            a = len(page.locator("#text-a").text_content() or "")
            b = len(page.locator("#text-b").text_content() or "")
            key = "1" if a < b else "2"
            if rng.random() < 0.15:
                key = "3"
            page.keyboard.press(key)
            page.locator("#next").wait_for()
            if n == args.votes - 1:
                page.screenshot(path=str(out / "arena.png"))
            else:
                page.keyboard.press("Enter")
                page.locator("#next").wait_for(state="hidden")
        page.goto(f"{args.url}/arena/leaderboard")
        page.locator("#ratings tbody tr").first.wait_for()
        time.sleep(2)  # the plots
        page.screenshot(path=str(out / "leaderboard-page.png"), full_page=True)
        browser.close()
    shots = ["arena.png"] if args.votes else []
    print("wrote " + ", ".join(str(out / name) for name in [*shots, "leaderboard-page.png"]))


if __name__ == "__main__":
    main()
