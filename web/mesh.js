// The mesh status page for operators: polls /api/crdt/mesh/status.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const esc = Crdt.esc;

  function render(s) {
    $("me").textContent = `${s.nodeId} · ${s.region}`;
    const total = new Set(s.peers.map((p) => p.url || p.remoteAddr)).size;
    $("summary").textContent = `${s.connectedPeers} peer node(s) connected`;
    $("summary").dataset.state = s.connectedPeers > 0 || total === 0 ? "connected" : "offline";
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    $("peers").innerHTML = s.peers.map((p) => `<tr>
        <td><div>${esc(p.region || "?")} <span class="muted mono">${esc(p.nodeId || "")}</span></div>
            <div class="muted mono">${esc(p.url || p.remoteAddr || "")} (${esc(p.direction)})</div>
            ${p.lastError ? `<div class="error">${esc(p.lastError)}</div>` : ""}</td>
        <td class="conn" data-state="${p.connected ? "connected" : "offline"}">${p.connected ? "connected" : "down"}</td>
        <td class="hide-narrow">${p.lastSeen ? esc(Crdt.ago(p.lastSeen)) : "—"}</td>
        <td>${p.rttMs != null ? esc(p.rttMs.toFixed(1)) + " ms" : "—"}</td>
        <td class="hide-narrow">${esc(p.reconnects)}</td>
        <td class="hide-narrow">${esc(p.messagesIn)} / ${esc(p.messagesOut)}</td></tr>`).join("")
      || `<tr><td colspan="6" class="muted">No peers configured.</td></tr>`;
    $("conflicts").innerHTML = s.regionConflicts.length
      ? `<h2>Region conflicts</h2>` + s.regionConflicts.map((c) =>
          `<p class="error">Region ${esc(c.region)} is claimed by ${c.nodeIds.map(esc).join(", ")}</p>`).join("")
      : "";
    const regs = Object.entries(s.registrations);
    $("registrations").innerHTML = regs.map(([run, regions]) =>
      `<tr><td><a class="mono" href="/runs/${esc(run)}">${esc(run)}</a></td>
       <td>${regions.map((r) => `<span class="pill">${esc(r)}</span>`).join("")}</td></tr>`).join("")
      || `<tr><td colspan="2" class="muted">None.</td></tr>`;
  }

  async function poll() {
    try {
      render(await Crdt.api("/api/crdt/mesh/status"));
      $("notice").textContent = "";
    } catch (e) {
      if (e.status === 401) return Crdt.askToken($("notice"), poll);
      $("summary").dataset.state = "offline";
      $("summary").textContent = "Node unreachable: " + e.message;
    }
    setTimeout(poll, 2000);
  }
  poll();
})();
