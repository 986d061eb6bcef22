// The page of `edgelora serve`: chat with a role, a stack of two, or two side by side.
// Plain JS, no build step, nothing from the network but this server. Conversations of this
// page session are kept in sessionStorage (gone when the tab closes; the server keeps nothing).
"use strict";

const $ = (id) => document.getElementById(id);
const HISTORY_KEY = "edgelora.history";
const state = { roles: [], history: loadHistory(), current: null, abort: null };

function loadHistory() {
  try { return JSON.parse(sessionStorage.getItem(HISTORY_KEY)) || []; } catch { return []; }
}
function saveHistory() { sessionStorage.setItem(HISTORY_KEY, JSON.stringify(state.history)); }

const KEY_KEY = "edgelora.apiKey";

async function api(path, body, signal) {
  const headers = body === undefined ? {} : { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_KEY);
  if (key) headers.Authorization = `Bearer ${key}`;
  const init = body === undefined ? { headers } : { method: "POST", headers, body: JSON.stringify(body), signal };
  const response = await fetch(path, init);
  if (response.status === 401) {
    // A server started with --api-key: ask once per tab, keep it in this tab's sessionStorage only.
    const given = window.prompt("This server needs its API key (edgelora serve --api-key):");
    if (given) { sessionStorage.setItem(KEY_KEY, given.trim()); return api(path, body, signal); }
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error.message || message; } catch { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

// ---------------------------------------------------------------- roles

async function loadRoles() {
  const [models, health] = await Promise.all([api("/v1/models").then((r) => r.json()), api("/health").then((r) => r.json())]);
  state.roles = models.data;
  $("server-info").textContent = `model ${health.model}`;
  for (const select of [$("role-a"), $("role-b")]) {
    select.replaceChildren(...state.roles.map((role) => new Option(role.id, role.id)));
  }
  const second = state.roles.find((r) => !["base", "auto"].includes(r.id));
  if (second) $("role-b").value = second.id;
  describeRoles();
}

function describe(id) {
  const role = state.roles.find((r) => r.id === id);
  return role && role.description ? `${id}: ${role.description}` : id;
}

function describeRoles() {
  const mode = $("mode").value;
  document.body.dataset.mode = mode;
  const text = mode === "single" ? describe($("role-a").value) : `${describe($("role-a").value)} · ${describe($("role-b").value)}`;
  $("role-description").textContent = text;
}

// What each column sends as `model`: one role, a weighted stack, or two roles side by side.
function chosenModels() {
  const a = $("role-a").value, b = $("role-b").value, mode = $("mode").value;
  if (mode === "stack") return [`${a}:${Number($("weight-a").value)}+${b}:${Number($("weight-b").value)}`];
  if (mode === "compare") return [a, b];
  return [a];
}

// ---------------------------------------------------------------- conversations

function newConversation() {
  const models = chosenModels();
  state.current = { id: Date.now(), title: "", mode: $("mode").value, columns: models.map((model) => ({ model, messages: [] })) };
  state.history.unshift(state.current);
  render();
}

function currentFits() {
  const c = state.current, models = chosenModels();
  return c && c.mode === $("mode").value && c.columns.length === models.length && c.columns.every((col, i) => col.model === models[i]);
}

function render() {
  const c = state.current;
  [0, 1].forEach((i) => {
    const column = $(`column-${i}`), col = c && c.columns[i];
    column.hidden = i > 0 && !col;
    column.querySelector(".column-title").textContent = col ? describe(col.model) : describe($("role-a").value);
    const transcript = column.querySelector(".transcript");
    transcript.replaceChildren(...(col ? col.messages.map(messageElement) : []));
  });
  $("history").replaceChildren(...state.history.filter((h) => h.title).map((h) => {
    const li = document.createElement("li");
    li.textContent = h.title;
    li.title = `${h.columns.map((col) => col.model).join(" | ")}: ${h.title}`;
    li.classList.toggle("current", h === c);
    li.addEventListener("click", () => { state.current = h; render(); });
    return li;
  }));
}

function messageElement(message) {
  const div = document.createElement("div");
  div.className = `message ${message.role}`;
  div.textContent = message.content;  // text only: model output never becomes markup
  if (message.meta) {
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = message.meta;
    div.append(meta);
  }
  return div;
}

// ---------------------------------------------------------------- streaming

// Server-sent events from a fetch body: yields each `data:` payload.
async function* sseData(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data) yield data;
    }
  }
}

