// The upload page's talk with the server: the DOM and number helpers every part of the page uses, the API key
// (this tab only), the one fetch wrapper, the query the form's choices make, and the notices that report what
// the server said (error box, busy line, key field). Calls are relative to the page, so it works under any route
// prefix that ends in "/"; nothing here leaves the app's origin.

const KEY_STORE = "cxr-api-key"; // sessionStorage: the key lives as long as this tab, never on disk

export const $ = (id) => document.getElementById(id);
export const pct = (p) => `${(p * 100).toFixed(1)}%`;
export const ms = (v) => `${v.toFixed(1)} ms`;
export const mb = (bytes) => `${(bytes / 1048576).toFixed(1)} MB`;
export const size = (bytes) => (bytes < 1048576 ? `${Math.ceil(bytes / 1024)} kB` : mb(bytes));
export const score = (v) => v.toFixed(2);

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

// ------------------------------------------------------------------------------------------ key and calls

export function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

export function storeKey(key) {
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
}

export async function call(method, path, body) {
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
    // Serve's own overload answer (503) is plain text: reported as such by showError
  }
  return { status: response.status, ok: response.ok, json };
}

export function imageForm(file) {
  const form = new FormData();
  form.append("file", file, file.name);
  return form;
}

function oodOff() {
  // the research switch: the server answers an image its check would refuse, and says it did not check
  return $("ood-off").checked;
}

export function predictParams() {
  // the form's choices, as the API names them; defaults are left out so the URL says what was chosen
  const params = new URLSearchParams({ mode: document.querySelector("input[name=mode]:checked").value });
  if ($("head").value) params.set("head", $("head").value);
  if (oodOff()) params.set("ood", "off");
  return params;
}

// ------------------------------------------------------------------------------------------ notices

export function showError(status, json) {
  const error = (json && json.error) || { reason: `http_${status}`, detail: "the server answered without details" };
  $("error-reason").textContent = status ? `${status} ${error.reason}:` : `${error.reason}:`;
  $("error-detail").textContent = error.detail || "";
  showRefusal(json && json.ood);
  $("error").hidden = false;
  if (status === 401) revealKey("The server refused the request: enter its API key.");
}

function showRefusal(ood) {
  // a 422 not_a_chest_radiograph carries the score the check refused: shown as numbers, with the way round it
  const node = $("error-ood");
  node.hidden = !ood;
  if (!ood) return;
  Object.assign(node.dataset, { score: String(ood.score), threshold: String(ood.threshold) });
  node.replaceChildren(
    `image check: score ${score(ood.score)} > threshold ${score(ood.threshold)}, unlike the training radiographs. `,
    el("span", { class: "muted", text: "Tick “answer non-radiographs anyway (research)” to have it answered." }),
  );
}

export function clearError() {
  $("error").hidden = true;
}

export function revealKey(hint) {
  $("key-section").hidden = false;
  if (hint) $("key-hint").textContent = hint;
  $("api-key").focus();
}

export function setBusy(text) {
  $("busy").textContent = text;
  $("results").setAttribute("aria-busy", text ? "true" : "false");
}
