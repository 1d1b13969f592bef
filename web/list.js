// The runs list: newest activity first, a page at a time.
"use strict";

(() => {
  const tbody = document.getElementById("runs");
  const more = document.getElementById("more");
  const notice = document.getElementById("notice");
  let cursor = null;
  let first = true;

  async function load() {
    if (more.disabled) return;
    more.disabled = true;
    const q = cursor ? `?limit=25&cursor=${encodeURIComponent(cursor)}` : "?limit=25";
    try {
      const page = await Crdt.api("/api/crdt/runs" + q);
      if (first) tbody.innerHTML = "";
      first = false;
      for (const r of page.runs) {
        const tr = document.createElement("tr");
        tr.innerHTML = `<td><a class="mono" href="/runs/${Crdt.esc(r.runId)}">${Crdt.esc(r.runId)}</a></td>
          <td title="${Crdt.esc(r.lastActivity)}">${Crdt.esc(Crdt.ago(r.lastActivity))}</td>
          <td class="hide-narrow">${r.viewers ? Crdt.esc(r.viewers) : ""}</td>`;
        tbody.appendChild(tr);
      }
      if (!tbody.children.length) {
        tbody.innerHTML = `<tr><td colspan="3" class="muted">No runs yet: create one.</td></tr>`;
      }
      cursor = page.nextCursor;
      more.hidden = !cursor;
    } catch (e) {
      if (e.status === 401) Crdt.askToken(notice, load);
      else notice.textContent = "Could not load the runs: " + e.message;
    } finally {
      more.disabled = false;
    }
  }

  document.getElementById("open").addEventListener("submit", (e) => {
    e.preventDefault();
    const id = document.getElementById("run-id").value.trim();
    if (!/^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$/i.test(id)) {
      notice.textContent = "A run id is a UUID, like 123e4567-e89b-12d3-a456-426614174000.";
      return;
    }
    location.href = "/runs/" + id.toLowerCase();
  });
  document.getElementById("new-run").addEventListener("click", () => {
    location.href = "/runs/" + Crdt.uuid();
  });
  more.addEventListener("click", load);
  load();
})();
