// The comparison page: sign in, get a comparison from the server, watch both answers stream,
// vote (click or keys 1-4), see who was who, go on (Enter). Text is only ever set with
// textContent: prompts, answers and comments are shown as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { csrf: null, me: null, campaign: null, comparison: null, ready: false,
                voted: null, stream: null, retries: 0, busy: false };

function newId() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

async function api(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  if (state.csrf) headers["X-CSRF-Token"] = state.csrf;
  const r = await fetch(path, { method, headers, credentials: "same-origin",
                                body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) {
    const msg = (data && data.error && data.error.message) || `HTTP ${r.status}`;
    const err = new Error(msg);
    err.status = r.status;
    throw err;
  }
  return data;
}

function show(id, on) { $(id).hidden = !on; }
function status(text) { $("status").textContent = text; }

async function init() {
  $("sign-in").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  $("next").addEventListener("click", () => loadNext());
  $("custom").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("custom-prompt").value.trim();
    if (text) loadNext(text);
  });
  $("campaign").addEventListener("change", () => {
    state.campaign = $("campaign").value;
    loadNext();
  });
  for (const b of document.querySelectorAll("#votes button")) {
    b.addEventListener("click", () => vote(b.dataset.verdict));
  }
  document.addEventListener("keydown", onKey);
  try {
    start(await api("GET", "/arena/api/session"));
  } catch (e) {
    show("sign-in", true);
    $("token").focus();
  }
}

async function signIn(e) {
  e.preventDefault();
  $("sign-in-error").textContent = "";
  try {
    start(await api("POST", "/arena/api/session", { token: $("token").value }));
    $("token").value = "";
  } catch (err) {
    $("sign-in-error").textContent = err.message;
  }
}

async function signOut() {
  try { await api("DELETE", "/arena/api/session"); } catch (e) { /* signed out anyway */ }
  location.reload();
}

function start(me) {
  state.me = me;
  state.csrf = me.csrf;
  show("sign-in", false);
  show("sign-out", true);
  $("who").textContent = `Signed in as ${me.annotator}`;
  if (!me.campaigns.length) {
    show("finished", true);
    $("finished-text").textContent = "You are not an annotator of any campaign on this app.";
    return;
  }
  const wanted = new URLSearchParams(location.search).get("campaign");
  const names = me.campaigns.map((c) => c.name);
  state.campaign = names.includes(wanted) ? wanted : names[0];
  const select = $("campaign");
  select.replaceChildren(...names.map((n) => new Option(n, n, false, n === state.campaign)));
  show("campaign-label", names.length > 1);
  $("board-link").href = `/arena/leaderboard?campaign=${encodeURIComponent(state.campaign)}`;
  show("arena", true);
  loadNext();
}

function setProgress(p) {
  const max = p.quota || Math.max(p.done + 1, 1);
  $("progress").max = max;
  $("progress").value = p.done;
  $("progress-text").textContent = p.quota ? `${p.done} / ${p.quota} done` : `${p.done} done`;
  const c = state.me.campaigns.find((x) => x.name === state.campaign);
  show("custom", !!(c && c.allow_custom_prompts));
}

function renderPrompt(messages) {
  const box = $("prompt");
  box.replaceChildren();
  for (const m of messages) {
    if (m.role === "system") continue;
    const role = document.createElement("div");
    role.className = "role";
    role.textContent = m.role;
    const text = document.createElement("div");
    text.textContent = m.content;
    box.append(role, text);
  }
}

function resetPanes() {
  for (const side of ["a", "b"]) {
    $(`text-${side}`).textContent = "";
    $(`model-${side}`).textContent = "";
    $(`pane-${side}`).classList.remove("winner");
  }
}

function enableVotes(on) {
  for (const b of document.querySelectorAll("#votes button")) {
    b.disabled = !on;
    b.classList.remove("chosen");
  }
}

