// Issue 19 with the real automerge-repo client: a user's own Automerge changes may graft and
// prune only under the user's name (the token's `sub`) and may not alter an existing entry; a
// change that does is refused whole (the connection closed 4403 with the reason), and nothing
// of it reaches the state, the log or the other region. The service credential may name users.
// And an app starts a run on its own: it mints a run id, finds its URL and writes.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createHmac, randomUUID } from "node:crypto";
import { Repo, stringifyAutomergeUrl } from "@automerge/automerge-repo";
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket";
import { meshedPair, until } from "../lib/cluster.js";

const SECRET = "e2e-authorship-secret";
const SERVICE = "e2e-authorship-service";
let east, west, link;
const repos = [];

const b64url = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");

/** An HS256 write token for `sub` on `run`, as an identity provider would issue it. */
function token(sub, run) {
  const head = b64url({ alg: "HS256", typ: "JWT" });
  const body = b64url({ sub, runs: [run], role: "write", exp: Math.floor(Date.now() / 1000) + 600 });
  const sig = createHmac("sha256", SECRET).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

function client(node, credential) {
  const url = `ws://127.0.0.1:${node.port}/ws/automerge?token=${credential}`;
  // A long retry: a refused client is not to come back within the test.
  const repo = new Repo({ network: [new WebSocketClientAdapter(url, 60000)] });
  repos.push(repo);
  return repo;
}

const auth = { authorization: `Bearer ${SERVICE}` };
const api = (node, p, init = {}) => node.api(p, { ...init, headers: { ...auth, ...(init.headers || {}) } });
const state = async (node, run) => (await api(node, `/api/crdt/runs/${run}/state`)).body;

async function httpGraft(node, run, agent, user) {
  const res = await api(node, `/api/crdt/runs/${run}/grafts`, {
    method: "POST",
    body: JSON.stringify({ agent, afterStep: "S1", user }),
  });
  assert.equal(res.status, 201, JSON.stringify(res.body));
}

const graftBy = (user, agent) => ({
  id: randomUUID(), agent, afterStep: "S1", user, region: "browser", lamport: 100, createdAt: Date.now(),
});

before(async () => {
  const env = { CRDT_API_TOKEN: SERVICE, CRDT_JWT_HS256_SECRET: SECRET };
  ({ west, east, link } = await meshedPair(["auth-eu", "auth-us"], env, auth));
});

after(async () => {
  for (const r of repos) await r.shutdown().catch(() => {});
  link?.close();
  for (const n of [east, west]) {
    await n?.stop();
    n?.cleanup();
  }
  setTimeout(() => process.exit(), 1000).unref();
});

test("a user's client grafts and prunes under its own name, in both regions", async () => {
  const run = randomUUID();
  await httpGraft(east, run, "Seed", "bob");
  const handle = await client(east, token("ana", run)).find((await state(east, run)).automergeUrl);
  handle.change((d) => {
    d.grafts.push(graftBy("ana", "AnaAgent"));
    d.prunedSteps.S2 = { user: "ana", region: "browser", lamport: 101 };
  });
  for (const n of [east, west]) {
    await until(`${n.name} shows ana's graft and prune`, async () => {
      const st = await state(n, run);
      return st.grafts.some((g) => g.agent === "AnaAgent" && g.user === "ana")
        && st.prunedSteps.some((p) => p.stepId === "S2" && p.user === "ana");
    });
  }
});

const refusals = [
  ["a graft under another name", (d) => { d.grafts.push(graftBy("mallory", "Forged")); }],
  ["a rewrite of an existing graft's user", (d) => { d.grafts[0].user = "mallory"; }],
  ["a prune under another name", (d) => { d.prunedSteps.S3 = { user: "bob", region: "browser", lamport: 102 }; }],
];

for (const [what, edit] of refusals) {
  test(`${what} is refused whole, and nothing of it is kept anywhere`, async () => {
    const run = randomUUID();
    await httpGraft(east, run, "Seed", "bob");
    await until("the seed in the other region", async () => (await state(west, run)).grafts.length === 1);
    const before = await state(east, run);
    const seen = east.log.length;
    const handle = await client(east, token("ana", run)).find(before.automergeUrl);
    handle.change((d) => {
      d.flags.alongside = "in the same change";
      edit(d);
    });
    await until("the refusal logged", async () =>
      east.log.slice(seen).some((l) => /sync for .* refused: refused: /.test(l)));
    // A write after it reaches the other region: anything of the refused change would have too.
    await httpGraft(east, run, "After", "bob");
    for (const n of [east, west]) {
      await until(`${n.name} has the later graft`, async () => (await state(n, run)).grafts.length === 2);
      const st = await state(n, run);
      assert.deepEqual(st.grafts[0], before.grafts[0], `${n.name}: the seed graft is as it was`);
      assert.ok(!st.grafts.some((g) => g.user !== "bob"), `${n.name}: ${JSON.stringify(st.grafts)}`);
      assert.deepEqual(st.prunedSteps, [], n.name);
      assert.equal(st.flags.alongside, undefined, `${n.name}: the rest of the change is refused too`);
    }
    const changes = await api(east, `/api/crdt/runs/${run}/changes?heads=${before.heads.join(",")}`);
    assert.equal(changes.status, 200);
    assert.equal(changes.body.count, 1, "the log holds the seed and the later graft only");
  });
}

test("the service credential's client may graft naming a user", async () => {
  const run = randomUUID();
  await httpGraft(east, run, "Seed", "bob");
  const handle = await client(east, SERVICE).find((await state(east, run)).automergeUrl);
  handle.change((d) => { d.grafts.push(graftBy("carol", "ForCarol")); });
  await until("carol's graft stored", async () =>
    (await state(west, run)).grafts.some((g) => g.agent === "ForCarol" && g.user === "carol"));
});

test("an app mints a run id, finds its automerge: URL and writes: the run is created in both regions", async () => {
  const run = randomUUID();
  // The run's URL from its id alone: the UUID's 16 bytes are the document id.
  const url = stringifyAutomergeUrl({ documentId: new Uint8Array(Buffer.from(run.replace(/-/g, ""), "hex")) });
  const handle = await client(west, token("ana", run)).find(url);
  const doc = handle.doc();
  assert.deepEqual([...doc.grafts], [], "the run's genesis: nothing grafted yet");
  assert.equal((await state(east, run)).grafts.length, 0, "finding it wrote nothing");
  handle.change((d) => { d.grafts.push(graftBy("ana", "Started")); });
  for (const n of [west, east]) {
    await until(`${n.name} holds the new run`, async () =>
      (await state(n, run)).grafts.some((g) => g.agent === "Started" && g.user === "ana"));
  }
  assert.equal((await state(east, run)).automergeUrl, url, "the URL the app computed is the run's");
});
