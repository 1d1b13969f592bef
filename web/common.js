// Shared helpers of the crdt-node pages: the token and the user's name (kept in this tab
// only), API calls and safe HTML.
"use strict";

// This tab's storage; in memory where the browser denies it (a page framed by another site
// with third-party storage blocked), so the page still works, for as long as it is open.
const tabStore = (() => {
  try {
    const s = window.sessionStorage;
    s.getItem("crdt-probe");
    return s;
  } catch {
    const m = new Map();
    return {
      getItem: (k) => (m.has(k) ? m.get(k) : null),
      setItem: (k, v) => m.set(k, String(v)),
      removeItem: (k) => m.delete(k),
    };
  }
})();

// A token handed to the page once, as `#token=…` in its URL (a link from whoever issues user
// tokens), is kept in this tab's sessionStorage and taken out of the address bar and history.
(() => {
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (!m) return;
  tabStore.setItem("crdt-token", decodeURIComponent(m[1]));
  history.replaceState(null, "", location.pathname + location.search);
})();

const Crdt = {
  token() { return tabStore.getItem("crdt-token") || ""; },
  setToken(t) { t ? tabStore.setItem("crdt-token", t) : tabStore.removeItem("crdt-token"); },
  // The name typed (or the token's user) is kept for this tab only, like the token.
  user() { return tabStore.getItem("crdt-user") || ""; },
  setUser(u) { tabStore.setItem("crdt-user", u); },

  // The claims of a user token (unverified: the node verifies; the page only reads them).
  claims(t) {
    try {
      return JSON.parse(atob(t.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
    } catch {
      return null;
    }
  },

  // The window that embeds or opened this page: where fresh tokens come from.
  embedder() {
    if (window.parent && window.parent !== window) return window.parent;
    return window.opener || null;
  },

  async api(path, method = "GET", payload = undefined) {
    const headers = {};
    if (Crdt.token()) headers.Authorization = "Bearer " + Crdt.token();
    const init = { method, headers };
    if (payload !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(payload);
    }
    const res = await fetch(path, init);
    const body = await res.json().catch(() => ({}));
    if (!res.ok) {
      const err = new Error(body.message || res.statusText);
      err.status = res.status;
      throw err;
    }
    return body;
  },

  esc(s) {
    return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  },

  // A random UUID without crypto.randomUUID, which plain-HTTP pages on a LAN do not have.
  uuid() {
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  },

  ago(iso) {
    const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    if (s < 60) return `${Math.round(s)} s ago`;
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    if (s < 86400) return `${Math.round(s / 3600)} h ago`;
    return new Date(iso).toLocaleString();
  },

  // The token form shown when the node answers 401.
  askToken(el, then) {
    el.innerHTML = `<form id="token-form"><span>This node needs a token (yours, or the API token).</span>
      <input id="token" type="password" placeholder="token" autocomplete="off">
      <button>Use token</button></form>`;
    el.querySelector("form").addEventListener("submit", (e) => {
      e.preventDefault();
      Crdt.setToken(el.querySelector("#token").value.trim());
      el.innerHTML = "";
      then();
    });
  },
};
