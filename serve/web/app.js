// The upload page of the Serve app: one image -> POST v1/predict, drawn by result.js (bars per head, referral,
// image check), and on request the heatmap of one label from POST v1/explain. This module holds the page's state
// and wires the form to the server (api.js). Plain browser ES modules, no build step, no outside URLs.

import {
  $,
  apiKey,
  call,
  clearError,
  el,
  imageForm,
  mb,
  pct,
  predictParams,
  revealKey,
  score,
  setBusy,
  showError,
  size,
  storeKey,
} from "./api.js";
import { renderBars, renderResult, sortedEntries } from "./result.js";

const PREVIEWABLE = /\.(png|jpe?g)$/i;

const state = {
  file: null,
  previewUrl: null,
  result: null, // the last 200 body of v1/predict, for the current file
  oodOff: false, // whether that request said ood=off (its answer was not checked)
  selected: null, // {head, label}: what the heatmap explains
  explains: new Map(), // "head|label|model" -> explain body, for the current result
  limits: null,
  settings: null, // the gate settings of v1/model (finding thresholds for the ticks)
  spaces: [], // the label spaces (heads) of the served model, from v1/model: the head picker's options
  seq: 0, // a newer request makes older answers stale
};

const view = () => ({ selected: state.selected, settings: state.settings, oodOff: state.oodOff, onSelect: select });

// ------------------------------------------------------------------------------------------ model info

async function loadModel() {
  const answer = await call("GET", "v1/model");
  if (answer.status === 401) {
    $("versions").textContent = "Model versions: enter the API key to see them.";
    revealKey("This server needs an API key. It is kept in this tab only (sessionStorage).");
    return;
  }
  if (!answer.ok || !answer.json) {
    $("versions").textContent = `Model versions: unavailable (HTTP ${answer.status}).`;
    return;
  }
  const info = answer.json;
  if (apiKey()) $("key-hint").textContent = "Key accepted. It is kept in this tab only (sessionStorage).";
  state.limits = info.limits;
  state.settings = info.ensemble;
  const described = Object.values(info.models).find((m) => Array.isArray(m.label_spaces));
  state.spaces = described ? described.label_spaces : [];
  headOptions();
  const parts = Object.entries(info.models).map(([role, m]) =>
    m.version ? `${role}: ${m.version} (${m.arch})` : `${role}: ${m.status || "unknown"}`,
  );
  const gate = info.ensemble;
  parts.push(`gate: w_cnn ${gate.w_cnn}, threshold ${gate.threshold} (${gate.source})`);
  if (gate.refer_below) parts.push(`refer below confidence ${gate.refer_below}`);
  const check = info.ood; // stage B's out-of-distribution check, if the deployment has one
  if (!check) parts.push("no image check");
  else parts.push(`image check: threshold ${score(check.threshold)}${check.enabled ? "" : " (reports only)"}`);
  $("versions").textContent = `Model versions: ${parts.join(" · ")} · API ${info.api_version}`;
  if (state.result) renderBars(state.result, view()); // the threshold ticks need the settings
}

function headOptions() {
  // "all heads" and one option per head of the model; a choice still offered is kept
  const select = $("head");
  const chosen = select.value;
  const kind = (space) => (space.multi_label ? "findings" : "classes");
  const option = (space) => el("option", { value: space.head, text: `${space.head} (${kind(space)})` });
  select.replaceChildren(el("option", { value: "", text: "all heads" }), ...state.spaces.map(option));
  select.value = state.spaces.some((space) => space.head === chosen) ? chosen : "";
}

// ------------------------------------------------------------------------------------------ file

function setFile(file) {
  if (!file) return;
  state.file = file;
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = null;
  const preview = $("preview");
  const note = $("no-preview");
  $("figure").hidden = false;
  $("overlay").hidden = true;
  $("file-name").textContent = `${file.name} (${size(file.size)})`;
  if (PREVIEWABLE.test(file.name) || /^image\/(png|jpeg)$/.test(file.type)) {
    state.previewUrl = URL.createObjectURL(file);
    preview.src = state.previewUrl;
    preview.hidden = false;
    note.hidden = true;
  } else {
    preview.hidden = true;
    preview.removeAttribute("src");
    note.textContent = `${file.name}: this browser cannot draw it; the heatmap overlay shows the image.`;
    note.hidden = false;
  }
  $("run").disabled = false;
  predict();
}

function onPreviewError() {
  // a file named .png that is not one: say so, the server gives the real verdict
  $("preview").hidden = true;
  $("no-preview").textContent = `${state.file ? state.file.name : "file"}: no preview (not an image the browser reads).`;
  $("no-preview").hidden = false;
}