function metaLine(info, finish) {
  if (!info) return "";
  const parts = [`role ${info.role}`];
  if (info.route) parts.push(`auto chose ${info.route.role}: ${info.route.reason}`);
  if (info.fallback) parts.push(info.fallback.note);
  parts.push(`${info.tokens_per_s} tok/s`);
  if (finish === "length") parts.push("stopped at the token limit");
  return parts.join(" · ");
}

// What a column sends: its turns, without stopped answers and errors (shown, but no context),
// as the chat app and the CLI do.
function contextOf(column) {
  return column.messages.filter((m) => (m.role === "user" || m.role === "assistant") && !m.stopped)
    .map(({ role, content }) => ({ role, content }));
}

async function streamInto(column, columnIndex, signal) {
  const answer = { role: "assistant", content: "", meta: "" };
  const body = {
    model: column.model, stream: true, max_tokens: Number($("max-tokens").value) || 256,
    messages: contextOf(column),
  };
  column.messages.push(answer);
  const transcript = $(`column-${columnIndex}`).querySelector(".transcript");
  const element = messageElement(answer);
  transcript.append(element);
  try {
    const response = await api("/v1/chat/completions", body, signal);
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        answer.content += choice.delta.content;
        element.firstChild ? (element.firstChild.nodeValue = answer.content) : element.append(answer.content);
      }
      if (chunk.edgelora) answer.meta = metaLine(chunk.edgelora, choice && choice.finish_reason);
    }
  } catch (error) {
    // Stopped or failed: an empty answer goes; a partial one stays in view, marked, out of context.
    if (answer.content) {
      answer.stopped = true;
      answer.meta = [answer.meta, "stopped"].filter(Boolean).join(" · ");
    } else {
      column.messages.splice(column.messages.indexOf(answer), 1);
    }
    if (error.name !== "AbortError") column.messages.push({ role: "error", content: error.message });
    throw error;
  } finally {
    transcript.parentElement.scrollTop = transcript.parentElement.scrollHeight;
  }
}

async function send(event) {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt || state.abort) return;
  if (!currentFits()) newConversation();
  const c = state.current;
  if (!c.title) c.title = prompt.slice(0, 60);
  c.columns.forEach((col) => col.messages.push({ role: "user", content: prompt }));
  $("prompt").value = "";
  $("error").textContent = "";
  render();
  state.abort = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  const errors = [];
  try {
    // One after the other: the server answers one request at a time anyway. Each column gets its
    // answer or its error: one that fails does not keep the next from answering; Stop stops all.
    for (const [i, col] of c.columns.entries()) {
      if (state.abort.signal.aborted) break;
      try {
        await streamInto(col, i, state.abort.signal);
      } catch (error) {
        if (error.name !== "AbortError") errors.push(c.columns.length > 1 ? `${col.model}: ${error.message}` : error.message);
      }
      render();
    }
  } finally {
    $("error").textContent = errors.join(" · ");
    state.abort = null;
    $("send").disabled = false;
    $("stop").disabled = true;
    saveHistory();
    render();
  }
}

function init() {
  $("prompt-form").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("prompt-form").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => state.abort && state.abort.abort());
  $("new-chat").addEventListener("click", newConversation);
  for (const id of ["mode", "role-a", "role-b", "weight-a", "weight-b"]) $(id).addEventListener("change", () => { describeRoles(); render(); });
  state.current = state.history[0] || null;
  loadRoles().then(render).catch((error) => { $("error").textContent = `cannot reach the server: ${error.message}`; });
}

init();
