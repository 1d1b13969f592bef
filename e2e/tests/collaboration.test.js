// Two regions, one browser page on each, the same run: live grafts, concurrent edits during a
// partition, and a page whose node stops and comes back. Screenshots go to e2e/artifacts/.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { closeAll, launch, openRun, shot } from "../lib/pages.js";
import { meshedPair, until } from "../lib/cluster.js";

const run = randomUUID();
let east, west, link, browser, pageA, pageB;

const open = (node, user) => openRun(browser, node, run, user);

const connState = (page) => page.getAttribute("#conn", "data-state");
const graftAgents = (page) =>
  page.$$eval("#grafts tr[data-graft] td:nth-child(2)", (tds) => tds.map((td) => td.textContent));
const tableText = (page, id) => page.$eval(`#${id}`, (el) => el.innerText);

async function graft(page, agent, afterStep) {
  await page.fill("#agent", agent);
  await page.fill("#after-step", afterStep);
  await page.click("#graft-form button");
}

async function setFlag(page, key, value) {
  await page.fill("#flag-key", key);
  await page.fill("#flag-value", value);
  await page.click("#flag-form button");
}

const pendingCount = (page) =>
  page.$$eval("#pending li", (lis) =>
    lis.filter((li) => li.textContent !== "nothing" && !li.classList.contains("saved")).length);

before(async () => {
  ({ west, east, link } = await meshedPair(["e2e-eu", "e2e-us"]));
  browser = await launch();
  pageA = await open(east, "ana");
  pageB = await open(west, "bo");
});

after(() => closeAll(browser, link, [east, west]));

test("both pages connect, each to its region, and see each other", async () => {
  await until("page A connected", async () => (await connState(pageA)) === "connected");
  await until("page B connected", async () => (await connState(pageB)) === "connected");
  assert.equal(await pageA.textContent("#region"), "us-east-1");
  assert.equal(await pageB.textContent("#region"), "eu-central-1");
  for (const page of [pageA, pageB]) {
    await until("both users present", async () => {
      const text = await page.textContent("#present");
      return text.includes("ana · us-east-1") && text.includes("bo · eu-central-1");
    });
  }
  await shot(pageA, "01-connected-a");
});

test("a graft made on page A appears on page B", async () => {
  await graft(pageA, "SecurityAgent", "Step1");
  await until("graft on B", async () => (await graftAgents(pageB)).includes("SecurityAgent"));
  const row = await pageB.$eval("#grafts tr[data-graft]", (tr) => [...tr.children].map((td) => td.textContent));
  assert.deepEqual(row.slice(1, 5), ["SecurityAgent", "Step1", "ana", "us-east-1"]);
  // Durable: the HTTP API of region B shows it too.
  const { body } = await west.api(`/api/crdt/runs/${run}/state`);
  assert.deepEqual(body.grafts.map((g) => g.agent), ["SecurityAgent"]);
  await shot(pageB, "02-graft-arrived-b");
});

test("concurrent edits on both pages, made while the regions are cut apart, end identical", async () => {
  link.cut();
  for (const n of [east, west]) {
    await until(`${n.name} sees the cut`, async () => (await n.api("/api/crdt/mesh/status")).body.connectedPeers === 0);
  }
  await Promise.all([
    (async () => {
      await graft(pageA, "PerformanceAgent", "Step1");
      await setFlag(pageA, "mode", '"fast"');
      await pageA.fill("#step-id", "Step3");
      await pageA.click("#prune-form button");
    })(),
    (async () => {
      await graft(pageB, "CostAgent", "Step1");
      await setFlag(pageB, "mode", '"safe"');
      await setFlag(pageB, "retries", "3");
    })(),
  ]);
  for (const page of [pageA, pageB]) {
    await until("own edits acknowledged", async () => (await pendingCount(page)) === 0);
  }
  link.heal();
  await until("converged", async () => {
    const [a, b] = await Promise.all([pageA, pageB].map(graftAgents));
    return a.length === 3 && JSON.stringify(a) === JSON.stringify(b);
  });
  await until("flags and pruned steps converged", async () => {
    const same = async (id) => (await tableText(pageA, id)) === (await tableText(pageB, id));
    return (await same("flags")) && (await same("pruned")) && (await tableText(pageA, "flags")).includes("retries");
  });
  assert.equal(await tableText(pageA, "grafts"), await tableText(pageB, "grafts"));
  assert.equal(await pageA.textContent("#heads"), await pageB.textContent("#heads"));
  // Both regions set "mode" at once: both pages show the conflict and the same winner.
  for (const page of [pageA, pageB]) {
    const note = await page.textContent('[data-conflict="mode"]');
    assert.match(note, /"fast"/);
    assert.match(note, /"safe"/);
  }
  await shot(pageA, "03-converged-a");
  await shot(pageB, "03-converged-b");
});

test("a page whose node stops shows it is reconnecting, keeps edits, and recovers", async () => {
  await west.stop();
  await until("page B reconnecting", async () => (await connState(pageB)) === "reconnecting");
  await graft(pageB, "OfflineAgent", "Step2");
  assert.equal(await pendingCount(pageB), 1);
  assert.match(await pageB.textContent("#pending"), /offline/);
  await shot(pageB, "04-reconnecting-b");
  await west.start();
  await until("page B connected again", async () => (await connState(pageB)) === "connected", 30000);
  await until("offline edit acknowledged", async () => (await pendingCount(pageB)) === 0);
  for (const page of [pageA, pageB]) {
    await until("offline graft everywhere", async () => (await graftAgents(page)).includes("OfflineAgent"), 30000);
  }
  assert.deepEqual(await graftAgents(pageA), await graftAgents(pageB));
  await shot(pageB, "05-recovered-b");
});

test("the runs list and the mesh page work", async () => {
  const page = await browser.newPage();
  await page.goto(`${east.url}/`);
  await until("run listed", async () => (await page.textContent("#runs")).includes(run));
  await shot(page, "06-runs-list");
  await page.goto(`${east.url}/mesh`);
  await until("mesh page shows the peer", async () => (await page.textContent("#peers")).includes("eu-central-1"));
  await shot(page, "07-mesh-status");
  await page.close();
  // And the run page at a phone's size: everything reachable in one column.
  const phone = await browser.newPage({ viewport: { width: 390, height: 844 } });
  await phone.goto(`${west.url}/runs/${run}`);
  await until("phone page connected", async () => (await connState(phone)) === "connected");
  await shot(phone, "08-run-on-a-phone");
  const overflow = await phone.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `the page scrolls sideways by ${overflow}px on a phone`);
  await phone.close();
});
