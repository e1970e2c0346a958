// igd admin console: polls /api/state, renders with textContent only (descriptions come
// from LAN hosts and are never parsed as HTML), sends state changes with the CSRF token.
"use strict";

const POLL_MS = 2000;
let csrf = "";
let mappings = [];
let sortKey = "external_port";
let sortDir = 1;

const $ = (id) => document.getElementById(id);

function duration(seconds) {
  if (seconds < 60) return seconds + " s";
  const d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600);
  const m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
  if (d) return d + "d " + h + "h";
  if (h) return h + "h " + m + "m";
  return m + "m " + s + "s";
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function say(text, error) {
  const box = $("message");
  box.textContent = text;
  box.className = error ? "message error" : "message";
}

async function post(path, body) {
  const response = await fetch(path, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
    body: JSON.stringify(body),
  });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(answer.error || response.status + " " + response.statusText);
  return answer;
}

function renderMappings() {
  const words = $("filter").value.trim().toLowerCase().split(/\s+/).filter(Boolean);
  const rows = mappings.filter((m) => {
    const text = [m.external_port, m.protocol, m.internal, m.client, m.mechanism,
      m.description, m.rule || "", m.remote_host || ""].join(" ").toLowerCase();
    return words.every((w) => text.includes(w));
  });
  const numeric = document.querySelector(`th[data-key="${sortKey}"]`).dataset.numeric;
  rows.sort((a, b) => {
    const x = a[sortKey] == null ? "" : a[sortKey], y = b[sortKey] == null ? "" : b[sortKey];
    const order = numeric ? x - y : String(x).localeCompare(String(y), undefined, { numeric: true });
    return order * sortDir || a.external_port - b.external_port;
  });
  const body = document.createElement("tbody");
  for (const m of rows) {
    const tr = document.createElement("tr");
    tr.dataset.port = m.external_port;
    tr.dataset.protocol = m.protocol;
    const at = m.external_address ? m.external_address + ":" : "";
    cell(tr, at + m.external_port + (m.remote_host ? " from " + m.remote_host : ""));
    cell(tr, m.protocol.toUpperCase());
    cell(tr, m.internal);
    cell(tr, m.client);
    cell(tr, m.mechanism).className = "";
    cell(tr, m.description);
    cell(tr, m.rule || "(restored)", m.rule ? "" : "muted");
    cell(tr, duration(m.age));
    cell(tr, duration(m.remaining));
    const td = cell(tr, "");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "delete";
    button.textContent = "Delete";
    button.addEventListener("click", () => remove(m));
    td.appendChild(button);
    body.appendChild(tr);
  }
  $("mappings").replaceChild(body, $("mappings").tBodies[0]);
  $("empty").hidden = rows.length > 0;
  document.querySelectorAll("#mappings th[data-key]").forEach((th) => {
    th.classList.toggle("asc", th.dataset.key === sortKey && sortDir > 0);
    th.classList.toggle("desc", th.dataset.key === sortKey && sortDir < 0);
  });
}

function renderRefusals(refusals) {
  const body = document.createElement("tbody");
  for (const r of refusals) {
    const tr = document.createElement("tr");
    cell(tr, new Date(r.at * 1000).toLocaleTimeString());
    cell(tr, r.client);
    cell(tr, r.mechanism);
    cell(tr, r.request);
    cell(tr, r.rule);
    const reason = cell(tr, r.reason, "deny");
    if (r.detail) reason.title = r.detail;
    body.appendChild(tr);
  }
  $("refusals").replaceChild(body, $("refusals").tBodies[0]);
  $("no-refusals").hidden = refusals.length > 0;
}

function renderPinholes(pinholes, total) {
  // Shown only when the daemon has [ipv6] enabled (total is null otherwise).
  $("pinholes-section").hidden = total === null;
  const body = document.createElement("tbody");
  for (const p of pinholes) {
    const tr = document.createElement("tr");
    cell(tr, p.internal);
    cell(tr, p.protocol);
    cell(tr, p.remote_host || (p.filters.length ? p.filters.join(", ") : "any"));
    cell(tr, p.client);
    cell(tr, p.mechanism);
    cell(tr, p.description);
    cell(tr, p.rule || "");
    cell(tr, duration(p.age));
    cell(tr, duration(p.remaining));
    body.appendChild(tr);
  }
  $("pinholes").replaceChild(body, $("pinholes").tBodies[0]);
  $("no-pinholes").hidden = pinholes.length > 0;
}

