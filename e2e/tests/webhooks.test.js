// Issue 21's webhooks against a real receiver that verifies each request with the Standard
// Webhooks package (`standardwebhooks` from npm), not with crdt-node's own code: a delivery
// that meets three 503s and a reset connection, with the node killed (SIGKILL) and restarted
// while its retry is pending, arrives once, under one webhook-id; a delivery the endpoint
// refuses is dead-lettered, listed, and delivered when replayed.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import http from "node:http";
import { randomUUID } from "node:crypto";
import { Webhook } from "standardwebhooks";
import { Node, until } from "../lib/cluster.js";

let node, receiver;
const seen = []; // every request: { id, status, verified, body }
let script = []; // what to answer the next requests: a status, or "reset"
let fallback = 204;
let secret = null;

before(async () => {
  receiver = http.createServer((req, res) => {
    let body = "";
    req.on("data", (c) => (body += c));
    req.on("end", () => {
      const answer = script.length ? script.shift() : fallback;
      let verified = false;
      try {
        new Webhook(secret).verify(body, req.headers);
        verified = true;
      } catch (e) {
        verified = String(e);
      }
      seen.push({ id: req.headers["webhook-id"], path: req.url, answer, verified, body: JSON.parse(body) });
      if (answer === "reset") return req.socket.destroy();
      res.writeHead(answer).end();
    });
  });
  await new Promise((r) => receiver.listen(0, "127.0.0.1", r));
  node = new Node("hooks", "us-east-1", {
    CRDT_WEBHOOK_BACKOFF_MIN_MS: "300",
    CRDT_WEBHOOK_BACKOFF_MAX_MS: "1200",
    CRDT_WEBHOOK_TIMEOUT_MS: "2000",
    CRDT_WEBHOOK_MAX_ATTEMPTS: "8",
    // The receiver is on this machine: a local address is reached only when listed.
    CRDT_WEBHOOK_ALLOWED_HOSTS: "127.0.0.1",
  });
  await node.start();
});

after(async () => {
  await node.stop();
  node.cleanup();
  receiver.close();
});

const hook = (path) => `http://127.0.0.1:${receiver.address().port}${path}`;

async function subscribe(path, extra = {}) {
  const { status, body } = await node.api("/api/crdt/webhooks", {
    method: "POST",
    body: JSON.stringify({ url: hook(path), ...extra }),
  });
  assert.equal(status, 201, JSON.stringify(body));
  assert.match(body.secret, /^whsec_/);
  secret = body.secret;
  return body;
}

test("a delivery survives 503s, a reset connection and a killed node, and arrives once", async () => {
  const sub = await subscribe("/retry");
  script = [503, 503, 503, "reset"];
  const run = randomUUID();
  const graft = await node.api(`/api/crdt/runs/${run}/grafts`, {
    method: "POST",
    body: JSON.stringify({ agent: "Reviewer", afterStep: "s1", user: "ann" }),
  });
  assert.equal(graft.status, 201);
  // Two refusals in, the node dies with the retry pending in its outbox, and comes back.
  await until("two attempts", async () => seen.filter((s) => s.path === "/retry").length >= 2);
  await node.kill();
  await node.start();
  await until("delivered", async () => seen.some((s) => s.path === "/retry" && s.answer === 204), 30000);
  const attempts = seen.filter((s) => s.path === "/retry");
  assert.deepEqual(attempts.map((a) => a.answer), [503, 503, 503, "reset", 204]);
  assert.equal(new Set(attempts.map((a) => a.id)).size, 1, "one webhook-id for every attempt");
  assert.ok(attempts.every((a) => a.verified === true), JSON.stringify(attempts.map((a) => a.verified)));
  const delivered = attempts.at(-1).body;
  assert.equal(delivered.type, "run.graft");
  assert.equal(delivered.data.runId, run);
  assert.equal(delivered.data.kind, "graft");
  assert.equal(delivered.data.content.graft.agent, "Reviewer");
  assert.equal(delivered.data.user, "ann");
  // Nothing more comes: delivered once.
  await new Promise((r) => setTimeout(r, 1500));
  assert.equal(seen.filter((s) => s.path === "/retry").length, 5);
  assert.equal((await fetch(`${node.url}/api/crdt/webhooks/${sub.id}`, { method: "DELETE" })).status, 204);
});

test("a refused delivery is dead-lettered, listed, and replays", async () => {
  const sub = await subscribe("/dead", { kinds: ["setFlag"] });
  fallback = 400;
  const run = randomUUID();
  const put = await node.api(`/api/crdt/runs/${run}/flags/mode`, {
    method: "PUT",
    body: JSON.stringify({ value: "fast", user: "bo" }),
  });
  assert.equal(put.status, 200);
  // A graft is not among the kinds it asked for.
  await node.api(`/api/crdt/runs/${run}/grafts`, {
    method: "POST",
    body: JSON.stringify({ agent: "X", afterStep: "s1", user: "bo" }),
  });
  const dead = async () => (await fetch(`${node.url}/api/crdt/webhooks/${sub.id}/dead-letters`).then((r) => r.json())).deadLetters;
  await until("dead-lettered", async () => (await dead()).length === 1);
  const [letter] = await dead();
  assert.equal(letter.lastError, "HTTP 400");
  assert.equal(letter.event.kind, "setFlag");
  assert.equal(letter.event.content.value, "fast");
  fallback = 200;
  const replay = await node.api(`/api/crdt/webhooks/${sub.id}/dead-letters/replay`, { method: "POST", body: "{}" });
  assert.deepEqual(replay.body, { replayed: 1 });
  await until("replayed", async () => seen.some((s) => s.path === "/dead" && s.answer === 200));
  assert.equal((await dead()).length, 0);
  const got = seen.filter((s) => s.path === "/dead");
  assert.ok(got.every((s) => s.body.type === "run.setFlag"), "only the kinds subscribed to");
  assert.equal(new Set(got.map((s) => s.id)).size, 1);
});

test("webhook URLs are checked", async () => {
  for (const url of ["ftp://example.com/x", "not a url", "http://user:pw@example.com/"]) {
    const { status, body } = await node.api("/api/crdt/webhooks", { method: "POST", body: JSON.stringify({ url }) });
    assert.equal(status, 400, url);
    assert.match(body.message, /url/);
  }
  const { status } = await node.api("/api/crdt/webhooks", {
    method: "POST",
    body: JSON.stringify({ url: hook("/x"), kinds: ["nope"] }),
  });
  assert.equal(status, 400);
});

test("410 Gone ends a subscription", async () => {
  const sub = await subscribe("/gone");
  fallback = 410;
  const run = randomUUID();
  await node.api(`/api/crdt/runs/${run}/flags/k`, { method: "PUT", body: JSON.stringify({ value: 1, user: "cy" }) });
  await until("ended", async () => (await node.api(`/api/crdt/webhooks/${sub.id}`)).status === 404);
  fallback = 204;
});