// ------------------------------------------------------------------------------------------ predict

async function predict() {
  if (!state.file) return;
  clearError();
  const warning = $("warning");
  const limit = state.limits && state.limits.max_upload_bytes;
  warning.hidden = !(limit && state.file.size > limit);
  if (!warning.hidden) {
    warning.textContent = `${state.file.name} is ${mb(state.file.size)}, over the server's ${mb(limit)} limit; sending it anyway, the server decides.`;
  }
  const params = predictParams();
  const seq = ++state.seq;
  setBusy("Analysing…");
  const answer = await call("POST", `v1/predict?${params}`, imageForm(state.file));
  if (seq !== state.seq) return;
  setBusy("");
  if (!answer.ok) {
    state.result = null;
    $("results").hidden = true;
    $("overlay").hidden = true;
    showError(answer.status, answer.json);
    return;
  }
  state.result = answer.json;
  state.explains.clear();
  state.selected = defaultTarget(answer.json);
  state.oodOff = params.get("ood") === "off";
  renderResult(answer.json, view());
  if ($("heatmap").checked) explain();
}

function defaultTarget(body) {
  const head = $("head").value || body.heads[0];
  const [label] = sortedEntries(body[head].probabilities)[0];
  return { head, label };
}

function select(head, label) {
  state.selected = { head, label };
  for (const button of document.querySelectorAll(".bar")) {
    const on = button.dataset.head === head && button.dataset.label === label;
    button.setAttribute("aria-pressed", String(on));
  }
  if ($("heatmap").checked) explain();
}

// ------------------------------------------------------------------------------------------ explain

function explainModel(used) {
  // ask the model(s) that answered the prediction
  if (used.length === 1) return used[0];
  return "ensemble";
}

async function explain() {
  const overlay = $("overlay");
  if (!$("heatmap").checked || !state.result || !state.selected) {
    overlay.hidden = true;
    $("preview").hidden = !state.previewUrl;
    $("no-preview").hidden = Boolean(state.previewUrl) || !state.file;
    $("explain-info").textContent = "";
    $("explain-method").hidden = true;
    return;
  }
  const { head, label } = state.selected;
  const model = explainModel(state.result.models_used);
  const key = `${head}|${label}|${model}`;
  let body = state.explains.get(key);
  if (!body) {
    const seq = state.seq;
    $("explain-info").textContent = `computing the heatmap of ${label}…`;
    const params = new URLSearchParams({ head, target: label, model });
    if (state.oodOff) params.set("ood", "off"); // as the prediction it explains was asked
    const answer = await call("POST", `v1/explain?${params}`, imageForm(state.file));
    if (seq !== state.seq) return;
    if (!answer.ok) {
      $("explain-info").textContent = "";
      showError(answer.status, answer.json);
      return;
    }
    body = answer.json;
    state.explains.set(key, body);
  }
  const current = state.selected;
  if (!$("heatmap").checked || current.head !== head || current.label !== label) return; // changed meanwhile
  clearError();
  overlay.src = `data:image/png;base64,${body.overlay_png}`;
  overlay.alt = `Heatmap of ${label} (${head}) over the radiograph`;
  overlay.hidden = false;
  $("preview").hidden = true;
  $("no-preview").hidden = true;
  const info = $("explain-info");
  info.replaceChildren(`${label} (${head}, ${body.model}): `, el("strong", { text: `p = ${pct(body.probability)}` }));
  info.dataset.p = String(body.probability);
  const method = $("explain-method");
  method.textContent = Object.entries(body.method || {})
    .map(([role, text]) => `${role}: ${text}`)
    .join("; ");
  method.hidden = !method.textContent;
}

// ------------------------------------------------------------------------------------------ wiring

function wire() {
  const drop = $("drop");
  const input = $("file");
  input.addEventListener("change", () => {
    setFile(input.files[0]);
    input.value = ""; // so choosing the same file again (after an edit, say) sends it again
  });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) drop.addEventListener(name, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    setFile(event.dataTransfer.files[0]);
  });
  $("preview").addEventListener("error", onPreviewError);
  $("predict-form").addEventListener("submit", (event) => {
    event.preventDefault();
    predict();
  });
  for (const radio of document.querySelectorAll("input[name=mode]")) radio.addEventListener("change", predict);
  $("head").addEventListener("change", predict);
  $("ood-off").addEventListener("change", predict);
  $("heatmap").addEventListener("change", explain);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    storeKey(key);
    clearError();
    loadModel();
    predict();
  });
  if (apiKey()) {
    $("api-key").value = apiKey();
    $("key-section").hidden = false;
  }
}

wire();
loadModel();
