// Talking to the server: the same public APIs any client uses, with the keys the user typed. Keys live in this
// module's memory only (never localStorage, never the URL): reloading the page forgets them.

const keys = { api: null, admin: null };
let askKey = async () => null;  // set by app.js: shows the key dialog, resolves to the key or null
let declined = false;  // the user cancelled the dialog: polling views must not reopen it every few seconds

export function setKeyPrompt(prompt) { askKey = prompt; }
export function setKey(kind, value) {
  keys[kind] = value;
  declined = false;
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function errorText(body, status) {
  // KServe errors are {"error": "..."}, OpenAI ones {"error": {"message": ...}}
  const error = body && body.error;
  if (typeof error === "string") return error;
  if (error && typeof error.message === "string") return error.message;
  return `HTTP ${status}`;
}

function headers(kind, json) {
  const out = json ? { "Content-Type": "application/json" } : {};
  const key = keys[kind] ?? keys.api ?? keys.admin;  // an admin key is also an API key
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

async function send(path, { method = "GET", body, kind = "api", signal } = {}) {
  const init = { method, headers: headers(kind, body !== undefined), signal };
  if (body !== undefined) init.body = JSON.stringify(body);
  return fetch(path, init);
}

// A request that asks for a key when the server wants one (401; 403 on an admin endpoint: an API key is not an
// admin key) and tries again with it.
export async function request(path, options = {}) {
  const kind = options.kind || "api";
  for (let attempt = 0; ; attempt++) {
    const response = await send(path, options);
    const denied = response.status === 401 || (kind === "admin" && response.status === 403);
    if (!denied || attempt >= 3 || (declined && !options.interactive)) return response;
    const body = await response.clone().json().catch(() => null);
    const key = await askKey(kind, errorText(body, response.status));
    if (key === null) {
      declined = true;  // until the header's key button: the caller shows the refusal
      return response;
    }
    keys[kind] = key;
  }
}

// JSON in, JSON out; an ApiError carrying the server's own message otherwise.
export async function json(path, options = {}) {
  const response = await request(path, options);
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, errorText(body, response.status));
  return body;
}

// Server-sent events (OpenAI streaming): calls onEvent with each parsed `data:` object until [DONE].
export async function stream(path, body, onEvent, signal) {
  const response = await request(path, { method: "POST", body, signal, interactive: true });
  if (!response.ok) {
    const payload = await response.json().catch(() => null);
    throw new ApiError(response.status, errorText(payload, response.status));
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const parsed = JSON.parse(data);
        if (parsed.error) throw new ApiError(500, errorText(parsed, 500));
        onEvent(parsed);
      }
    }
  }
}

// The header a snippet shows: the key itself is never printed, only where it comes from.
export function snippetNeedsKey() { return keys.api !== null || keys.admin !== null; }
