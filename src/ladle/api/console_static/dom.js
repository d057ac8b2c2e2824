// Building the page: every node is made here with textContent, never from HTML strings, so nothing a model or a
// client wrote (a model's reason, a chat reply) can become markup. The page's CSP refuses inline script anyway.

export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "value") el.value = value;
    else if (key === "checked") el.checked = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export function svg(tag, attrs = {}) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, String(value));
  return el;
}

export function stateBadge(state) {
  const cls = { READY: "ok", LOADING: "warn", UNLOADING: "warn" }[state] || "bad";
  return h("span", { class: `badge ${cls}`, "data-testid": "state" }, state);
}

export function fmt(value, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return String(value);
  return Number(value.toPrecision(digits)).toString();
}

export function shapeText(shape) {
  return `[${shape.join(", ")}]`;
}

export function copyButton(getText) {
  const button = h("button", { type: "button", class: "quiet small" }, "Copy");
  button.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(getText());
      button.textContent = "Copied";
    } catch {
      button.textContent = "Select and copy";  // clipboard needs a secure context (https or localhost)
    }
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  });
  return button;
}

export function errorBox(message) {
  return h("div", { class: "error", role: "alert", "data-testid": "error" }, message);
}

export function field(label, input) {
  return h("label", { class: "field" }, h("span", { class: "small muted" }, label), input);
}

export function snippetCard(title, code) {
  return h("figure", { class: "card snippet", "data-testid": `snippet-${title}` },
    h("figcaption", { class: "row" }, h("b", {}, title), h("span", { class: "grow" }), copyButton(() => code)),
    h("pre", { class: "mono" }, code));
}
