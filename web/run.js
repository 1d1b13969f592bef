// The run page: a live session on /ws/runs/{runId}.
//
// Mutations go into an outbox (kept in this tab's sessionStorage, so a reload or a lost
// connection keeps them) and are sent when the session is joined, a window at a time; each
// leaves the outbox when the node acknowledges it (durable) or refuses it for good (with the
// reason shown). A temporary refusal (busy, unavailable) keeps it for a later try. On
// reconnect what was never acknowledged is sent again with the same op id: the node answers a
// repeat it already applied with the first outcome instead of applying it again.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const esc = Crdt.esc;
  const runId = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop() || "");
  const outboxKey = "crdt-outbox-" + runId;
  let outbox = [];
  try {
    outbox = JSON.parse(tabStore.getItem(outboxKey) || "[]");
    if (!Array.isArray(outbox)) outbox = [];
  } catch {
    outbox = [];
  }
  // Ops sent on this connection and not yet answered; at most WINDOW at once.
  const WINDOW = 32;
  const TEMPORARY = new Set(["busy", "unavailable", "internal"]);
  let sent = new Set();
  // Acknowledged ops stay listed until a STATE shows them (lamport ≥ the ack's).
  let saved = [];
  let ws = null;
  let joined = false;
  let retries = 0;
  let retryTimer = null;
  let lastState = null;
  let region = "";
  // The point of history shown instead of now (its heads, comma-separated), if any.
  let point = null;
  let history = [];
  let historyHeads = null;
  let historyLoading = false;
  let historyRead = 0;
  let gone = false;
  // The history is read again at most this often: a busy run's changes come many a second,
  // and a long history costs its node a sort of every change after each.
  const HISTORY_EVERY_MS = 1000;

  $("run-id").textContent = runId;
  document.title = `Run ${runId.slice(0, 8)} · crdt-node`;
  if (!Crdt.user()) Crdt.setUser("guest-" + Math.random().toString(36).slice(2, 6));
  $("user").value = Crdt.user();

  function setConn(state, text) {
    $("conn").dataset.state = state;
    $("conn").textContent = text;
    renderPending();
  }

  function saveOutbox() {
    try {
      tabStore.setItem(outboxKey, JSON.stringify(outbox));
    } catch {
      // Storage full or disabled: the outbox still lives in this page.
    }
    renderPending();
  }

  function connect() {
    clearTimeout(retryTimer);
    joined = false;
    sent = new Set();
    setConn(retries ? "reconnecting" : "connecting", retries ? "reconnecting…" : "connecting…");
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    ws = new WebSocket(`${scheme}://${location.host}/ws/runs/${encodeURIComponent(runId)}`);
    ws.onopen = () => {
      const join = { type: "JOIN", user: Crdt.user() };
      if (Crdt.token()) join.token = Crdt.token();
      ws.send(JSON.stringify(join));
    };
    ws.onmessage = (ev) => {
      let msg;
      try { msg = JSON.parse(ev.data); } catch { return; }
      handle(msg);
    };
    ws.onclose = (ev) => {
      joined = false;
      ws = null;
      if (ev.code === 4410) {
        showGone(ev.reason);
        return;
      }
      if (ev.code === 4001) {
        setConn("refused", `refused: ${ev.reason || "a token is needed"}`);
        Crdt.askToken($("notice"), () => { retries = 0; connect(); });
        return;
      }
      // Back off: 0.5 s doubling to 10 s, with jitter so a node's returning crowd spreads out.
      const base = Math.min(10000, 500 * 2 ** Math.min(retries, 5));
      const delay = base / 2 + Math.random() * base / 2;
      retries += 1;
      const why = ev.reason ? ` (${ev.reason})` : "";
      setConn("reconnecting", `reconnecting in ${(delay / 1000).toFixed(1)} s${why}`);
      retryTimer = setTimeout(connect, delay);
    };
  }

  function handle(msg) {
    switch (msg.type) {
      case "WELCOME":
        joined = true;
        askForTokenBefore(Crdt.claims(Crdt.token())?.exp);
        retries = 0;
        $("region").textContent = msg.region;
        region = msg.region;
        // A user token names the user: the page says who it acts as.
        if (msg.user !== Crdt.user()) { Crdt.setUser(msg.user); $("user").value = msg.user; }
        if (Crdt.token().split(".").length === 3) {
          $("user").readOnly = true;
          $("user").title = "your sign-in token names you";
        }
        setConn("connected", `connected to ${msg.region}`);
        $("delete-run").hidden = !canWrite();
        flush();
        break;
      case "STATE":
        lastState = msg.state;
        saved = saved.filter((s) => s.lamport > msg.state.lamport);
        if (!point) render(msg.state);
        renderPending();
        refreshHistory();
        break;
      case "TOKEN_ACCEPTED":
        askForTokenBefore(msg.expires);
        break;
      case "PRESENCE":
        $("present").innerHTML = msg.users.map((u) =>
          `<span class="pill" title="${esc(u.sessions)} session(s)">${esc(u.user)} · ${esc(u.region)}</span>`).join("");
        break;
      case "ACK": {
        const op = outbox.find((o) => o.opId === msg.opId);
        if (op && msg.changed && !(lastState && lastState.lamport >= msg.lamport)) {
          saved.push({ ...op, lamport: msg.lamport });
        }
        outbox = outbox.filter((o) => o.opId !== msg.opId);
        sent.delete(msg.opId);
        saveOutbox();
        flush();
        break;
      }
      case "ERROR":
        if (msg.opId && TEMPORARY.has(msg.error)) {
          // Kept: tried again shortly.
          sent.delete(msg.opId);
          setTimeout(flush, 1000);
        } else if (msg.opId) {
          outbox = outbox.filter((o) => o.opId !== msg.opId);
          sent.delete(msg.opId);
          saveOutbox();
          flush();
        }
        $("notice").textContent = `Refused: ${msg.message}`;
        break;
    }
  }

  // Token renewal: the app that embeds (an iframe's parent) or opened this page hands it a
  // fresh user token with postMessage({type: "crdt-token", token}); the page keeps it for this
  // tab and renews the live session in band (TOKEN), so the session outlives its first token.
  // A token for another user is ignored (the node would refuse it too). Before the current
  // token expires, the page asks: postMessage({type: "crdt-token-needed", runId, expires}).
  let askTimer = null;
  function askForTokenBefore(expires) {
    clearTimeout(askTimer);
    const embedder = Crdt.embedder();
    if (!expires || !embedder) return;
    const left = expires * 1000 - Date.now();
    const ask = () => embedder.postMessage({ type: "crdt-token-needed", runId, expires }, "*");
    askTimer = setTimeout(ask, Math.max(0, Math.min(left - 60000, left / 2)));
  }

  window.addEventListener("message", (ev) => {
    const data = ev.data;
    if (!data || data.type !== "crdt-token" || typeof data.token !== "string") return;
    if (!ev.source || ev.source !== Crdt.embedder()) return;
    const fresh = Crdt.claims(data.token);
    const current = Crdt.claims(Crdt.token());
    if (!fresh || (current && current.sub !== fresh.sub)) return;
    Crdt.setToken(data.token);
    if (ws && joined) ws.send(JSON.stringify({ type: "TOKEN", token: data.token }));
  });

  // Sends outbox entries not yet sent on this connection, keeping at most WINDOW unanswered.
  function flush() {
    if (!joined || !ws) return;
    for (const op of outbox) {
      if (sent.size >= WINDOW) break;
      if (sent.has(op.opId)) continue;
      sent.add(op.opId);
      ws.send(JSON.stringify({ type: "MUTATE", ...op }));
    }
  }

  function submit(op) {
    outbox.push({ opId: Crdt.uuid(), ...op });
    saveOutbox();
    flush();
  }

  function describe(o) {
    switch (o.op) {
      case "GRAFT": return `graft ${o.agent} after ${o.afterStep}`;
      case "PRUNE": return `prune ${o.stepId}`;
      case "UNPRUNE": return `unprune ${o.stepId}`;
      case "SET_FLAG": return `set ${o.key} = ${JSON.stringify(o.value)}`;
      case "DELETE_FLAG": return `delete flag ${o.key}`;
      default: return o.op;
    }
  }

  function renderPending() {
    const items = outbox.map((o) => `<li>${esc(describe(o))}${joined ? "" : " (offline: sent on reconnect)"}</li>`)
      .concat(saved.map((o) => `<li class="saved">${esc(describe(o))} (saved)</li>`));
    $("pending").innerHTML = items.length ? items.join("") : "<li>nothing</li>";
  }

  // The run was deleted: the page says so and stops reconnecting.
  function showGone(reason) {
    gone = true;
    setConn("deleted", "deleted");
    $("gone").hidden = false;
    $("gone").textContent = `This run was deleted${reason ? `: ${reason}` : "."}`;
    $("present").innerHTML = "";
    document.querySelector("main").classList.add("viewing");
    $("delete-run").hidden = true;
  }

  // The history, read again when the run's heads move (a change from another region may take
  // its place among earlier entries: the order is causal, not arrival).
  async function refreshHistory() {
    const heads = lastState ? lastState.heads.join(",") : "";
    if (historyLoading || heads === historyHeads) return;
    const wait = historyRead + HISTORY_EVERY_MS - Date.now();
    if (wait > 0) {
      historyLoading = true;
      setTimeout(() => { historyLoading = false; refreshHistory(); }, wait);
      return;
    }
    historyRead = Date.now();
    historyLoading = true;
    try {
      const { entries, more } = await Timeline.load(runId);
      history = entries;
      historyHeads = heads;
      $("history-count").textContent = `(${entries.length}${more ? "+" : ""})`;
      Timeline.render($("timeline"), history, region, point);
    } catch (e) {
      if (e.status === 410) showGone(e.message);
    } finally {
      historyLoading = false;
    }
    // Moved again while it was read.
    if (lastState && lastState.heads.join(",") !== historyHeads) setTimeout(refreshHistory, 200);
  }

  const canWrite = () => Crdt.claims(Crdt.token())?.role !== "read";

  // Shows the run as it was at `heads` (an entry of the timeline), read-only.
  async function openPoint(heads) {
    const entry = history.find((e) => e.heads.join(",") === heads);
    try {
      const then = await Crdt.api(`/api/crdt/runs/${encodeURIComponent(runId)}/state?at=${encodeURIComponent(heads)}`);
      point = heads;
      document.querySelector("main").classList.add("viewing");
      $("point-banner").hidden = false;
      $("revert-here").hidden = !canWrite();
      $("point-what").innerHTML = entry
        ? `${esc(entry.user || "someone")} ${Timeline.what(entry)} (${esc(new Date(entry.time).toLocaleString())})`
        : esc(heads);
      $("picture-caption").textContent = "then";
      render(then);
      Timeline.render($("timeline"), history, region, point);
    } catch (e) {
      $("notice").textContent = `That point cannot be shown: ${e.message}`;
    }
  }

  function backToNow() {
    point = null;
    if (!gone) document.querySelector("main").classList.remove("viewing");
    $("point-banner").hidden = true;
    $("picture-caption").textContent = "now";
    if (lastState) render(lastState);
    Timeline.render($("timeline"), history, region, point);
  }

  async function revertHere() {
    if (!point) return;
    const to = point.split(",");
    try {
      await Crdt.api(`/api/crdt/runs/${encodeURIComponent(runId)}/revert`, "POST", { to, user: Crdt.user() });
      $("notice").textContent = "";
      backToNow();
    } catch (e) {
      $("notice").textContent = `Revert refused: ${e.message}`;
    }
  }

  function render(s) {
    Picture.render($("picture"), s);
    $("graft-count").textContent = `(${s.grafts.length})`;
    $("grafts").innerHTML = s.grafts.map((g, i) => `<tr data-graft="${esc(g.id)}">
        <td class="hide-narrow">${i + 1}</td><td>${esc(g.agent)}</td><td>${esc(g.afterStep)}</td><td>${esc(g.user)}</td>
        <td>${esc(g.region)}</td><td>${esc(g.lamport)}</td></tr>`).join("")
      || `<tr><td colspan="6" class="muted">No grafts yet.</td></tr>`;
    $("pruned").innerHTML = s.prunedSteps.map((p) => `<tr data-step="${esc(p.stepId)}">
        <td>${esc(p.stepId)}</td><td>${esc(p.user)} · ${esc(p.region)}</td>
        <td><button class="small plain live-only" data-unprune="${esc(p.stepId)}">unprune</button></td></tr>`).join("")
      || `<tr><td colspan="3" class="muted">None.</td></tr>`;
    const conflicts = s.flagConflicts || {};
    $("flags").innerHTML = Object.entries(s.flags).map(([k, v]) => {
      const c = conflicts[k];
      const note = c ? `<div class="conflict" data-conflict="${esc(k)}">set concurrently to
          ${c.map((x) => `<code>${esc(JSON.stringify(x))}</code>`).join(", ")}; kept
          <code>${esc(JSON.stringify(v))}</code></div>` : "";
      return `<tr data-flag="${esc(k)}"><td>${esc(k)}</td><td><code>${esc(JSON.stringify(v))}</code>${note}</td>
        <td><button class="small plain live-only" data-delete-flag="${esc(k)}">delete</button></td></tr>`;
    }).join("") || `<tr><td colspan="3" class="muted">None.</td></tr>`;
    $("lamport").textContent = s.lamport;
    $("heads").textContent = s.heads.map((h) => h.slice(0, 8)).join(" ");
    if (s.schemaErrors && s.schemaErrors.length) {
      $("notice").textContent = "Parts of this run do not fit the run schema: " + s.schemaErrors.join("; ");
    }
  }

  $("graft-form").addEventListener("submit", (e) => {
    e.preventDefault();
    submit({ op: "GRAFT", id: Crdt.uuid(), agent: $("agent").value.trim(), afterStep: $("after-step").value.trim() });
    $("agent").value = "";
  });
  $("prune-form").addEventListener("submit", (e) => {
    e.preventDefault();
    submit({ op: "PRUNE", stepId: $("step-id").value.trim() });
    $("step-id").value = "";
  });
  $("flag-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const raw = $("flag-value").value.trim();
    let value;
    try { value = JSON.parse(raw); } catch { value = raw; }
    submit({ op: "SET_FLAG", key: $("flag-key").value.trim(), value });
    $("flag-value").value = "";
  });
  $("timeline").addEventListener("click", (e) => {
    const li = e.target.closest("li.entry");
    if (li) openPoint(li.dataset.heads);
  });
  $("back-live").addEventListener("click", backToNow);
  // Deleting asks first; the node then closes this session (4410) and the page says so.
  $("delete-run").addEventListener("click", async () => {
    if (!confirm("Delete this run in every region? The service can restore it for a while.")) return;
    const by = encodeURIComponent(Crdt.user());
    try {
      await Crdt.api(`/api/crdt/runs/${encodeURIComponent(runId)}?user=${by}`, "DELETE");
    } catch (e) {
      $("notice").textContent = `Delete refused: ${e.message}`;
    }
  });
  $("revert-here").addEventListener("click", revertHere);
  document.body.addEventListener("click", (e) => {
    const t = e.target;
    if (t.dataset.unprune) submit({ op: "UNPRUNE", stepId: t.dataset.unprune });
    if (t.dataset.deleteFlag) submit({ op: "DELETE_FLAG", key: t.dataset.deleteFlag });
  });
  $("who").addEventListener("submit", (e) => {
    e.preventDefault();
    const name = $("user").value.trim();
    if (!name || name === Crdt.user()) return;
    Crdt.setUser(name);
    // Presence follows the session's user: rejoin under the new name.
    if (ws) ws.close(1000, "renamed");
  });
  window.addEventListener("online", () => { if (!ws && !gone) { retries = 0; connect(); } });

  renderPending();
  connect();
})();