function renderPolicy(policy) {
  $("policy-source").textContent = policy.source;
  $("policy-defaults").textContent = "Defaults: " + policy.defaults;
  const body = document.createElement("tbody");
  for (const rule of policy.rules) {
    const tr = document.createElement("tr");
    cell(tr, rule.name);
    cell(tr, rule.action, rule.action);
    cell(tr, rule.line);
    cell(tr, rule.criteria);
    body.appendChild(tr);
  }
  $("policy").replaceChild(body, $("policy").tBodies[0]);
}

async function refresh() {
  try {
    const response = await fetch("/api/state", { credentials: "same-origin" });
    if (response.status === 401) { window.location.assign("/login"); return; }
    if (!response.ok) throw new Error(response.status + " " + response.statusText);
    const state = await response.json();
    csrf = state.csrf;
    $("logout").hidden = !state.login;
    $("st-address").textContent = state.status.external_address || "none";
    $("st-count").textContent = state.status.mappings;
    $("st-epoch").textContent = duration(state.status.epoch);
    $("st-uptime").textContent = duration(state.status.uptime);
    $("st-updated").textContent = new Date().toLocaleTimeString();
    mappings = state.mappings;
    const cut = state.status.mappings - mappings.length;
    $("truncated").hidden = cut <= 0;
    $("truncated").textContent = cut > 0 ? cut + " more mappings not shown (igd-server list shows all)." : "";
    renderMappings();
    renderPinholes(state.pinholes, state.status.pinholes);
    renderRefusals(state.refusals);
    renderPolicy(state.policy);
  } catch (error) {
    $("st-updated").textContent = "unreachable (" + error.message + ")";
  }
}

async function remove(m) {
  try {
    await post("/api/delete", { protocol: m.protocol, external_port: m.external_port, remote_host: m.remote_host,
      external_address: m.external_address });
    say("Deleted " + m.protocol.toUpperCase() + " " + m.external_port + ".");
  } catch (error) {
    say("Delete failed: " + error.message, true);
  }
  refresh();
}

async function flush() {
  const mechanism = $("flush-mechanism").value, client = $("flush-client").value.trim();
  const what = (mechanism ? mechanism + " " : "") + "mappings" + (client ? " of " + client : "");
  if (!window.confirm("Remove all " + what + "?")) return;
  try {
    const answer = await post("/api/flush", { mechanism: mechanism || null, client: client || null });
    say("Flushed " + answer.deleted + " " + what + ".");
  } catch (error) {
    say("Flush failed: " + error.message, true);
  }
  refresh();
}

async function explain(event) {
  event.preventDefault();
  const form = new FormData($("explain"));
  const body = {};
  for (const [key, value] of form.entries()) body[key] = value;
  body.exact = form.has("exact");
  body.renewal = form.has("renewal");
  const out = $("explain-result");
  out.hidden = false;
  try {
    const answer = await post("/api/explain", body);
    out.textContent = answer.text;
    out.className = "result " + answer.explanation.decision;
  } catch (error) {
    out.textContent = "Cannot explain: " + error.message;
    out.className = "result deny";
  }
}

async function logout() {
  try { await post("/logout", {}); } finally { window.location.assign("/login"); }
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("#mappings th[data-key]").forEach((th) => {
    th.addEventListener("click", () => {
      sortDir = th.dataset.key === sortKey ? -sortDir : 1;
      sortKey = th.dataset.key;
      renderMappings();
    });
  });
  $("filter").addEventListener("input", renderMappings);
  $("flush").addEventListener("click", flush);
  $("explain").addEventListener("submit", explain);
  $("logout").addEventListener("click", logout);
  refresh();
  window.setInterval(refresh, POLL_MS);
});
