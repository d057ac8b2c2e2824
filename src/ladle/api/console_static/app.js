// The console's shell: the views by URL hash (#models, #live, #playground/<model>), the models every view shares
// (GET /console/api/models, refreshed while the models view is open), readiness in the header, and the key dialog.
import { json, setKey, setKeyPrompt } from "./api.js";
import { ChatPlayground } from "./chat.js";
import { errorBox, h, replace } from "./dom.js";
import { InferPlayground } from "./infer.js";
import { LiveView } from "./live.js";
import { loadError, ModelsView } from "./models.js";

const MODELS_EVERY_MS = 3000;
const READY_EVERY_MS = 5000;

const state = { models: [], admin: "off", loaded: false, error: null, reload: loadModels };
const viewRoot = document.getElementById("view");
let current = null;  // the mounted view: {mount(root), refresh?(), unmount?()}
let currentName = "";
let timer = null;

async function loadModels() {
  try {
    const answer = await json("/console/api/models");
    Object.assign(state, { models: answer.models, admin: answer.admin, loaded: true, error: null });
  } catch (error) {
    state.error = error;
  }
  if (currentName === "models") showModels();
}

function showModels() {
  if (state.error && !state.loaded) replace(viewRoot, h("h1", {}, "Models"), loadError(state.error));
  else current.refresh();
}

// -- views ------------------------------------------------------------------------------------------------
async function route() {
  const [name, arg] = (window.location.hash.slice(1) || "models").split("/");
  current?.unmount?.();
  clearInterval(timer);
  currentName = name;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.view === name);
  if (name === "live") {
    current = new LiveView();
    await current.mount(viewRoot);
    timer = setInterval(() => current.refresh(), 2000);
  } else if (name === "playground") {
    await loadModels();
    current = playground(arg ? decodeURIComponent(arg) : null);
  } else {
    currentName = "models";
    current = new ModelsView(state);
    current.mount(viewRoot);
    await loadModels();
    timer = setInterval(loadModels, MODELS_EVERY_MS);
  }
}

function playground(name) {
  const servable = state.models.filter((m) => m.versions.some((v) => v.state === "READY"));
  const chosen = servable.find((m) => m.name === name) || (name ? null : servable[0]);
  const picker = h("select", { id: "playground-model", onchange: (e) => {
    window.location.hash = `#playground/${encodeURIComponent(e.target.value)}`;
  } }, servable.map((m) => h("option", { value: m.name, selected: chosen && m.name === chosen.name },
    `${m.name} (${m.kind === "llm" ? "LLM" : "classic"})`)));
  const body = h("div");
  replace(viewRoot, h("div", { class: "row" }, h("h1", {}, "Playground"), picker), body);
  if (state.error) replace(body, loadError(state.error));
  else if (!chosen) replace(body, errorBox(name ? `No READY model named '${name}'.` : "No model is READY."));
  const view = !chosen ? null : chosen.kind === "llm" ? new ChatPlayground(chosen.name) : new InferPlayground(chosen);
  view?.mount(body);
  return view;
}

// -- header: server and readiness -------------------------------------------------------------------------
async function header() {
  try {
    const server = await json("/v2");
    document.getElementById("server").textContent = `${server.name} ${server.version}`;
  } catch {
    /* the key dialog already said why */
  }
  await readiness();
  setInterval(readiness, READY_EVERY_MS);
}

async function readiness() {
  const badge = document.getElementById("ready");
  let ready = false;
  try {
    ready = (await fetch("/v2/health/ready")).ok;
  } catch {
    ready = false;
  }
  badge.textContent = ready ? "ready" : "not ready";
  badge.className = `badge ${ready ? "ok" : "bad"}`;
}

// -- the key dialog -----------------------------------------------------------------------------------------
function askKey(kind, message) {
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-title").textContent = kind === "admin" ? "Admin key" : "API key";
  document.getElementById("key-message").textContent = message || "";
  input.value = "";
  return new Promise((resolve) => {
    const done = (value) => {
      cleanup();
      dialog.close();
      resolve(value);
    };
    const ok = () => done(input.value.trim() || null);
    const cancel = () => done(null);
    const onKey = (e) => { if (e.key === "Enter") { e.preventDefault(); ok(); } };
    const onCancel = (e) => { e.preventDefault(); cancel(); };
    const okButton = document.getElementById("key-ok");
    const cancelButton = document.getElementById("key-cancel");
    function cleanup() {
      okButton.removeEventListener("click", ok);
      cancelButton.removeEventListener("click", cancel);
      input.removeEventListener("keydown", onKey);
      dialog.removeEventListener("cancel", onCancel);
    }
    okButton.addEventListener("click", ok);
    cancelButton.addEventListener("click", cancel);
    input.addEventListener("keydown", onKey);
    dialog.addEventListener("cancel", onCancel);
    dialog.showModal();
    input.focus();
  });
}

// one dialog at a time: concurrent requests refused together share the answer
let pending = null;
setKeyPrompt((kind, message) => {
  pending ??= askKey(kind, message).finally(() => { pending = null; });
  return pending;
});

document.getElementById("key-button").addEventListener("click", async () => {
  const key = await askKey("api", "Sent as `Authorization: Bearer <key>` with every request this page makes.");
  if (key !== null) setKey("api", key);
  route();
});

window.addEventListener("hashchange", route);
route().then(header);
