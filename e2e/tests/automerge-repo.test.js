// Real automerge-repo clients (@automerge/automerge-repo with its WebSocket adapter, as an
// application would use them) against two meshed crdt-node processes: a run opened by its
// automerge: URL, edits both ways between the client and the HTTP API, two clients on two
// regions, a client that edits offline, ephemeral messages, a change that breaks the run's
// schema, and the API token.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { Repo } from "@automerge/automerge-repo";
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket";
import { Proxy, meshedPair, until } from "../lib/cluster.js";

const TOKEN = "e2e-automerge-token";
let east, west, link;
const repos = [];

/** A client with no storage: everything it has comes from the node. */
function client(url, retryMs = 200) {
  const repo = new Repo({ network: [new WebSocketClientAdapter(url, retryMs)] });
  repos.push(repo);
  return repo;
}

const wsUrl = (node, port = node.port) => `ws://127.0.0.1:${port}/ws/automerge?token=${TOKEN}`;
const auth = { authorization: `Bearer ${TOKEN}` };
const api = (node, p, init = {}) => node.api(p, { ...init, headers: { ...auth, ...(init.headers || {}) } });
const state = async (node, run) => (await api(node, `/api/crdt/runs/${run}/state`)).body;

async function httpGraft(node, run, agent, user = "http") {
  const res = await api(node, `/api/crdt/runs/${run}/grafts`, {
    method: "POST",
    body: JSON.stringify({ agent, afterStep: "step-1", user }),
  });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  return res.body;
}

/** A graft as a client writes it: every field the run schema asks for, its own stamp. */
function clientGraft(doc, agent, user) {
  const lamport = Math.max(0, ...doc.grafts.map((g) => g.lamport)) + 1;
  doc.grafts.push({ id: randomUUID(), agent, afterStep: "step-1", user, region: "browser", lamport, createdAt: Date.now() });
}

/**
 * A door to a node that can go offline: closed, it drops every connection and refuses new
 * ones (ECONNREFUSED, which the JS adapter retries; a connection reset it would throw on).
 */
class Door extends Proxy {
  async shut() {
    this.cut();
    await new Promise((resolve) => this.server.close(resolve));
  }

  async reopen() {
    this.heal();
    await new Promise((resolve) => this.server.listen(this.port, "127.0.0.1", resolve));
  }
}

const agents = (doc) => doc.grafts.map((g) => String(g.agent)).sort();
const httpAgents = (st) => st.grafts.map((g) => g.agent).sort();

before(async () => {
  ({ west, east, link } = await meshedPair(["am-eu", "am-us"], { CRDT_API_TOKEN: TOKEN }, auth));
});

after(async () => {
  for (const r of repos) await r.shutdown().catch(() => {});
  link?.close();
  for (const n of [east, west]) {
    await n?.stop();
    n?.cleanup();
  }
  // The WebSocket adapter may still hold a reconnect timer after `shutdown()` (one scheduled by
  // a close before it), which would keep this file's process alive for ever: once everything
  // above is closed, end it (the exit code stays what the test runner set).
  setTimeout(() => process.exit(), 1000).unref();
});

test("a client finds a run by its URL; its grafts and flags show in the HTTP state", async () => {
  const run = randomUUID();
  await httpGraft(east, run, "seed");
  const st = await state(east, run);
  const { body: mapped } = await api(east, `/api/crdt/documents/${encodeURIComponent(st.automergeUrl)}`);
  assert.equal(mapped.runId, run);

  const repo = client(wsUrl(east));
  const handle = await repo.find(st.automergeUrl);
  assert.deepEqual(agents(handle.doc()), ["seed"]);
  handle.change((d) => {
    clientGraft(d, "planner", "ada");
    clientGraft(d, "critic", "ada");
    d.flags.reviewed = true;
    d.flags.budget = { tokens: 5000 };
  });
  const seen = await until("the client's edits in the HTTP state", async () => {
    const s = await state(east, run);
    return s.grafts.length === 3 && s.flags.reviewed === true ? s : null;
  });
  assert.deepEqual(httpAgents(seen), ["critic", "planner", "seed"]);
  assert.deepEqual(seen.flags.budget, { tokens: 5000 });
  assert.equal(seen.valid, true, JSON.stringify(seen.schemaErrors));
  // Every region gets them, over the mesh.
  await until("the edits in the other region", async () => (await state(west, run)).grafts.length === 3);
});

