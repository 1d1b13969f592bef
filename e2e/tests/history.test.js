// The run page's picture and history (issue 22): two regions, a page on each; the picture
// shows steps, grafts after them and pruned steps with who did each; the timeline lists both
// regions' changes (the other region's marked), opens any point read-only, and "revert to
// here" brings every region back to it. Then the run is deleted and its page says so.
// Screenshots go to e2e/artifacts/.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { closeAll, launch, openRun, shot } from "../lib/pages.js";
import { meshedPair, until } from "../lib/cluster.js";

const run = randomUUID();
let east, west, link, browser, pageUs, pageEu;

const open = (node, user) => openRun(browser, node, run, user, { width: 1200, height: 1000 });

const post = (node, rest, body) =>
  node.api(`/api/crdt/runs/${run}${rest}`, { method: "POST", body: JSON.stringify(body) });
const pictureAgents = (page) =>
  page.$$eval("#picture .agent b", (bs) => bs.map((b) => b.textContent));
const pictureSteps = (page) =>
  page.$$eval("#picture .step", (els) =>
    els.map((el) => `${el.dataset.stepNode}${el.classList.contains("pruned") ? " (pruned)" : ""}`));
const timeline = (page) =>
  page.$$eval("#timeline li.entry", (lis) =>
    lis.map((li) => ({ kind: li.dataset.kind, region: li.dataset.region, remote: li.classList.contains("remote"),
      text: `${li.querySelector(".who").textContent} ${li.querySelector(".what").textContent}` })));

before(async () => {
  ({ west, east, link } = await meshedPair(["hist-eu", "hist-us"]));
  browser = await launch();
  // Written in both regions, by people and by a service.
  assert.equal((await post(east, "/grafts", { agent: "SecurityAgent", afterStep: "Step1", user: "ana" })).status, 201);
  assert.equal((await post(west, "/grafts", { agent: "CostAgent", afterStep: "Step1", user: "bo" })).status, 201);
  assert.equal((await post(west, "/grafts", { agent: "ReviewAgent", afterStep: "Step2", user: "bo" })).status, 201);
  assert.equal((await post(west, "/grafts", { agent: "Planner", afterStep: "Step10", user: "svc" })).status, 201);
  assert.equal((await post(east, "/pruned-steps", { stepId: "Step2", user: "ana" })).status, 200);
  pageUs = await open(east, "ana");
  pageEu = await open(west, "bo");
});

after(() => closeAll(browser, link, [east, west]));

test("the picture shows the steps in order, the agents after them and who pruned what", async () => {
  for (const page of [pageUs, pageEu]) {
    await until("every graft drawn", async () => (await pictureAgents(page)).length === 4);
    assert.deepEqual(await pictureSteps(page), ["Step1", "Step2 (pruned)", "Step10"]);
    // Grafts after the same step side by side, in the run's order.
    const lane = await page.$$eval('#picture .lane[data-after="Step1"] .agent b', (bs) => bs.map((b) => b.textContent));
    assert.deepEqual(lane.slice().sort(), ["CostAgent", "SecurityAgent"]);
    const { body } = await east.api(`/api/crdt/runs/${run}/state`);
    assert.deepEqual(lane, body.grafts.filter((g) => g.afterStep === "Step1").map((g) => g.agent));
    const pruned = await page.textContent('#picture .step[data-step-node="Step2"]');
    assert.match(pruned, /pruned by ana · us-east-1/);
  }
  await shot(pageUs, "history-01-picture");
});

test("the timeline lists both regions' changes alike, the other region's marked", async () => {
  await until("five entries on both pages", async () =>
    (await timeline(pageUs)).length === 5 && (await timeline(pageEu)).length === 5);
  const us = await timeline(pageUs);
  const eu = await timeline(pageEu);
  const same = (list) => list.map(({ kind, region, text }) => ({ kind, region, text }));
  assert.deepEqual(same(us), same(eu));
  // On the us page the eu changes are marked as the other region's, and the other way round.
  for (const e of us) assert.equal(e.remote, e.region === "eu-central-1", JSON.stringify(e));
  for (const e of eu) assert.equal(e.remote, e.region === "us-east-1", JSON.stringify(e));
  assert.ok(us.some((e) => e.kind === "prune" && e.text.includes("ana")), JSON.stringify(us));
  assert.equal(await pageUs.locator("#timeline li.entry.remote").count(), 3);
  await shot(pageUs, "history-02-timeline");
});

test("a point of the timeline opens read-only; revert to here restores it in every region", async () => {
  // The oldest entry: the run after its first change (which one that is, of two concurrent
  // grafts, the causal order decides alike in every region).
  const first = pageUs.locator("#timeline li.entry").last();
  const heads = await first.getAttribute("data-heads");
  const { body: then } = await east.api(`/api/crdt/runs/${run}/state?at=${heads}`);
  const expected = then.grafts.map((g) => g.agent);
  assert.equal(expected.length, 1);
  await first.click();
  await until("the point shown", async () => !(await pageUs.isHidden("#point-banner")));
  assert.deepEqual(await pictureAgents(pageUs), expected);
  assert.deepEqual(await pictureSteps(pageUs), ["Step1"]);
  assert.ok(await pageUs.isHidden("#graft-form"), "read-only: no forms while a point is shown");
  await shot(pageUs, "history-03-point");

  // The live run moved on meanwhile; the picture stays at the point.
  assert.equal((await post(west, "/grafts", { agent: "LateAgent", afterStep: "Step3", user: "bo" })).status, 201);
  await until("late graft live on the eu page", async () => (await pictureAgents(pageEu)).includes("LateAgent"));
  assert.deepEqual(await pictureAgents(pageUs), expected);

  await pageUs.click("#revert-here");
  await until("back to now on the us page", async () => await pageUs.isHidden("#point-banner"));
  for (const page of [pageUs, pageEu]) {
    await until("reverted in both regions", async () =>
      JSON.stringify(await pictureAgents(page)) === JSON.stringify(expected));
    assert.deepEqual(await pictureSteps(page), ["Step1"]);
    await until("the revert in the timeline", async () =>
      (await timeline(page)).filter((e) => e.kind === "revert").length === 1);
  }
  for (const n of [east, west]) {
    const { body } = await n.api(`/api/crdt/runs/${run}/state`);
    assert.deepEqual(body.grafts.map((g) => g.agent), expected);
    assert.deepEqual(body.prunedSteps, []);
  }
  await shot(pageEu, "history-04-reverted");
});

test("a run deleted from its page is gone from every region's page", async () => {
  assert.ok(!(await pageUs.isHidden("#delete-run")), "a writer sees Delete run");
  pageUs.once("dialog", (d) => d.accept());
  await pageUs.click("#delete-run");
  const gone = await until("deleted in eu too", async () => {
    const r = await west.api(`/api/crdt/runs/${run}/state`);
    return r.status === 410 && r.body;
  });
  assert.match(gone.message, /deleted at .* by ana \(in us-east-1\)/);
  for (const page of [pageUs, pageEu]) {
    await until("the page says the run is gone", async () => !(await page.isHidden("#gone")));
    assert.match(await page.textContent("#gone"), /deleted/);
    assert.equal(await page.getAttribute("#conn", "data-state"), "deleted");
  }
  const list = await (await fetch(`${west.url}/api/crdt/runs`)).json();
  assert.ok(!list.runs.some((r) => r.runId === run));
  await shot(pageEu, "history-05-deleted");
});
