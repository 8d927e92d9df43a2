// tunesmith dashboard: the job page (live curves as inline SVG, events, log, audit, compare,
// exports, side-by-side chat). Loaded after app.js, whose helpers (el, api, $ ...) it uses.
// Every piece of model or data text goes in through textContent (el()), never innerHTML.
"use strict";

// ---------------------------------------------------------------- charts (inline SVG)

const W = 480, H = 220, PAD = { l: 52, r: 10, t: 10, b: 26 };

// About n round values (1, 2 or 5 times a power of ten apart) between lo and hi.
function ticks(lo, hi, n, integer) {
  const raw = (hi - lo) / n;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  let step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  if (integer) step = Math.max(1, Math.round(step));
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(v);
  return out;
}

function drawChart(node, series) {
  const all = series.flatMap((s) => s.points);
  node.replaceChildren();
  node.dataset.points = String(all.length);
  if (!all.length) {
    node.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "waiting for the first step…"));
    return;
  }
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
  const sx = (x) => PAD.l + ((x - x0) / (x1 - x0)) * (W - PAD.l - PAD.r);
  const sy = (y) => H - PAD.b - ((y - y0) / (y1 - y0)) * (H - PAD.t - PAD.b);
  for (const y of ticks(y0, y1, 4, false)) {
    node.append(svg("line", { class: "grid", x1: PAD.l, x2: W - PAD.r, y1: sy(y), y2: sy(y) }));
    node.append(svg("text", { x: PAD.l - 4, y: sy(y) + 3, "text-anchor": "end" }, Math.abs(y) < 1e-2 && y !== 0 ? y.toExponential(1) : num(y, 3)));
  }
  for (const x of ticks(x0, x1, 5, true)) {
    node.append(svg("text", { x: sx(x), y: H - PAD.b + 14, "text-anchor": "middle" }, Math.round(x)));
  }
  node.append(svg("line", { class: "axis", x1: PAD.l, x2: PAD.l, y1: PAD.t, y2: H - PAD.b }));
  node.append(svg("line", { class: "axis", x1: PAD.l, x2: W - PAD.r, y1: H - PAD.b, y2: H - PAD.b }));
  node.append(svg("text", { x: W - PAD.r, y: H - 2, "text-anchor": "end" }, "step"));
  for (const s of series) {
    if (!s.points.length) continue;
    const pts = [...s.points].sort((a, b) => a[0] - b[0]);
    node.append(svg("polyline", { class: s.cls, points: pts.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ") }));
    if (pts.length <= 300) {
      for (const p of pts) {
        const dot = svg("circle", { class: s.cls, cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: 2.2 });
        dot.append(svg("title", {}, `${s.name} step ${p[0]}: ${num(p[1], 5)}`));
        node.append(dot);
      }
    }
  }
}

// ---------------------------------------------------------------- job page

const job = { data: null, series: null, seen: new Set(), drawPending: false, history: { base: [], tuned: [] } };

function resetJob() {
  job.data = null;
  job.series = { train: new Map(), valid: new Map(), lr: new Map() };
  job.seen = new Set();
  job.history = { base: [], tuned: [] };
  for (const id of ["events", "log", "audits", "compare", "chat-base", "chat-tuned", "job-facts"]) $(id).replaceChildren();
  $("tasks").tBodies[0].replaceChildren();
  $("report-link").hidden = true;
  drawCharts();
}

function drawCharts() {
  job.drawPending = false;
  const pts = (m) => [...m.entries()];
  drawChart($("chart-loss"), [{ name: "train", cls: "train", points: pts(job.series.train) },
                              { name: "validation", cls: "valid", points: pts(job.series.valid) }]);
  drawChart($("chart-lr"), [{ name: "learning rate", cls: "lr", points: pts(job.series.lr) }]);
}

function onEvent(e) {
  if (job.seen.has(e.seq)) return;
  job.seen.add(e.seq);
  const d = e.data || {};
  if (e.type === "metrics" && typeof d.step === "number") {
    if (typeof d.train_loss === "number") job.series.train.set(d.step, d.train_loss);
    if (typeof d.valid_loss === "number") job.series.valid.set(d.step, d.valid_loss);
    if (typeof d.learning_rate === "number") job.series.lr.set(d.step, d.learning_rate);
    if (d.total_steps) $("job-progress").textContent = `step ${d.step}/${d.total_steps}`;
    if (!job.drawPending) { job.drawPending = true; requestAnimationFrame(drawCharts); }
    return;
  }
  $("events").prepend(el("li", { class: e.level }, `${when(e.created_at)}  ${e.message}`));
}

function fact(name, value) {
  return value === null || value === undefined || value === "" ? [] : [el("dt", {}, name), el("dd", {}, value)];
}

function renderJob(j) {
  const prev = job.data;
  job.data = j;
  $("job-id").textContent = j.id;
  $("job-status").replaceWith(Object.assign(statusBadge(j.status), { id: "job-status" }));
  $("job-progress").textContent = j.total_steps ? `step ${j.step || 0}/${j.total_steps}` : "";
  $("job-facts").replaceChildren(...[
    fact("Base model", j.model), fact("Fine-tuned model", j.fine_tuned_model),
    fact("Method", j.method && j.method.type), fact("Hyperparameters", JSON.stringify(j.hyperparameters || {})),
    fact("Training file", j.training_file), fact("Validation file", j.validation_file),
    fact("Created", when(j.created_at)), fact("Finished", when(j.finished_at)), fact("Trained tokens", j.trained_tokens),
  ].flat());
  showError($("job-error"), j.error && j.error.message ? { text: `${j.error.code || "error"}: ${j.error.message}` } : null);
  $("btn-cancel").disabled = TERMINAL.has(j.status);
  $("btn-pause").disabled = j.status !== "running";
  $("btn-resume").disabled = j.status !== "paused";
  const done = j.status === "succeeded";
  for (const id of ["btn-compare", "btn-merged", "btn-gguf", "chat-send"]) $(id).disabled = !done;
  $("chat-base-name").textContent = j.model;
  $("chat-tuned-name").textContent = j.fine_tuned_model || "tuned (once the job has succeeded)";
  if (!prev || prev.status !== j.status) loadLog();
}

async function loadJob(id) {
  try {
    renderJob(await api("GET", `/v1/fine_tuning/jobs/${id}`));
  } catch (err) {
    notice(err.text || String(err));
  }
}

async function loadLog() {
  if (!state.jobId) return;
  try {
    const log = await api("GET", `/ui/api/jobs/${state.jobId}/log?tail=200`);
    const pre = $("log");
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent = log.data.join("\n");
    if (atEnd) pre.scrollTop = pre.scrollHeight;
  } catch (_) { /* the job page shows the job's own error */ }
}

function auditTable(report) {
  const pct = (v) => (typeof v === "number" ? `${(v * 100).toFixed(1)}%` : "-");
  const records = report.records || {};
  const tokens = (report.tokens && report.tokens.lengths) || {};
  const pii = Object.entries(report.pii || {}).filter(([, n]) => n).map(([k, n]) => `${k}: ${n}`).join(", ");
  const rows = [
    ["Rows", records.total], ["Formats", JSON.stringify(records.by_format || {})],
    ["Invalid rows", (report.invalid || []).length],
    ["Exact duplicate rows", report.exact_duplicates && report.exact_duplicates.rows],
    ["Near-duplicate rows", report.near_duplicates && report.near_duplicates.rows],
    ["Tokens p50 / p95 / max", `${tokens.p50 ?? "-"} / ${tokens.p95 ?? "-"} / ${tokens.max ?? "-"}`],
    ["Truncated rows", pct(report.truncated_fraction)], ["Trained tokens", pct(report.trained_token_fraction)],
    ["PII found", pii || "none"],
  ];
  const table = el("table", { class: "grid audit" }, el("tbody", {}, rows.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v ?? "-")))));
  const invalid = (report.invalid || []).slice(0, 10).map((r) => el("li", {}, `${r.where}: ${r.error}`));
  return [table, invalid.length ? el("ul", { class: "invalid" }, invalid) : null];
}

