// Small SVG line charts for the live view: a few series over the last points, y from 0 to the largest value seen,
// gaps where a figure is missing (no request in that interval). No library: a polyline per run of values.
import { fmt, h, svg } from "./dom.js";

const W = 260;
const H = 80;
const PAD = 4;

export function lineChart(title, unit, series) {
  const values = series.flatMap((s) => s.values.filter((v) => v !== null && v !== undefined));
  const top = niceTop(values.length ? Math.max(...values) : 0);
  const count = Math.max(2, ...series.map((s) => s.values.length));
  const plot = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": title });
  for (const fraction of [0.5, 1]) {
    const y = yOf(top * fraction, top);
    plot.append(svg("line", { x1: 0, x2: W, y1: y, y2: y, class: "grid" }));
  }
  series.forEach((s, i) => {
    for (const run of runs(s.values)) plot.append(path(run, count, top, i));
  });
  const legend = series.map((s, i) => h("span", { class: `legend s${i}` }, `${s.name} ${fmt(last(s.values))}`));
  return h("figure", { class: "card chart-card", "data-testid": "chart", "data-title": title },
    h("figcaption", {}, h("b", {}, title), h("span", { class: "muted small" }, ` ${unit} · max ${fmt(top)}`)),
    plot, h("div", { class: "legends small" }, legend));
}

function path(run, count, top, index) {
  const points = run.map(([i, v]) => `${xOf(i, count).toFixed(1)},${yOf(v, top).toFixed(1)}`);
  if (points.length === 1) {
    const [x, y] = points[0].split(",");
    return svg("circle", { cx: x, cy: y, r: 1.8, class: `dot s${index}` });
  }
  return svg("polyline", { points: points.join(" "), class: `line s${index}` });
}

// consecutive non-null values as [[index, value], ...] runs
function runs(values) {
  const out = [];
  let current = [];
  values.forEach((v, i) => {
    if (v === null || v === undefined) {
      if (current.length) out.push(current);
      current = [];
    } else current.push([i, v]);
  });
  if (current.length) out.push(current);
  return out;
}

function xOf(i, count) { return PAD + (i / (count - 1)) * (W - 2 * PAD); }
function yOf(v, top) { return H - PAD - (top > 0 ? v / top : 0) * (H - 2 * PAD); }

function niceTop(max) {
  if (!(max > 0)) return 1;
  const magnitude = 10 ** Math.floor(Math.log10(max));
  const step = [1, 2, 2.5, 5, 10].find((m) => m * magnitude >= max);
  return step * magnitude;
}

export function last(values) {
  for (let i = values.length - 1; i >= 0; i--) if (values[i] !== null && values[i] !== undefined) return values[i];
  return null;
}
