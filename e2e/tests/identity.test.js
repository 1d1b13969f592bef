// Issue 19 too: the page keeps nothing about the user beyond the tab, and an app that embeds
// it renews its token in band (postMessage), so a session outlives its first token.
// Issue 14 in a real browser: a user token handed to the page once (`#token=…`) is kept in
// the tab's sessionStorage and out of the address bar; the page acts as the token's user, and
// a read-only token's edits are refused with the reason on the page.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import path from "node:path";
import { createHmac, randomUUID } from "node:crypto";
import { chromium } from "playwright-core";
import { Node, until, repo } from "../lib/cluster.js";

const SECRET = "e2e-user-token-secret";
const SERVICE = "e2e-service-token";
let node, browser;

const b64url = (v) => Buffer.from(typeof v === "string" ? v : JSON.stringify(v)).toString("base64url");

/** An HS256 user token, as an identity provider would issue it. */
function token(sub, runs, role, lifetime = 600) {
  const head = b64url({ alg: "HS256", typ: "JWT" });
  const body = b64url({ sub, runs, role, exp: Math.floor(Date.now() / 1000) + lifetime });
  const sig = createHmac("sha256", SECRET).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

async function openWithToken(run, jwt) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 900 } });
  // A name typed earlier in this browser must not become the user: the token names it.
  await context.addInitScript(() => localStorage.setItem("crdt-user", "typed-name"));
  const page = await context.newPage();
  page.on("pageerror", (e) => console.error("page error:", e));
  await page.goto(`${node.url}/runs/${run}#token=${jwt}`);
  await until("the page joined", async () => (await page.getAttribute("#conn", "data-state")) === "connected");
  return page;
}

/** Grafts `agent` through the page's form and waits until the node stores it under `user`. */
async function graftOnPage(page, run, agent, user) {
  await page.fill("#agent", agent);
  await page.fill("#after-step", "Step1");
  await page.click("#graft-form button");
  await until(`${agent} stored under ${user}`, async () => {
    const { body } = await node.api(`/api/crdt/runs/${run}/state`, { headers: { Authorization: `Bearer ${SERVICE}` } });
    return body.grafts?.some((g) => g.agent === agent && g.user === user);
  });
}

before(async () => {
  node = new Node("e2e-identity", "us-east-1", {
    CRDT_API_TOKEN: SERVICE,
    CRDT_JWT_HS256_SECRET: SECRET,
  });
  await node.start();
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
  });
});

after(async () => {
  await browser?.close();
  await node?.stop();
  node?.cleanup();
});

test("a token handed to the page names its user and stays in this tab only", async () => {
  const run = randomUUID();
  const page = await openWithToken(run, token("ana", [run], "write"));
  assert.equal(new URL(page.url()).hash, "", "the token leaves the address bar");
  assert.ok(await page.evaluate(() => sessionStorage.getItem("crdt-token")), "kept for this tab");
  assert.equal(await page.evaluate(() => localStorage.getItem("crdt-token")), null, "not for every tab");
  assert.equal(await page.inputValue("#user"), "ana", "the page says who it acts as");
  await graftOnPage(page, run, "TokenAgent", "ana");
  await page.screenshot({ path: path.join(repo, "e2e/artifacts/identity-writer.png"), fullPage: true });
});

test("a read-only token's page shows the run and refuses edits with the reason", async () => {
  const run = randomUUID();
  const seeded = await node.api(`/api/crdt/runs/${run}/grafts`, {
    method: "POST",
    headers: { Authorization: `Bearer ${SERVICE}` },
    body: JSON.stringify({ agent: "Seed", afterStep: "S", user: "svc" }),
  });
  assert.equal(seeded.status, 201);
  const page = await openWithToken(run, token("vic", [run], "read"));
  await until("the state shown", async () => (await page.$$("#grafts tr[data-graft]")).length === 1);
  await page.fill("#flag-key", "mode");
  await page.fill("#flag-value", '"fast"');
  await page.click("#flag-form button");
  await until("the refusal shown", async () => (await page.textContent("#notice")).includes("read-only"));
  const { body } = await node.api(`/api/crdt/runs/${run}/state`, { headers: { Authorization: `Bearer ${SERVICE}` } });
  assert.deepEqual(body.flags, {}, "nothing written");
  assert.ok(await page.isHidden("#delete-run"), "a reader is not offered Delete run");
  await page.screenshot({ path: path.join(repo, "e2e/artifacts/identity-reader.png"), fullPage: true });
});

test("an embedded page renews its token from the app, and its session outlives the first one", async () => {
  const run = randomUUID();
  const context = await browser.newContext({ viewport: { width: 1100, height: 900 } });
  const app = await context.newPage();
  app.on("pageerror", (e) => console.error("page error:", e));
  // The embedding app: the run page in an iframe, and a record of what the page asks of it.
  // (Served from the node's origin, as an app behind the same host would embed it.)
  await app.goto(`${node.url}/`);
  await app.evaluate((src) => {
    document.body.innerHTML = `<iframe id="run" width="1050" height="850" src="${src}"></iframe>`;
    window.asked = [];
    addEventListener("message", (e) => { if (e.data && e.data.type === "crdt-token-needed") window.asked.push(e.data); });
  }, `${node.url}/runs/${run}#token=${token("ana", [run], "write", 8)}`);
  const page = await until("the run page framed", async () => app.frames().find((f) => f.url().includes("/runs/")));
  await until("the page joined", async () => (await page.getAttribute("#conn", "data-state")) === "connected");
  // Before the 8 s token expires, the page asks the app for a fresh one; the app hands it over.
  const asked = await until("the page asked for a token", async () => (await app.evaluate(() => window.asked))[0]);
  assert.equal(asked.runId, run);
  const handOver = (t) =>
    app.evaluate((t) => document.getElementById("run").contentWindow.postMessage({ type: "crdt-token", token: t }, "*"), t);
  const fresh = token("ana", [run], "write", 600);
  await handOver(fresh);
  // A token for someone else is not taken.
  await handOver(token("mallory", [run], "write", 600));
  // Past the first token's expiry the session is still the same one, and still writes as ana.
  await new Promise((r) => setTimeout(r, 9000));
  assert.equal(await page.getAttribute("#conn", "data-state"), "connected", await page.textContent("#conn"));
  await graftOnPage(page, run, "AfterRenewal", "ana");
  assert.equal(await page.evaluate(() => sessionStorage.getItem("crdt-token")), fresh, "the fresh token kept for this tab");
  // Nothing about the user outlives the tab.
  assert.equal(await page.evaluate(() => localStorage.length), 0, "localStorage holds nothing");
  await context.close();
});
