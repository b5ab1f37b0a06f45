// Drawing one answer of v1/predict: the referral notice, the summary (models, gate, image check, latency, input)
// and one block of bars per head, in the order of the answer's "heads" (nothing here names a head). Pure
// rendering: what the page chose (selected bar, gate settings) comes in as `view`, clicks go out through it.

import { $, el, ms, pct, score } from "./api.js";

export function sortedEntries(probabilities) {
  return Object.entries(probabilities).sort((a, b) => b[1] - a[1]);
}

// view: {selected: {head, label} | null, settings: v1/model's ensemble | null, oodOff: the request said ood=off,
//        onSelect(head, label)}
export function renderResult(body, view) {
  $("results").hidden = false;
  renderRefer(body);
  $("models-used").replaceChildren(...body.models_used.map((m) => el("span", { class: "chip", text: m })));
  $("models-used").dataset.models = body.models_used.join(",");
  $("gate").replaceChildren(gateText(body));
  renderOod(body.ood, view.oodOff);
  const latency = body.latency_ms;
  const parts = Object.entries(latency).filter(([name]) => name !== "total");
  const latencyNode = $("latency");
  latencyNode.dataset.total = String(latency.total);
  latencyNode.replaceChildren(
    el("strong", { text: ms(latency.total) }),
    parts.length ? ` (${parts.map(([name, v]) => `${name} ${ms(v)}`).join(", ")})` : "",
    body.cache && body.cache.hit ? el("span", { class: "tag tag-cache", text: "cached answer" }) : "",
  );
  $("input-info").textContent = `${body.input.format.toUpperCase()}, ${body.input.width}×${body.input.height} px`;
  renderBars(body, view);
}

function renderRefer(body) {
  // below stage B's confidence floor the answer itself says a radiologist should read the image, and why
  $("refer").hidden = !body.refer;
  $("refer-reason").textContent = body.refer ? body.refer_reason || "the answer is below the referral floor" : "";
}

function renderOod(ood, oodOff) {
  const node = $("ood");
  if (!ood) {
    delete node.dataset.checked;
    node.textContent = "no check in this deployment";
    return;
  }
  const { dataset } = node;
  Object.assign(dataset, { score: String(ood.score), threshold: String(ood.threshold), checked: String(ood.checked) });
  const within = ood.score <= ood.threshold;
  const verdict = within ? "looks like the training radiographs" : "unlike the training radiographs";
  const numbers = `score ${score(ood.score)} ${within ? "≤" : ">"} ${score(ood.threshold)} (${verdict})`;
  if (ood.checked) {
    node.replaceChildren(numbers);
    return;
  }
  // unchecked: either this request said ood=off, or the deployment's check only reports (ood.enabled false)
  const why = oodOff ? "not checked (ood=off)" : "not checked (the deployment does not refuse)";
  node.replaceChildren(el("strong", { class: within ? "ood-skip" : "ood-skip ood-out", text: why }), `: ${numbers}`);
}

function gateText(body) {
  const gate = body.gate;
  const node = el("span");
  if (body.cnn_confidence === null) {
    node.textContent = `no CNN answer in mode ${body.mode} (threshold ${gate.threshold})`;
    return node;
  }
  const conf = el("strong", { id: "cnn-confidence", text: body.cnn_confidence.toFixed(3) });
  conf.dataset.value = String(body.cnn_confidence);
  const over = body.cnn_confidence >= gate.threshold;
  let verdict;
  if (body.mode !== "adaptive") verdict = `mode ${body.mode}: the gate is not consulted`;
  else if (gate.escalated) verdict = "CNN unsure: escalated to the ViT, answers fused";
  else verdict = "CNN answer stands";
  node.append("CNN confidence ", conf, ` ${over ? "≥" : "<"} threshold ${gate.threshold}`);
  node.append(el("br"), el("span", { class: gate.escalated ? "tag tag-escalated" : "tag", text: verdict }));
  node.dataset.escalated = String(gate.escalated);
  return node;
}

// ------------------------------------------------------------------------------------------ bars

function threshold(answer, label, settings) {
  // multi-label heads list their findings at per-class thresholds; multi-class heads have none
  if (!answer.multi_label || !settings) return null;
  const own = settings.finding_thresholds || {};
  return label in own ? own[label] : settings.finding_threshold;
}

export function renderBars(body, view) {
  $("heads").replaceChildren(...body.heads.map((head) => headBlock(head, body[head], view)));
}

function headBlock(head, answer, view) {
  const hits = new Set(answer.multi_label ? answer.findings : [answer.top_class]);
  const rows = sortedEntries(answer.probabilities).map(([label, p]) => bar(head, answer, label, p, hits, view));
  return el(
    "section",
    { class: "head", "data-head": head },
    el("h3", { id: `title-${head}`, text: `${head}: ${answer.multi_label ? "findings" : "classes"}` }),
    answer.binary ? el("p", { id: `binary-${head}`, text: binaryText(answer) }) : "",
    el("ol", { id: `bars-${head}`, class: "bars", "aria-labelledby": `title-${head}` }, ...rows),
  );
}

function binaryText(answer) {
  // the head's derived yes/no answer: "positive" follows the reported findings (multi-label) or p >= 0.5
  const { name, probability, positive } = answer.binary;
  const why = answer.multi_label ? (positive ? " (a finding is reported)" : " (no finding reported)") : "";
  return `${name}: ${positive ? "yes" : "no"}${why}; p = ${pct(probability)}`;
}

function bar(head, answer, label, p, hits, view) {
  const selected = view.selected && view.selected.head === head && view.selected.label === label;
  const cut = threshold(answer, label, view.settings);
  const hit = hits.has(label);
  const track = el("span", { class: "bar-track", "aria-hidden": "true" }, el("span", { class: "bar-fill" }));
  track.firstChild.style.width = `${Math.max(0, Math.min(1, p)) * 100}%`;
  if (cut !== null) {
    const tick = el("span", { class: "bar-cut" });
    tick.style.left = `${cut * 100}%`;
    track.append(tick);
  }
  const note = hit ? (answer.multi_label ? ", at or above its threshold" : ", top class") : "";
  const kind = hit ? (answer.multi_label ? " hit" : " top") : "";
  const button = el(
    "button",
    { type: "button", class: `bar${kind}`, "aria-pressed": String(Boolean(selected)) },
    el("span", { class: "bar-name", text: label, title: label }),
    track,
    el("span", { class: "bar-value", text: pct(p) }),
  );
  button.setAttribute("aria-label", `${label} ${pct(p)}${note}`);
  Object.assign(button.dataset, { head, label, p: String(p) });
  button.addEventListener("click", () => view.onSelect(head, label));
  return el("li", {}, button);
}
