// tunesmith dashboard: plain DOM over the /v1 jobs API and the /ui routes. No build step.
// Every piece of model or data text goes in through textContent (el() below), never innerHTML.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG_NS = "http://www.w3.org/2000/svg";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 2000;

// ---------------------------------------------------------------- helpers

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function cookie(name) {
  const hit = document.cookie.split("; ").find((c) => c.startsWith(name + "="));
  return hit ? decodeURIComponent(hit.slice(name.length + 1)) : null;
}

// The login's CSRF token (auth.py); without a key any value will do, but the header must be there.
const csrf = () => cookie("tunesmith_csrf") || "none";

class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `HTTP ${status}`);
    this.status = status;
    this.param = e.param || null;
    this.code = e.code || null;
  }
  // The server's message as it was returned, with the field it names.
  get text() { return this.param ? `${this.message} (${this.param})` : this.message; }
}

async function api(method, path, body) {
  const opts = { method, headers: { "X-CSRF-Token": csrf() }, credentials: "same-origin" };
  if (body instanceof FormData) opts.body = body;
  else if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (r.status === 401 && !path.startsWith("/v1/chat")) notice("Your session has ended: reload the page to log in again.");
  if (!r.ok) throw new ApiError(r.status, data);
  return data;
}

function notice(msg) {
  const n = $("notice");
  n.textContent = msg || "";
  n.hidden = !msg;
}

function showError(node, err) {
  node.textContent = err ? (err.text || String(err.message || err)) : "";
  node.hidden = !err;
}

const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "");
const num = (v, digits = 4) => (typeof v === "number" && isFinite(v) ? Number(v.toPrecision(digits)).toString() : "-");
const progress = (job) => (job.total_steps ? `${job.step || 0}/${job.total_steps}` : job.step ? String(job.step) : "-");

function statusBadge(status) {
  return el("span", { class: `status ${status}` }, status);
}

// ---------------------------------------------------------------- router

const state = { timers: [], source: null, jobId: null, schema: null };

function stopAll() {
  state.timers.forEach(clearInterval);
  state.timers = [];
  if (state.source) state.source.close();
  state.source = null;
  state.jobId = null;
}

function every(ms, fn) {
  state.timers.push(setInterval(fn, ms));
}

