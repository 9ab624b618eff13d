// The leaderboard page: ratings, intervals, plots and annotators of a campaign, for
// signed-in annotators (the session cookie).
"use strict";

const $ = (id) => document.getElementById(id);

async function getJson(path) {
  const r = await fetch(path, { credentials: "same-origin" });
  const data = await r.json().catch(() => null);
  if (!r.ok) throw new Error((data && data.error && data.error.message) || `HTTP ${r.status}`);
  return data;
}

function cell(text, numeric) {
  const td = document.createElement("td");
  td.textContent = text;
  if (numeric) td.className = "num";
  return td;
}

function interval(r) {
  const [lo, hi] = r.ci95.map((x) => x.toFixed(0));
  if (r.open === "above") return `open: never lost (${r.won} wins)`;
  if (r.open === "below") return `open: never won (${r.lost} losses)`;
  return `${lo} – ${hi}`;
}

async function show(campaign) {
  const board = await getJson(`/arena/api/campaigns/${encodeURIComponent(campaign)}/leaderboard`);
  $("scale").textContent = `${board.votes} votes counted · ${board.scale}`;
  const body = $("ratings").querySelector("tbody");
  body.replaceChildren(...board.ratings.map((r) => {
    const tr = document.createElement("tr");
    tr.append(cell(r.rank, true), cell(r.model), cell(r.rating.toFixed(0), true),
              cell(interval(r), true), cell(`${r.votes} (${r.won}–${r.lost})`, true));
    return tr;
  }));
  const a = board.agreement;
  $("agreement").textContent = a
    ? `Agreement on ${a.items} comparisons seen by several annotators: ${(a.pairwise * 100)
        .toFixed(0)}% of pairs agree; Fleiss' kappa ${a.fleiss_kappa ?? "n/a"}.`
    : "No comparison was seen by two annotators yet (campaign overlap 1).";
  // per-annotator quality comes to admins only: annotators see no other annotator
  const quality = board.quality ? board.quality.annotators : [];
  $("annotators").hidden = !board.quality;
  $("annotators").querySelector("tbody").replaceChildren(...quality.map((x) => {
    const tr = document.createElement("tr");
    tr.append(cell(x.annotator), cell(x.votes, true), cell(`${x.gold_right}/${x.gold}`, true),
              cell(`${x.agreed}/${x.shared}`, true),
              cell(x.reliability === null ? "–" : x.reliability.toFixed(2), true),
              cell(x.median_s_per_vote, true), cell(x.counts ? "yes" : "no"),
              cell(x.flags.join("; ") || "–"));
    return tr;
  }));
  const base = `/arena/api/campaigns/${encodeURIComponent(campaign)}`;
  const plots = board.ratings.length >= 2;
  $("plot-ratings").hidden = $("plot-winrate").hidden = !plots;
  if (plots) {
    $("plot-ratings").src = `${base}/leaderboard.png?t=${Date.now()}`;
    $("plot-winrate").src = `${base}/winrate.png?t=${Date.now()}`;
  }
  $("board").hidden = false;
  $("status").textContent = board.ratings.length ? "" : "No votes yet.";
}

async function init() {
  try {
    const me = await getJson("/arena/api/session");
    $("who").textContent = `Signed in as ${me.annotator}`;
    const names = me.campaigns.map((c) => c.name);
    if (!names.length) throw new Error("you are not an annotator of any campaign");
    const wanted = new URLSearchParams(location.search).get("campaign");
    const campaign = names.includes(wanted) ? wanted : names[0];
    $("campaign").replaceChildren(...names.map((n) => new Option(n, n, false, n === campaign)));
    $("campaign-label").hidden = names.length < 2;
    $("campaign").addEventListener("change", () => show($("campaign").value));
    await show(campaign);
  } catch (e) {
    $("status").textContent = `${e.message}. Sign in on the comparison page first: /arena`;
  }
}

document.addEventListener("DOMContentLoaded", init);