async function loadNext(customPrompt) {
  if (state.busy) return;
  state.busy = true;
  const ask = $("custom").querySelector("button");
  ask.disabled = true;  // one request for a comparison at a time
  if (state.stream) state.stream.close();
  Object.assign(state, { comparison: null, ready: false, voted: null, retries: 0 });
  enableVotes(false);
  show("next", false);
  resetPanes();
  $("comment").value = "";
  $("better").value = "";
  status("Getting the next comparison…");
  try {
    const body = customPrompt ? { prompt: customPrompt } : {};
    const c = await api("POST", `/arena/api/campaigns/${encodeURIComponent(state.campaign)}/next`,
                        body);
    if (customPrompt) $("custom-prompt").value = "";
    setProgress(c.progress);
    if (c.done) {
      show("arena", false);
      show("finished", true);
      $("finished-text").textContent =
        `You have voted on ${c.progress.done} comparisons in ${state.campaign}. Thank you!`;
      return;
    }
    state.comparison = c;
    renderPrompt(c.prompt);
    openStream();
  } catch (err) {
    status(err.message);
  } finally {
    state.busy = false;
    ask.disabled = false;
  }
}

function openStream() {
  const c = state.comparison;
  resetPanes();
  const done = { a: false, b: false };
  status("Both models are answering…");
  const es = new EventSource(`/arena/api/comparisons/${encodeURIComponent(c.id)}/stream`);
  state.stream = es;
  es.onmessage = (msg) => {
    const ev = JSON.parse(msg.data);
    if (ev.complete) {
      es.close();
      if (done.a && done.b) {
        state.ready = true;
        enableVotes(true);
        status("Which is better? Vote with the buttons or the keys 1–4.");
      }
      return;
    }
    if (ev.error) {
      status(`Answer ${ev.side.toUpperCase()} failed: ${ev.error}`);
      return;
    }
    if (ev.text) $(`text-${ev.side}`).textContent += ev.text;
    if (ev.done) done[ev.side] = true;
  };
  es.onerror = () => {
    es.close();
    if (state.ready || state.comparison !== c) return;
    if (state.retries++ < 3) {
      status("Connection lost; asking again…");
      setTimeout(openStream, 1000);
    } else {
      status("The answers could not be loaded; press Enter to try another comparison.");
      show("next", true);
    }
  };
}

async function vote(verdict) {
  if (!state.ready || state.busy) return;
  const c = state.comparison;
  const body = {
    vote_id: newId(), comparison_id: c.id, verdict,
    comment: $("comment").value || null, better_answer: $("better").value || null,
    replaces: state.voted ? state.voted.vote_id : null,
  };
  state.busy = true;
  status("Saving your vote…");
  try {
    let out = null;
    for (let attempt = 0; ; attempt++) {  // the same vote id again is a replay, never a 2nd vote
      try {
        out = await api("POST", "/arena/api/votes", body);
        break;
      } catch (err) {
        if (err.status || attempt >= 2) throw err;
        await new Promise((r) => setTimeout(r, 500 * (attempt + 1)));
      }
    }
    state.voted = out.vote;
    reveal(out, verdict);
    setProgress(out.progress);
    status(!body.replaces ? "Vote saved. Press Enter for the next one."
      : out.counted ? "Vote changed."
      : "Change kept as a note: the models were shown, so your first vote is the one that counts.");
    show("next", true);
    $("next").focus();
  } catch (err) {
    status(`Your vote was not saved: ${err.message}`);
  } finally {
    state.busy = false;
  }
}

function reveal(out, verdict) {
  if (out.revealed) {  // campaigns with reveal: false never show the models
    $("model-a").textContent = out.revealed.a;
    $("model-b").textContent = out.revealed.b;
  }
  for (const side of ["a", "b"]) $(`pane-${side}`).classList.toggle("winner", verdict === side);
  for (const b of document.querySelectorAll("#votes button")) {
    b.classList.toggle("chosen", b.dataset.verdict === verdict);
  }
}

function onKey(e) {
  const tag = (e.target && e.target.tagName) || "";
  if (["INPUT", "TEXTAREA", "SELECT"].includes(tag) || e.ctrlKey || e.metaKey || e.altKey) return;
  const verdicts = { 1: "a", 2: "b", 3: "tie", 4: "both_bad" };
  if (verdicts[e.key] && !$("arena").hidden) {
    e.preventDefault();
    vote(verdicts[e.key]);
  } else if (e.key === "Enter" && !$("next").hidden && tag !== "BUTTON") {
    e.preventDefault();
    loadNext();
  }
}

document.addEventListener("DOMContentLoaded", init);
