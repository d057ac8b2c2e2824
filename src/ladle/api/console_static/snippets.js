// The request a playground just built, as code to copy: curl, the openai client (LLMs), tritonclient (classic).
// A key is never printed: snippets read it from $LADLE_API_KEY when the page is using one.
import { snippetNeedsKey } from "./api.js";

const NUMPY = {
  BOOL: "bool", UINT8: "np.uint8", UINT16: "np.uint16", UINT32: "np.uint32", UINT64: "np.uint64", INT8: "np.int8",
  INT16: "np.int16", INT32: "np.int32", INT64: "np.int64", FP16: "np.float16", FP32: "np.float32",
  FP64: "np.float64", BYTES: "object",
};

function origin() { return window.location.origin; }

function shellQuote(text) { return `'${text.replaceAll("'", "'\\''")}'`; }

export function curl(path, body) {
  const auth = snippetNeedsKey() ? ` \\\n  -H "Authorization: Bearer $LADLE_API_KEY"` : "";
  const flags = body.stream ? "-N " : "";  // -N: print the stream as it comes
  return `curl ${flags}${origin()}${path} \\\n  -H 'Content-Type: application/json'${auth} \\\n` +
    `  -d ${shellQuote(pretty(body))}`;
}

// JSON indented by object, with arrays of plain values on one line (tensor data stays short)
export function pretty(value, indent = "") {
  if (value === null || typeof value !== "object") return JSON.stringify(value);
  const inner = `${indent}  `;
  if (Array.isArray(value)) {
    const plain = value.every((v) => v === null || typeof v !== "object");
    if (plain) return `[${value.map((v) => JSON.stringify(v)).join(", ")}]`;
    return `[\n${value.map((v) => inner + pretty(v, inner)).join(",\n")}\n${indent}]`;
  }
  const entries = Object.entries(value).map(([k, v]) => `${inner}${JSON.stringify(k)}: ${pretty(v, inner)}`);
  return entries.length ? `{\n${entries.join(",\n")}\n${indent}}` : "{}";
}

// a JSON value as a Python literal
export function py(value, indent = "") {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number") return Number.isFinite(value) ? String(value) : `float("${value}")`;
  if (typeof value === "string") return JSON.stringify(value);
  const inner = `${indent}    `;
  if (Array.isArray(value)) {
    if (value.every((v) => typeof v !== "object" || v === null)) return `[${value.map((v) => py(v)).join(", ")}]`;
    return `[\n${value.map((v) => inner + py(v, inner)).join(",\n")},\n${indent}]`;
  }
  const entries = Object.entries(value).map(([k, v]) => `${inner}${JSON.stringify(k)}: ${py(v, inner)}`);
  return entries.length ? `{\n${entries.join(",\n")},\n${indent}}` : "{}";
}

export function openaiChat(body) {
  const { model, messages, stream, ...rest } = body;
  const args = Object.entries(rest).filter(([k]) => k !== "stream_options")
    .map(([k, v]) => `    ${k}=${py(v, "    ")},`);
  return [
    "import os",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url="${origin()}/v1", api_key=os.environ.get("LADLE_API_KEY", "none"))`,
    "stream = client.chat.completions.create(",
    `    model=${py(model)},`,
    `    messages=${py(messages, "    ")},`,
    ...args,
    "    stream=True,",
    ")",
    "for chunk in stream:",
    "    if chunk.choices:",
    '        print(chunk.choices[0].delta.content or "", end="", flush=True)',
    "print()",
  ].join("\n");
}

export function tritonInfer(model, version, request) {
  const lines = [
    "import numpy as np",
    "import tritonclient.http as httpclient",
    "",
    `client = httpclient.InferenceServerClient("${window.location.host}")`,
    "inputs = []",
  ];
  for (const t of request.inputs) {
    const dtype = NUMPY[t.datatype] || "np.float32";
    const data = t.datatype === "BYTES" ? t.data.map((s) => `b${JSON.stringify(s)}`).join(", ") : t.data.join(", ");
    lines.push(`x = httpclient.InferInput(${py(t.name)}, ${py(t.shape)}, ${py(t.datatype)})`,
      `x.set_data_from_numpy(np.array([${data}], dtype=${dtype}).reshape(${py(t.shape)}))`, "inputs.append(x)");
  }
  const headers = snippetNeedsKey() ? ',\n                      headers={"Authorization": ' +
    'f"Bearer {os.environ[\'LADLE_API_KEY\']}"}' : "";
  if (headers) lines.unshift("import os");
  lines.push(`result = client.infer(${py(model)}, inputs, model_version=${py(version || "")}${headers})`);
  lines.push("for output in result.get_response()[\"outputs\"]:",
    "    print(output[\"name\"], result.as_numpy(output[\"name\"]))");
  return lines.join("\n");
}
