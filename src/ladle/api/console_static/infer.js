// The classic playground: a form built from a model's metadata (a field per value for small inputs, JSON for
// larger or variable ones, text for BYTES), run as one KServe v2 inference; outputs and the request as code.
import { json } from "./api.js";
import { errorBox, field, h, replace, shapeText, snippetCard } from "./dom.js";
import { curl, tritonInfer } from "./snippets.js";

const MAX_FIELDS = 16;  // inputs with more values than this take a JSON array
const SHOWN = 64;  // values shown per output

export class InferPlayground {
  constructor(model) {
    this.model = model;  // an entry of /console/api/models
    this.fields = [];  // {spec, read(): {shape, data}}
  }

  mount(root) {
    const ready = this.model.versions.filter((v) => v.state === "READY");
    const spec = ready.length ? ready[ready.length - 1] : null;
    if (!spec) {
      replace(root, errorBox(`${this.model.name} has no READY version: load it in the Models view.`));
      return;
    }
    this.version = h("select", { id: "infer-version" }, h("option", { value: "" }, "routed (traffic split)"),
      ready.map((v) => h("option", { value: v.version }, `version ${v.version}`)));
    this.fields = spec.inputs.map((s) => inputField(s));
    this.output = h("div", { "data-testid": "infer-output" });
    this.snippet = h("div", { class: "snippets" });
    this.runButton = h("button", { id: "infer-run", type: "button", onclick: () => this.run() }, "Run");
    replace(root, h("div", { class: "playground" },
      h("section", { class: "card settings" }, field("Version", this.version),
        this.fields.map((f) => f.element), h("div", { class: "row" }, this.runButton)),
      h("section", { class: "card" }, h("h3", {}, "Outputs"), this.output)),
    this.snippet);
  }

  async run() {
    let request;
    try {
      request = { inputs: this.fields.map((f) => ({ name: f.spec.name, datatype: f.spec.datatype, ...f.read() })) };
    } catch (error) {
      replace(this.output, errorBox(error.message));
      return;
    }
    const version = this.version.value;
    const path = `/v2/models/${encodeURIComponent(this.model.name)}` +
      (version ? `/versions/${encodeURIComponent(version)}` : "") + "/infer";
    replace(this.snippet, snippetCard("curl", curl(path, request)),
      snippetCard("tritonclient", tritonInfer(this.model.name, version, request)));
    this.runButton.disabled = true;
    try {
      const started = performance.now();
      const answer = await json(path, { method: "POST", body: request, interactive: true });
      replace(this.output, outputs(answer, performance.now() - started));
    } catch (error) {
      replace(this.output, errorBox(error.message));
    } finally {
      this.runButton.disabled = false;
    }
  }
}

function inputField(spec) {
  const dims = spec.shape[0] === -1 ? spec.shape.slice(1) : spec.shape;  // one instance of a batched model
  const batched = spec.shape[0] === -1;
  const count = dims.every((d) => d > 0) ? dims.reduce((a, b) => a * b, 1) : Infinity;
  const label = `${spec.name} ${spec.datatype} ${shapeText(spec.shape)}`;
  const text = spec.datatype === "BYTES";
  if (count <= MAX_FIELDS) {
    const boxes = Array.from({ length: count }, (_, i) => h("input", {
      type: text ? "text" : "number", step: "any", value: text ? "" : "0", "data-input": spec.name,
      "data-index": i, "aria-label": `${spec.name}[${i}]`, class: text ? "wide" : "num" }));
    const shape = batched ? [1, ...dims] : dims;
    const read = () => ({ shape, data: boxes.map((b) => (text ? b.value : parseNumber(b.value, spec))) });
    return { spec, read, element: field(label, h("div", { class: "values" }, boxes)) };
  }
  const area = h("textarea", { rows: 4, class: "mono", "data-input": spec.name,
    placeholder: `one instance as a JSON array, shape ${shapeText(dims)}` });
  const read = () => {
    const value = JSON.parse(area.value || "null");
    const shape = shapeOf(value);
    const data = [value].flat(Infinity);
    return { shape: batched ? [1, ...shape] : shape, data };
  };
  return { spec, read, element: field(label, area) };
}

function parseNumber(raw, spec) {
  const value = Number(raw);
  if (raw.trim() === "" || Number.isNaN(value)) throw new Error(`${spec.name}: "${raw}" is not a number`);
  return value;
}

function shapeOf(value) {
  const shape = [];
  while (Array.isArray(value)) {
    shape.push(value.length);
    value = value[0];
  }
  return shape;
}

function outputs(answer, ms) {
  return [
    h("p", { class: "muted small" }, `version ${answer.model_version} answered in ${ms.toFixed(1)} ms`),
    h("table", {}, h("thead", {}, h("tr", {}, ["Output", "Type", "Shape", "Data"].map((t) => h("th", {}, t)))),
      h("tbody", {}, (answer.outputs || []).map((o) => h("tr", { "data-testid": "output", "data-name": o.name },
        h("td", {}, o.name), h("td", {}, o.datatype), h("td", { class: "mono" }, shapeText(o.shape)),
        h("td", { class: "mono", "data-testid": "output-data" }, dataText(o.data)))))),
  ];
}

function dataText(data) {
  const flat = [data].flat(Infinity);
  const shown = flat.slice(0, SHOWN).map((v) => (typeof v === "string" ? JSON.stringify(v) : String(v)));
  return shown.join(", ") + (flat.length > SHOWN ? ` … (${flat.length - SHOWN} more)` : "");
}
