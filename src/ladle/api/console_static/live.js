// The live view: per model version, small charts of the figures GET /console/api/live derives from the server's
// metrics (the server samples every interval_s while this view reads it; the browser never parses Prometheus text).
import { json } from "./api.js";
import { lineChart } from "./chart.js";
import { errorBox, h, replace } from "./dom.js";

const CLASSIC = [
  ["Requests", "per s", [["all", "requests_per_s"], ["errors", "errors_per_s"]]],
  ["Latency", "ms", [["p50", "p50_ms"], ["p99", "p99_ms"]]],
  ["Queue depth", "requests", [["queued", "queue_depth"]]],
  ["Batch size", "mean", [["batch", "batch_size"]]],
];
const LLM = [
  ["Time to first token", "ms", [["p50", "ttft_p50_ms"], ["p99", "ttft_p99_ms"]]],
  ["Inter-token latency", "ms", [["p50", "itl_p50_ms"], ["p99", "itl_p99_ms"]]],
  ["Tokens generated", "per s", [["tokens", "tokens_per_s"]]],
  ["Requests", "in engine", [["running", "running"], ["waiting", "waiting"]]],
  ["KV-cache usage", "fraction", [["used", "kv_usage"]]],
  ["Prefix-cache hit rate", "fraction", [["hits", "prefix_hit_rate"]]],
];

export class LiveView {
  mount(root) {
    this.root = root;
    replace(root, h("h1", {}, "Live"), h("p", { class: "muted" }, "Waiting for the first figures…"));
    return this.refresh();
  }

  async refresh() {
    if (!this.root) return;
    let data;
    try {
      data = await json("/console/api/live");
    } catch (error) {
      replace(this.root, h("h1", {}, "Live"), errorBox(`Cannot read the live figures: ${error.message}`));
      return;
    }
    this.render(data);
  }

  render(data) {
    const span = Math.round((data.points || 0) * data.interval_s);
    const header = h("p", { class: "muted" },
      `Every ${data.interval_s} s, the last ${span} s; figures start when this view is first opened.`);
    const names = Object.keys(data.models).sort();
    const cards = names.flatMap((model) => Object.entries(data.models[model]).map(([version, figures]) =>
      h("section", { class: "card", "data-testid": "live-model", "data-model": model, "data-version": version },
        h("h2", {}, `${model} `, h("span", { class: "muted" }, `v${version}`),
          h("span", { class: "tag" }, figures.kind === "llm" ? "LLM" : "classic")),
        h("div", { class: "charts" }, (figures.kind === "llm" ? LLM : CLASSIC).map(([title, unit, series]) =>
          lineChart(title, unit, series.map(([name, key]) => ({ name, values: figures[key] || [] }))))))));
    const empty = names.length ? null : h("p", { class: "muted" }, "No model has figures yet: send it a request.");
    replace(this.root, h("h1", {}, "Live"), header, empty, cards);
  }

  unmount() { this.root = null; }
}
