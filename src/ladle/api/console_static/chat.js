// The LLM playground: a chat streamed from POST /v1/chat/completions (system prompt, temperature, top-p, max tokens,
// structured output), with the request as curl and openai-python to copy.
import { stream } from "./api.js";
import { errorBox, field, fmt, h, replace, snippetCard } from "./dom.js";
import { curl, openaiChat } from "./snippets.js";

const SCHEMA = JSON.stringify({
  type: "object",
  properties: { city: { type: "string" }, country: { type: "string" } },
  required: ["city", "country"],
  additionalProperties: false,  // JSON Schema allows extra keys unless told: a small model adds them forever
}, null, 2);

export class ChatPlayground {
  constructor(model) {
    this.model = model;
    this.history = [];  // {role, content} of finished turns
    this.controller = null;
    this.lastBody = null;
  }

  mount(root) {
    this.system = h("textarea", { id: "chat-system", rows: 3, placeholder: "You are a helpful assistant." });
    this.temperature = h("input", { id: "chat-temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0.7 });
    this.topP = h("input", { id: "chat-top-p", type: "number", min: 0.01, max: 1, step: 0.05, value: 1 });
    this.maxTokens = h("input", { id: "chat-max-tokens", type: "number", min: 1, step: 1, value: 256 });
    this.format = h("select", { id: "chat-format", onchange: () => this.showSchema() },
      h("option", { value: "text" }, "text"), h("option", { value: "json_object" }, "JSON object"),
      h("option", { value: "json_schema" }, "JSON schema"));
    this.schema = h("textarea", { id: "chat-schema", rows: 8, class: "mono", value: SCHEMA });
    this.schemaField = field("Schema", this.schema);
    this.transcript = h("div", { class: "transcript", "data-testid": "transcript" });
    this.input = h("textarea", { id: "chat-input", rows: 3, placeholder: "Ask something (Ctrl+Enter sends)",
      onkeydown: (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) this.send(); } });
    this.sendButton = h("button", { id: "chat-send", type: "button", onclick: () => this.send() }, "Send");
    this.stopButton = h("button", { id: "chat-stop", type: "button", class: "quiet", disabled: true,
      onclick: () => this.controller?.abort() }, "Stop");
    this.stats = h("p", { class: "muted small", "data-testid": "chat-stats" });
    this.snippet = h("div", { class: "snippets" });
    replace(root, h("div", { class: "playground" },
      h("aside", { class: "card settings" },
        field("System prompt", this.system), field("Temperature", this.temperature), field("Top-p", this.topP),
        field("Max tokens", this.maxTokens), field("Response format", this.format), this.schemaField),
      h("section", { class: "card chat" }, this.transcript, this.input,
        h("div", { class: "row" }, this.sendButton, this.stopButton,
          h("button", { type: "button", class: "quiet", onclick: () => this.clear() }, "Clear"),
          h("span", { class: "grow" }), this.stats))),
    this.snippet);
    this.showSchema();
    this.showSnippet(this.body("Hello!"));
  }

  showSchema() { this.schemaField.hidden = this.format.value !== "json_schema"; }

  body(text) {
    const messages = [];
    if (this.system.value.trim()) messages.push({ role: "system", content: this.system.value });
    messages.push(...this.history, { role: "user", content: text });
    const body = { model: this.model, messages, temperature: Number(this.temperature.value),
      top_p: Number(this.topP.value), max_tokens: Math.max(1, Math.round(Number(this.maxTokens.value))) };
    if (this.format.value === "json_object") body.response_format = { type: "json_object" };
    if (this.format.value === "json_schema") {
      body.response_format = { type: "json_schema",
        json_schema: { name: "answer", schema: JSON.parse(this.schema.value) } };
    }
    return { ...body, stream: true, stream_options: { include_usage: true } };
  }

  async send() {
    const text = this.input.value.trim();
    if (!text || this.controller) return;
    let body;
    try {
      body = this.body(text);
    } catch (error) {
      this.transcript.append(errorBox(`The schema is not valid JSON: ${error.message}`));
      return;
    }
    this.showSnippet(body);
    this.input.value = "";
    this.transcript.append(message("user", text));
    const reply = message("assistant", "");
    reply.dataset.chunks = "0";
    this.transcript.append(reply);
    await this.run(body, text, reply);
  }

  async run(body, text, reply) {
    this.controller = new AbortController();
    this.setRunning(true);
    const started = performance.now();
    let first = null;
    let usage = null;
    let finish = null;
    const content = reply.querySelector(".content");
    try {
      await stream("/v1/chat/completions", body, (chunk) => {
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) return;
        if (choice.finish_reason) finish = choice.finish_reason;
        const delta = choice.delta && choice.delta.content;
        if (!delta) return;
        first ??= performance.now();
        content.textContent += delta;
        reply.dataset.chunks = String(Number(reply.dataset.chunks) + 1);
        this.transcript.scrollTop = this.transcript.scrollHeight;
      }, this.controller.signal);
      this.history.push({ role: "user", content: text }, { role: "assistant", content: content.textContent });
    } catch (error) {
      reply.append(errorBox(error.name === "AbortError" ? "stopped" : error.message));
    } finally {
      reply.dataset.done = "true";
      this.stats.textContent = summary(started, first, usage, finish);
      this.controller = null;
      this.setRunning(false);
    }
  }

  setRunning(running) {
    this.sendButton.disabled = running;
    this.stopButton.disabled = !running;
  }

  clear() {
    this.history = [];
    this.transcript.replaceChildren();
    this.stats.textContent = "";
  }

  showSnippet(body) {
    this.lastBody = body;
    replace(this.snippet, snippetCard("curl", curl("/v1/chat/completions", body)),
      snippetCard("openai-python", openaiChat(body)));
  }
}

function summary(started, first, usage, finish) {
  const parts = [];
  if (first !== null) parts.push(`first token ${fmt(first - started)} ms`);
  if (usage) {
    const seconds = (performance.now() - (first ?? started)) / 1000;
    parts.push(`${usage.completion_tokens} tokens`);
    if (seconds > 0 && usage.completion_tokens > 1) parts.push(`${fmt((usage.completion_tokens - 1) / seconds)} tok/s`);
    if (usage.prompt_tokens_details?.cached_tokens) parts.push(`${usage.prompt_tokens_details.cached_tokens} cached`);
  }
  if (finish) parts.push(`finish: ${finish}`);
  return parts.join(" · ");
}

function message(role, text) {
  return h("div", { class: `message ${role}`, "data-testid": role },
    h("div", { class: "role muted small" }, role), h("div", { class: "content" }, text));
}
