// The run's history as a timeline: who did what, when, the other regions' changes marked.
// Entries come from GET /api/crdt/runs/{runId}/history (every region lists them alike); one
// opens the run as it was after it (GET .../state?at=heads), read-only.
"use strict";

const Timeline = (() => {
  const esc = (s) => Crdt.esc(s);
  // Entries the page reads at most (the API pages further).
  const MAX = 2000;

  function what(e) {
    const c = e.content || {};
    switch (e.kind) {
      case "graft": return `grafted <b>${esc(c.graft?.agent)}</b> after ${esc(c.graft?.afterStep)}`;
      case "prune": return `pruned <b>${esc(c.stepId)}</b>`;
      case "unprune": return `unpruned <b>${esc(c.stepId)}</b>`;
      case "setFlag": return `set <b>${esc(c.key)}</b> = <code>${esc(JSON.stringify(c.value))}</code>`;
      case "deleteFlag": return `deleted flag <b>${esc(c.key)}</b>`;
      case "revert": return `reverted the run to an earlier point`;
      case "checkpoint": return `checkpoint <b>${esc(c.label)}</b>`;
      case "legacy": return `legacy edit`;
      default: return `changed ${esc((c.touched || []).join(", ") || "the run")}`;
    }
  }

  // Every entry, oldest first, a page at a time.
  async function load(runId) {
    const base = `/api/crdt/runs/${encodeURIComponent(runId)}/history?limit=200`;
    let entries = [];
    let after = null;
    do {
      const page = await Crdt.api(after ? `${base}&after=${after}` : base);
      entries = entries.concat(page.entries);
      after = page.next;
    } while (after && entries.length < MAX);
    return { entries, more: Boolean(after) };
  }

  // Newest first; `region` is this node's (others' entries are marked), `open` the point shown.
  function render(el, entries, region, open) {
    el.innerHTML = entries.slice().reverse().map((e) => {
      const remote = e.region && e.region !== region;
      const when = e.time ? new Date(e.time).toLocaleTimeString() : "";
      const heads = e.heads.join(",");
      return `<li class="entry${remote ? " remote" : ""}${heads === open ? " open" : ""}" data-heads="${esc(heads)}"
          data-kind="${esc(e.kind)}" data-region="${esc(e.region || "")}">
        <time datetime="${esc(e.time || "")}">${esc(when)}</time>
        <span class="who">${esc(e.user || "someone")}</span> <span class="what">${what(e)}</span>
        ${remote ? `<span class="pill remote-region" title="made in another region">↔ ${esc(e.region)}</span>` : ""}
        ${e.legacy ? `<span class="pill">legacy</span>` : ""}</li>`;
    }).join("") || `<li class="muted">No changes yet.</li>`;
  }

  return { load, render, what };
})();