// An upload's audit runs in the background (409 until it is done): asked again on the next poll.
async function loadAudits(j) {
  const parts = [];
  let pending = false;
  for (const [role, id] of [["training", j.training_file], ["validation", j.validation_file]]) {
    if (!id) continue;
    let body;
    try {
      body = auditTable(await api("GET", `/v1/files/${id}/audit`));
    } catch (err) {
      pending = pending || err.status === 409;
      body = [el("p", { class: "help" }, err.text || String(err))];
    }
    parts.push(el("div", { class: "audit-file" }, el("h3", {}, `${role}: ${id}`), body));
  }
  if (job.data && job.data.id === j.id) {
    job.auditPending = pending;
    $("audits").replaceChildren(...parts);
  }
}

function compareTable(c) {
  const rows = [];
  for (const t of c.tasks || []) {
    for (const d of t.deltas || []) {
      const flags = [];
      if (d.metric === t.primary) flags.push("primary");
      if (d.metric === t.primary && t.forgetting) flags.push(`FORGETTING (drop > ${c.threshold})`);
      rows.push(el("tr", { class: d.metric === t.primary && t.forgetting ? "forgetting" : null },
        el("td", {}, t.task), el("td", {}, d.metric), el("td", { class: "num" }, num(d.base)),
        el("td", { class: "num" }, num(d.tuned)),
        el("td", { class: "num" }, d.delta === null || d.delta === undefined ? "-" : `${d.delta >= 0 ? "+" : ""}${num(d.delta)} ${d.unit}`),
        el("td", {}, flags.join(", "))));
    }
  }
  const forgetting = c.forgetting || [];
  const verdict = el("p", { class: `verdict ${forgetting.length ? "bad" : "good"}` },
    forgetting.length ? `Forgetting on: ${forgetting.join(", ")}` : "No forgetting flagged");
  return [el("p", { class: "help" }, `base: ${c.base} · tuned: ${c.tuned}`), verdict,
          el("table", { class: "grid", id: "compare-table" },
            el("thead", {}, el("tr", {}, ["Task", "Metric", "Base", "Tuned", "Change", "Flags"].map((h) => el("th", {}, h)))),
            el("tbody", {}, rows))];
}

