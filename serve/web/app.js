// The upload page of the Serve app: one image -> POST v1/predict, bars per head (every head the model has, in the
// order of the answer's "heads"; nothing here names one), and on request the heatmap of one label from
// POST v1/explain. Plain browser JS, no build step and no outside URLs: every call is relative to
// the page, so the page works under any route prefix that ends in "/".
"use strict";

(() => {
  const KEY_STORE = "cxr-api-key"; // sessionStorage: the key lives as long as this tab, never on disk
  const PREVIEWABLE = /\.(png|jpe?g)$/i;
  const $ = (id) => document.getElementById(id);

  const state = {
    file: null,
    previewUrl: null,
    result: null, // the last 200 body of v1/predict, for the current file
    selected: null, // {head, label}: what the heatmap explains
    explains: new Map(), // "head|label|model" -> explain body, for the current result
    limits: null,
    settings: null, // the gate settings of v1/model (finding thresholds for the ticks)
    spaces: [], // the label spaces (heads) of the served model, from v1/model: the head picker's options
    seq: 0, // a newer request makes older answers stale
  };

  // ------------------------------------------------------------------------------------------ helpers

  const pct = (p) => `${(p * 100).toFixed(1)}%`;
  const ms = (v) => `${v.toFixed(1)} ms`;
  const mb = (bytes) => `${(bytes / 1048576).toFixed(1)} MB`;
  const size = (bytes) => (bytes < 1048576 ? `${Math.ceil(bytes / 1024)} kB` : mb(bytes));

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else node.setAttribute(name, value);
    }
    node.append(...children);
    return node;
  }

  function apiKey() {
    return sessionStorage.getItem(KEY_STORE) || "";
  }

  async function call(method, path, body) {
    const headers = apiKey() ? { "X-API-Key": apiKey() } : {};
    let response;
    try {
      response = await fetch(path, { method, headers, body });
    } catch (err) {
      return { status: 0, json: { error: { reason: "network", detail: `the server did not answer (${err})` } } };
    }
    let json = null;
    try {
      json = await response.json();
    } catch {
      // Serve's own overload answer (503) is plain text: reported as such below
    }
    return { status: response.status, ok: response.ok, json };
  }

  function imageForm() {
    const form = new FormData();
    form.append("file", state.file, state.file.name);
    return form;
  }

  // ------------------------------------------------------------------------------------------ notices

  function showError(status, json) {
    const error = (json && json.error) || { reason: `http_${status}`, detail: "the server answered without details" };
    $("error-reason").textContent = status ? `${status} ${error.reason}:` : `${error.reason}:`;
    $("error-detail").textContent = error.detail || "";
    $("error").hidden = false;
    if (status === 401) revealKey("The server refused the request: enter its API key.");
  }

  function clearError() {
    $("error").hidden = true;
  }

  function revealKey(hint) {
    $("key-section").hidden = false;
    if (hint) $("key-hint").textContent = hint;
    $("api-key").focus();
  }

  function setBusy(text) {
    $("busy").textContent = text;
    $("results").setAttribute("aria-busy", text ? "true" : "false");
  }

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
    $("versions").textContent = `Model versions: ${parts.join(" · ")} · API ${info.api_version}`;
    if (state.result) renderBars(state.result); // the threshold ticks need the settings
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
    const params = new URLSearchParams({ mode: document.querySelector("input[name=mode]:checked").value });
    if ($("head").value) params.set("head", $("head").value);
    const seq = ++state.seq;
    setBusy("Analysing…");
    const answer = await call("POST", `v1/predict?${params}`, imageForm());
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
    renderResult(answer.json);
    if ($("heatmap").checked) explain();
  }

  function defaultTarget(body) {
    const head = $("head").value || body.heads[0];
    const [label] = sortedEntries(body[head].probabilities)[0];
    return { head, label };
  }

  function sortedEntries(probabilities) {
    return Object.entries(probabilities).sort((a, b) => b[1] - a[1]);
  }

  function renderResult(body) {
    $("results").hidden = false;
    $("models-used").replaceChildren(...body.models_used.map((m) => el("span", { class: "chip", text: m })));
    $("models-used").dataset.models = body.models_used.join(",");
    $("gate").replaceChildren(gateText(body));
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
    renderBars(body);
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

  function threshold(answer, label) {
    // multi-label heads list their findings at per-class thresholds; multi-class heads have none
    if (!answer.multi_label || !state.settings) return null;
    const own = state.settings.finding_thresholds || {};
    return label in own ? own[label] : state.settings.finding_threshold;
  }

  function renderBars(body) {
    $("heads").replaceChildren(...body.heads.map((head) => headBlock(head, body[head])));
  }

  function headBlock(head, answer) {
    const hits = new Set(answer.multi_label ? answer.findings : [answer.top_class]);
    const rows = sortedEntries(answer.probabilities).map(([label, p]) => bar(head, answer, label, p, hits));
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

  function bar(head, answer, label, p, hits) {
    const selected = state.selected && state.selected.head === head && state.selected.label === label;
    const cut = threshold(answer, label);
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
    button.addEventListener("click", () => select(head, label));
    return el("li", {}, button);
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
      const answer = await call("POST", `v1/explain?${params}`, imageForm());
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
    $("heatmap").addEventListener("change", explain);
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("api-key").value.trim();
      if (key) sessionStorage.setItem(KEY_STORE, key);
      else sessionStorage.removeItem(KEY_STORE);
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
})();