test("a graft made over HTTP in another region reaches the client's document live", async () => {
  const run = randomUUID();
  await httpGraft(east, run, "seed");
  const repo = client(wsUrl(east));
  const handle = await repo.find((await state(east, run)).automergeUrl);
  const arrived = new Promise((resolve) =>
    handle.on("change", ({ doc }) => agents(doc).includes("from-eu") && resolve(doc)));
  await until("the run in eu", async () => (await state(west, run)).grafts.length === 1);
  await httpGraft(west, run, "from-eu", "eve");
  const doc = await arrived;
  assert.deepEqual(agents(doc), ["from-eu", "seed"]);
  const g = doc.grafts.find((x) => String(x.agent) === "from-eu");
  assert.equal(String(g.region), "eu-central-1");
});

test("two clients on two regions editing at once converge", async () => {
  const run = randomUUID();
  await httpGraft(east, run, "seed");
  const url = (await state(east, run)).automergeUrl;
  await until("the run in eu", async () => (await state(west, run)).grafts.length === 1);
  const a = await client(wsUrl(east)).find(url);
  const b = await client(wsUrl(west)).find(url);
  for (let i = 0; i < 10; i++) {
    a.change((d) => { clientGraft(d, `us-${i}`, "ada"); d.flags.last = `us-${i}`; });
    b.change((d) => { clientGraft(d, `eu-${i}`, "eve"); d.flags.last = `eu-${i}`; });
  }
  await until("both clients hold all 21 grafts", async () =>
    a.doc().grafts.length === 21 && b.doc().grafts.length === 21);
  assert.deepEqual(agents(a.doc()), agents(b.doc()));
  // The same winner for the flag both set, everywhere.
  await until("the same flag on both clients", async () => String(a.doc().flags.last) === String(b.doc().flags.last));
  const [us, eu] = await until("both regions hold 21 grafts", async () => {
    const s = [await state(east, run), await state(west, run)];
    return s.every((x) => x.grafts.length === 21) ? s : null;
  });
  assert.deepEqual(us.grafts, eu.grafts, "one order in both regions");
  assert.equal(us.flags.last, eu.flags.last);
  assert.equal(us.flags.last, String(a.doc().flags.last));
});

test("a client that goes offline, edits, and reconnects converges", async () => {
  const run = randomUUID();
  await httpGraft(east, run, "seed");
  const url = (await state(east, run)).automergeUrl;
  const door = new Door(() => east.port);
  await door.listen();
  try {
    const handle = await client(wsUrl(east, door.port)).find(url);
    await door.shut();
    handle.change((d) => clientGraft(d, "written-offline", "ada"));
    await httpGraft(east, run, "written-meanwhile");
    await new Promise((r) => setTimeout(r, 500));
    assert.equal((await state(east, run)).grafts.length, 2, "the offline edit has not arrived");
    await door.reopen();
    await until("the client and the node converge", async () => {
      const s = await state(east, run);
      return s.grafts.length === 3 && handle.doc().grafts.length === 3;
    });
    assert.deepEqual(httpAgents(await state(east, run)), agents(handle.doc()));
  } finally {
    door.close();
  }
});

test("ephemeral messages reach the document's other clients", async () => {
  const run = randomUUID();
  await httpGraft(east, run, "seed");
  const url = (await state(east, run)).automergeUrl;
  const a = await client(wsUrl(east)).find(url);
  const b = await client(wsUrl(east)).find(url);
  const got = new Promise((resolve) => b.on("ephemeral-message", ({ message }) => resolve(message)));
  // Sent until b's room holds it (b's find may still be settling on the node).
  const timer = setInterval(() => a.broadcast({ cursor: 7, user: "ada" }), 100);
  try {
    assert.deepEqual(await got, { cursor: 7, user: "ada" });
  } finally {
    clearInterval(timer);
  }
});

test("a change that breaks the run's schema is stored, and the run reads as invalid", async () => {
  const run = randomUUID();
  await httpGraft(east, run, "seed");
  const handle = await client(wsUrl(east)).find((await state(east, run)).automergeUrl);
  handle.change((d) => { d.grafts = "not a list any more"; });
  const st = await until("the run reported invalid", async () => {
    const s = await state(east, run);
    return s.valid === false ? s : null;
  });
  assert.ok(st.schemaErrors.some((e) => e.includes("grafts")), JSON.stringify(st.schemaErrors));
  assert.ok(east.log.some((l) => l.includes("break the run schema")), "the node logs it");
  // Kept in the log: the other region gets it too.
  await until("the other region reads it as invalid", async () => (await state(west, run)).valid === false);
});

test("without the token a client is refused, and finds nothing", async () => {
  const run = randomUUID();
  await httpGraft(east, run, "seed");
  const url = (await state(east, run)).automergeUrl;
  const repo = client(`ws://127.0.0.1:${east.port}/ws/automerge`, 60000);
  await assert.rejects(repo.find(url), /unavailable/);
  await until("the refusal logged", async () => east.log.some((l) => l.includes("a token is required")));
});