function route() {
  stopAll();
  notice("");
  const hash = location.hash || "#/";
  for (const v of document.querySelectorAll("main.view")) v.hidden = true;
  const m = hash.match(/^#\/jobs\/(ftjob-[0-9a-f]+)$/);
  if (m) return showJob(m[1]);
  if (hash === "#/new") return showNew();
  return showJobs();
}

// ---------------------------------------------------------------- jobs table

async function loadJobs() {
  try {
    const list = await api("GET", "/v1/fine_tuning/jobs?limit=100");
    const body = $("jobs").tBodies[0];
    body.replaceChildren(...list.data.map((j) => {
      const row = el("tr", { "data-job": j.id },
        el("td", {}, el("a", { href: `#/jobs/${j.id}` }, j.id)),
        el("td", {}, statusBadge(j.status)),
        el("td", { class: "num" }, progress(j)),
        el("td", {}, j.fine_tuned_model || j.model),
        el("td", {}, when(j.created_at)));
      row.addEventListener("click", () => { location.hash = `#/jobs/${j.id}`; });
      return row;
    }));
    $("jobs-empty").hidden = list.data.length > 0;
  } catch (err) {
    notice(err.text || String(err));
  }
}

function showJobs() {
  $("view-jobs").hidden = false;
  loadJobs();
  every(POLL_MS, loadJobs);
}

// ---------------------------------------------------------------- new-job form

async function schema() {
  if (!state.schema) state.schema = await api("GET", "/ui/api/schema");
  return state.schema;
}

function fileLabel(f) {
  const status = f.status === "processed" ? "" : ` [${f.status}]`;
  return `${f.filename} (${f.id}, ${f.bytes} bytes)${status}`;
}

async function loadFiles(selectId) {
  const list = await api("GET", "/v1/files?purpose=fine-tune");
  const files = list.data || [];
  for (const [id, blank] of [["training_file", null], ["validation_file", "(none)"]]) {
    const select = $(id);
    const keep = id === "training_file" && selectId ? selectId : select.value;
    const options = files.map((f) => el("option", { value: f.id }, fileLabel(f)));
    if (blank) options.unshift(el("option", { value: "" }, blank));
    select.replaceChildren(...options);
    if (keep && files.some((f) => f.id === keep)) select.value = keep;
  }
}

function helpText(field) {
  let text = field.help || "";
  if (field.allowed) text += ` One of: ${field.allowed.join(", ")}.`;
  if (field.default !== undefined) text += ` Default: ${JSON.stringify(field.default)}.`;
  return text;
}

function configInput(field) {
  const attrs = { "data-key": field.key, "data-kind": field.kind, id: `cfg-${field.key}` };
  if (field.allowed || field.kind === "bool") {
    const values = field.allowed || [true, false];
    return el("select", attrs, el("option", { value: "" }, "(default)"),
      values.map((v) => el("option", { value: JSON.stringify(v) }, String(v))));
  }
  const placeholder = field.kind === "list" ? "JSON list or a,b,c" : field.kind === "dict" ? "JSON object" : "default";
  const type = field.kind === "int" || field.kind === "float" ? "number" : "text";
  return el("input", { ...attrs, type, step: field.kind === "int" ? "1" : "any", placeholder });
}

function buildForm(s) {
  $("model").value = s.base_model;
  $("method").replaceChildren(...s.methods.map((m) => el("option", { value: m }, m)));
  $("hyperparameters").replaceChildren(...s.hyperparameters.map((h) => el("label", { "data-methods": h.methods.join(" ") },
    h.key, el("input", { id: `hp-${h.key}`, "data-kind": h.kind, type: "text", placeholder: "auto" }),
    el("span", { class: "help" }, h.help))));
  // one folded group per config section (train.distributed apart: it is long and rarely set)
  const groups = new Map();
  for (const f of s.config) {
    const name = f.key.split(".").slice(0, f.key.startsWith("train.distributed.") ? 2 : 1).join(".");
    if (!groups.has(name)) groups.set(name, []);
    groups.get(name).push(el("div", { class: "field", "data-search": `${f.key} ${f.help}`.toLowerCase() },
      el("label", { for: `cfg-${f.key}` }, el("code", {}, f.key)), configInput(f), el("p", { class: "help" }, helpText(f))));
  }
  $("config-fields").replaceChildren(...[...groups].map(([name, fields]) => el("details", { class: "section", "data-section": name },
    el("summary", {}, `${name} (${fields.length})`), fields)));
  const syncMethod = () => {
    for (const label of $("hyperparameters").children) label.hidden = !label.dataset.methods.split(" ").includes($("method").value);
  };
  $("method").addEventListener("change", syncMethod);
  syncMethod();
  $("config-filter").addEventListener("input", () => {
    const q = $("config-filter").value.toLowerCase();
    for (const group of $("config-fields").children) {
      let shown = 0;
      for (const div of group.querySelectorAll(".field")) {
        div.hidden = q && !div.dataset.search.includes(q);
        shown += div.hidden ? 0 : 1;
      }
      group.hidden = !shown;
      group.open = Boolean(q) && shown > 0;
    }
  });
}

function parseValue(kind, raw, key) {
  if (kind === "int" || kind === "float") {
    const n = Number(raw);
    return raw.trim() !== "" && isFinite(n) ? n : raw; // not a number: the server names the field
  }
  if (kind === "list") {
    if (raw.trim().startsWith("[")) return JSON.parse(raw);
    return raw.split(",").map((x) => x.trim()).filter(Boolean);
  }
  if (kind === "dict") {
    try { return JSON.parse(raw); } catch (_) { throw new Error(`${key}: not a JSON object: ${raw}`); }
  }
  return raw;
}

function collectJob() {
  const method = $("method").value;
  const hp = {};
  for (const input of $("hyperparameters").querySelectorAll("input")) {
    const raw = input.value.trim();
    if (!raw || input.closest("label").hidden) continue;
    hp[input.id.slice(3)] = raw === "auto" ? "auto" : parseValue(input.dataset.kind, raw, input.id.slice(3));
  }
  const tunesmith = {};
  for (const input of $("config-fields").querySelectorAll("[data-key]")) {
    const raw = input.value;
    if (raw === "") continue;
    tunesmith[input.dataset.key] = input.tagName === "SELECT" ? JSON.parse(raw) : parseValue(input.dataset.kind, raw, input.dataset.key);
  }
  const body = { model: $("model").value, training_file: $("training_file").value,
                 method: { type: method, [method]: { hyperparameters: hp } } };
  if ($("validation_file").value) body.validation_file = $("validation_file").value;
  if ($("suffix").value.trim()) body.suffix = $("suffix").value.trim();
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if (Object.keys(tunesmith).length) body.tunesmith = tunesmith;
  return body;
}

async function upload() {
  const file = $("upload").files[0];
  if (!file) return;
  const status = $("upload-status");
  status.textContent = `uploading ${file.name}…`;
  delete status.dataset.file;
  $("upload").value = ""; // the same file chosen again is a new upload
  const form = new FormData();
  form.append("purpose", "fine-tune");
  form.append("file", file, file.name);
  try {
    const f = await api("POST", "/v1/files", form);
    await loadFiles(f.id);
    status.textContent = `uploaded ${f.filename} as ${f.id} (${f.status})`;
    status.dataset.file = f.id;
  } catch (err) {
    status.textContent = "";
    showError($("form-error"), err);
  }
}

let formReady = null;
function showNew() {
  $("view-new").hidden = false;
  showError($("form-error"), null);
  if (!formReady) {
    formReady = schema().then(buildForm);
    $("upload").addEventListener("change", upload);
    $("new-job").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      showError($("form-error"), null);
      $("create").disabled = true;
      try {
        const created = await api("POST", "/v1/fine_tuning/jobs", collectJob());
        location.hash = `#/jobs/${created.id}`;
      } catch (err) {
        showError($("form-error"), err);
      } finally {
        $("create").disabled = false;
      }
    });
  }
  formReady.then(() => loadFiles()).catch((err) => showError($("form-error"), err));
}

document.addEventListener("DOMContentLoaded", async () => {
  $("logout").hidden = !cookie("tunesmith_csrf");
  wireJobButtons();
  window.addEventListener("hashchange", route);
  route();
  try {
    const s = await schema();
    $("quant").replaceChildren(...s.export.gguf_quants.map((q) => el("option", { value: q }, q)));
    $("quant").value = s.export.gguf_quants.includes("q8_0") ? "q8_0" : s.export.gguf_quants[0];
  } catch (err) {
    notice(err.text || String(err));
  }
});
