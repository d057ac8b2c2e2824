// The models view: every model and version the repository index lists, with backend, state (and why), traffic
// split and rollout, signatures, and load / reload / unload through the repository API (POST
// /v2/repository/models/{m}/load|unload, with the admin key when the server wants one).
import { json } from "./api.js";
import { errorBox, h, replace, shapeText, stateBadge } from "./dom.js";

const ADMIN_OFF = "The admin API is off on this server: start ladle with --admin-key KEY (or " +
  "--allow-admin-without-key on a trusted machine) to load and unload models from here.";

export class ModelsView {
  constructor(state) {
    this.state = state;  // shared with app.js: state.models, state.admin
    this.busy = new Set();  // models with a load/unload in flight
    this.messages = new Map();  // model -> the last action's outcome
  }

  mount(root) {
    this.root = root;
    this.render();
  }

  refresh() { if (this.root) this.render(); }

  render() {
    const { models, admin, loaded } = this.state;
    if (!loaded) {
      replace(this.root, h("h1", {}, "Models"), h("p", { class: "muted" }, "Reading the models…"));
      return;
    }
    const note = admin === "off" ? h("p", { class: "muted", "data-testid": "admin-off" }, ADMIN_OFF) : null;
    replace(this.root,
      h("h1", {}, "Models"),
      note,
      models.length === 0 ? h("p", { class: "muted" }, "The repository holds no model.") : null,
      models.map((m) => this.card(m)));
  }

  card(m) {
    const kind = m.kind === "llm" ? "LLM" : m.versions.some((v) => v.embeddings) ? "embeddings" : "classic";
    return h("section", { class: "card model", "data-testid": "model", "data-model": m.name },
      h("div", { class: "row" },
        h("h2", {}, m.name),
        h("span", { class: "tag" }, kind),
        m.backend ? h("span", { class: "tag" }, m.backend) : null,
        h("span", { class: "model-state" }, stateBadge(m.state)),
        m.pinned ? h("span", { class: "muted small" }, "given on the command line (--model)") : null,
        h("span", { class: "grow" }),
        this.actions(m)),
      m.reason ? h("p", { class: "reason", "data-testid": "reason" }, m.reason) : null,
      traffic(m),
      rollout(m.rollout),
      this.messages.has(m.name) ? this.messages.get(m.name) : null,
      m.versions.length ? versionTable(m) : null);
  }

  actions(m) {
    const off = this.state.admin === "off" || m.pinned || this.busy.has(m.name);
    const title = this.state.admin === "off" ? ADMIN_OFF : m.pinned ? "a --model checkpoint stays loaded" : null;
    const ready = m.state === "READY";
    return h("span", { class: "actions" },
      h("button", { type: "button", disabled: off, title, "data-testid": ready ? "reload" : "load",
        onclick: () => this.act(m.name, "load") }, ready ? "Reload" : "Load"),
      h("button", { type: "button", class: "danger", disabled: off || !ready, title, "data-testid": "unload",
        onclick: () => this.act(m.name, "unload") }, "Unload"),
      h("a", { class: "button quiet", href: `#playground/${encodeURIComponent(m.name)}`,
        "data-testid": "try" }, "Try"));
  }

  async act(name, action) {
    this.busy.add(name);
    this.messages.set(name, h("p", { class: "muted" }, action === "load" ? "loading…" : "unloading…"));
    this.render();
    try {
      await json(`/v2/repository/models/${encodeURIComponent(name)}/${action}`,
        { method: "POST", body: {}, kind: "admin", interactive: true });
      this.messages.delete(name);
    } catch (error) {
      this.messages.set(name, errorBox(`${action} failed: ${error.message}`));
    } finally {
      this.busy.delete(name);
      await this.state.reload();  // app.js refetches the models and re-renders
    }
  }
}

function traffic(m) {
  if (!m.traffic_split) return null;
  const parts = Object.entries(m.traffic_split).map(([v, pct]) => `v${v} ${pct}%`);
  return h("p", { class: "small", "data-testid": "split" },
    h("b", {}, "Traffic: "), parts.join(" · "), h("span", { class: "muted" }, ` (${m.split_source})`));
}

function rollout(r) {
  if (!r) return null;
  const step = `step ${r.step} of ${r.steps.length} (${r.steps.join(", ")}%)`;
  return h("p", { class: "small", "data-testid": "rollout" },
    h("b", {}, "Rollout: "), `to v${r.to}, ${r.state}, ${step}, now ${r.percent}%`,
    r.reason ? h("span", { class: "muted" }, ` — ${r.reason}`) : null);
}

function versionTable(m) {
  return h("table", { class: "versions" },
    h("thead", {}, h("tr", {}, ["Version", "State", "Platform", "Inputs", "Outputs"].map((t) => h("th", {}, t)))),
    h("tbody", {}, m.versions.map((v) => h("tr", { "data-testid": "version", "data-version": v.version },
      h("td", {}, v.version),
      h("td", {}, stateBadge(v.state), v.reason ? h("div", { class: "reason small" }, v.reason) : null),
      h("td", {}, v.platform || "–", v.max_model_len ? h("div", { class: "muted small" },
        `context ${v.max_model_len} tokens`) : null),
      h("td", {}, tensors(v.inputs)),
      h("td", {}, tensors(v.outputs))))));
}

function tensors(list) {
  if (!list || list.length === 0) return h("span", { class: "muted" }, "–");
  return list.map((t) => h("div", { class: "mono small" }, `${t.name} ${t.datatype} ${shapeText(t.shape)}`));
}

export function loadError(error) {
  return errorBox(`Cannot read the models: ${error.message}`);
}