async function loadCompare() {
  try {
    const c = await api("GET", `/ui/api/jobs/${state.jobId}/compare`);
    $("compare").replaceChildren(...compareTable(c));
    const link = $("report-link");
    link.href = `/ui/jobs/${state.jobId}/report`;
    link.hidden = false;
  } catch (err) {
    if (err.status !== 404) $("compare").replaceChildren(el("p", { class: "error" }, err.text));
  }
}

let compareSeen = null;
async function loadTasks() {
  if (!state.jobId) return;
  let list;
  try { list = await api("GET", `/ui/api/jobs/${state.jobId}/tasks`); } catch (_) { return; }
  $("tasks").tBodies[0].replaceChildren(...list.data.map((t) => el("tr", { "data-task": t.id, "data-kind": t.kind, "data-status": t.status },
    el("td", {}, `${t.kind} ${t.id}`), el("td", {}, statusBadge(t.status), t.error ? el("div", { class: "help" }, typeof t.error === "object" ? t.error.message || JSON.stringify(t.error) : t.error) : null),
    el("td", {}, el("ul", {}, t.files.map((f) => el("li", {}, el("a", { href: f.url, download: f.name.split("/").pop() }, f.name), ` (${f.bytes} bytes)`)))))));
  const doneCompare = list.data.filter((t) => t.kind === "compare" && t.status === "succeeded").map((t) => t.id).pop();
  if (doneCompare && doneCompare !== compareSeen) { compareSeen = doneCompare; loadCompare(); }
}

async function act(path, body) {
  try {
    const out = await api("POST", path, body);
    return out;
  } catch (err) {
    notice(err.text || String(err));
    return null;
  }
}

async function chatOnce(side, model, text) {
  const log = $(side === "base" ? "chat-base" : "chat-tuned");
  const history = job.history[side];
  history.push({ role: "user", content: text });
  log.append(el("div", { class: "turn user" }, `you: ${text}`));
  const slot = el("div", { class: "turn assistant pending" }, "…");
  log.append(slot);
  try {
    const r = await api("POST", "/v1/chat/completions", { model, messages: history, max_tokens: 64 });
    const reply = (r.choices && r.choices[0] && r.choices[0].message && r.choices[0].message.content) || "";
    history.push({ role: "assistant", content: reply });
    slot.textContent = reply;
    slot.classList.remove("pending");
    slot.classList.add("reply");
  } catch (err) {
    history.pop();
    slot.textContent = err.text || String(err);
    slot.className = "turn error";
  }
}

async function showJob(id) {
  $("view-job").hidden = false;
  resetJob();
  compareSeen = null;
  state.jobId = id;
  await loadJob(id);
  if (!job.data || state.jobId !== id) return;
  loadAudits(job.data);
  loadTasks();
  const source = new EventSource(`/ui/api/jobs/${id}/stream`);
  state.source = source;
  source.onmessage = (m) => onEvent(JSON.parse(m.data));
  source.addEventListener("end", () => { source.close(); loadJob(id); loadLog(); });
  every(POLL_MS, () => {
    if (!job.data || TERMINAL.has(job.data.status)) return;
    loadJob(id);
    loadLog();
  });
  every(POLL_MS, () => {
    loadTasks();
    if (job.auditPending && job.data) loadAudits(job.data);
  });
}

function wireJobButtons() {
  const post = (what, body) => async () => {
    const out = await act(`${what.startsWith("/") ? "" : `/v1/fine_tuning/jobs/${state.jobId}/`}${what}`, body);
    if (out) { loadJob(state.jobId); loadTasks(); }
  };
  $("btn-cancel").addEventListener("click", post("cancel"));
  $("btn-pause").addEventListener("click", post("pause"));
  $("btn-resume").addEventListener("click", post("resume"));
  $("btn-compare").addEventListener("click", () => post(`/ui/api/jobs/${state.jobId}/compare`, {})());
  $("btn-merged").addEventListener("click", () => post(`/ui/api/jobs/${state.jobId}/export`, { format: "merged" })());
  $("btn-gguf").addEventListener("click", () => post(`/ui/api/jobs/${state.jobId}/export`, { format: "gguf", quant: $("quant").value })());
  $("chat").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("chat-input").value.trim();
    if (!text || !job.data || !job.data.fine_tuned_model) return;
    $("chat-input").value = "";
    chatOnce("base", job.data.model, text);
    chatOnce("tuned", job.data.fine_tuned_model, text);
  });
}
