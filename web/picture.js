// The run as a picture people read at a glance: the steps the run refers to, in order, each
// followed by the agents grafted after it (grafts after the same step side by side, in the
// run's order), pruned steps struck through, and who did each.
"use strict";

const Picture = (() => {
  const esc = (s) => Crdt.esc(s);
  const byNumber = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });

  // Steps named by grafts and pruned steps, in their natural order (Step2 before Step10).
  function steps(state) {
    const names = new Set(state.grafts.map((g) => g.afterStep));
    for (const p of state.prunedSteps) names.add(p.stepId);
    return [...names].sort(byNumber.compare);
  }

  function render(el, state) {
    const pruned = new Map(state.prunedSteps.map((p) => [p.stepId, p]));
    const list = steps(state);
    if (!list.length) {
      el.innerHTML = `<p class="muted">Nothing grafted or pruned yet.</p>`;
      return;
    }
    el.innerHTML = list.map((step) => {
      const p = pruned.get(step);
      const who = p ? `<span class="by">pruned by ${esc(p.user)} · ${esc(p.region)}</span>` : "";
      const agents = state.grafts.filter((g) => g.afterStep === step).map((g) =>
        `<div class="agent" data-agent="${esc(g.agent)}" title="grafted by ${esc(g.user)} in ${esc(g.region)}, Lamport ${esc(g.lamport)}">
           <b>${esc(g.agent)}</b><span class="by">${esc(g.user)} · ${esc(g.region)}</span></div>`).join("");
      const lane = agents ? `<div class="lane" data-after="${esc(step)}">${agents}</div>` : "";
      return `<div class="stage"><div class="step${p ? " pruned" : ""}" data-step-node="${esc(step)}">
          <span class="name">${esc(step)}</span>${who}</div>${lane}</div>`;
    }).join(`<div class="arrow" aria-hidden="true">↓</div>`);
  }

  return { render, steps };
})();
