// vllm-fleet dashboard: polls /ui/api/snapshot about once a second and draws it.
// Rules this file keeps (the page runs under a strict Content-Security-Policy):
//  - text from the server (names, descriptions, log lines, error messages) is only ever set
//    with textContent or drawn on a canvas: never parsed as HTML;
//  - the key lives in sessionStorage (this tab, until it closes), never in localStorage or a
//    cookie; it is sent as `Authorization: Bearer` to this origin only;
//  - actions go through the admin API (/admin/...), answers and errors shown as it gives them.
"use strict";

(function () {
  const KEY_SLOT = "vllm-fleet.dashboard.key";
  const POLL_MS = 1000;
  const HIDDEN_POLL_MS = 5000;
  const STATES = ["awake", "asleep", "stopped", "activating", "draining", "evicting", "remote",
    "unknown"];
  const ACTIONS = ["switch", "wake", "sleep"];

  const $ = (id) => document.getElementById(id);
  const state = {
    snapshot: null,
    lastOk: 0,
    rows: new Map(),      // model -> {tr, cells, buttons}
    charts: new Map(),    // model -> {card, canvases}
    busy: new Map(),      // model -> action running from this tab
    timer: null,
    polling: false,
    again: false,
  };

  // -- helpers --------------------------------------------------------------------------
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k === "data") Object.assign(node.dataset, v);
      else if (k === "on") Object.entries(v).forEach(([ev, fn]) => node.addEventListener(ev, fn));
      else node.setAttribute(k, v);
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(typeof c === "string" ? document.createTextNode(c) : c);
    }
    return node;
  }

  function setText(node, text) {
    const t = text === null || text === undefined ? "" : String(text);
    if (node.textContent !== t) node.textContent = t;
  }

  function seconds(s) {
    if (s === null || s === undefined) return "-";
    if (s < 10) return s.toFixed(1) + " s";
    if (s < 60) return Math.round(s) + " s";
    if (s < 3600) return Math.floor(s / 60) + " m " + Math.floor(s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " m";
  }

  function clock(unix) {
    const d = new Date(unix * 1000);
    return d.toLocaleTimeString([], { hour12: false });
  }

  function hue(name) {
    let h = 0;
    for (let i = 0; i < name.length; i++) h = (h * 31 + name.charCodeAt(i)) % 360;
    return h;
  }

  function color(name) {
    return name === "other" ? "hsl(0 0% 62%)" : "hsl(" + hue(name) + " 55% 48%)";
  }

  function getKey() {
    try { return sessionStorage.getItem(KEY_SLOT) || ""; } catch (e) { return ""; }
  }

  function headers() {
    const key = getKey();
    return key ? { Authorization: "Bearer " + key } : {};
  }

  async function errorText(resp) {
    try {
      const body = await resp.json();
      if (body && body.error && body.error.message) return body.error.message;
      return JSON.stringify(body);
    } catch (e) {
      return "HTTP " + resp.status;
    }
  }

  function notice(text) {
    const n = $("notice");
    setText(n, text || "");
    n.hidden = !text;
  }

  // -- polling --------------------------------------------------------------------------
  // One poll at a time: a poll asked for while one runs (after an action) follows it at once.
  async function poll() {
    if (state.polling) { state.again = true; return; }
    state.polling = true;
    clearTimeout(state.timer);
    try {
      const resp = await fetch("/ui/api/snapshot", { headers: headers(), cache: "no-store" });
      if (resp.ok) {
        const snap = await resp.json();
        state.snapshot = snap;
        state.lastOk = Date.now();
        render(snap);
        setConn("live", "conn-ok");
      } else {
        const message = await errorText(resp);
        setConn(resp.status === 401 ? "key needed" : "refused", "conn-bad");
        if (resp.status === 401) {
          notice((getKey() ? "That key was refused: " : "This gateway needs a key to show " +
            "its models: enter an API key or the admin key above. ") + message);
          clearData();
        } else {
          notice(message);
        }
      }
    } catch (e) {
      console.error(e);
      setConn("disconnected, retrying", "conn-bad");
    } finally {
      state.polling = false;
    }
    const wait = state.again ? 0 : document.hidden ? HIDDEN_POLL_MS : POLL_MS;
    state.again = false;
    state.timer = setTimeout(poll, wait);
  }

  function setConn(text, cls) {
    const c = $("conn");
    setText(c, text);
    c.className = "conn " + cls;
  }

  function clearData() {
    state.snapshot = null;
    for (const name of [...state.rows.keys()]) dropRow(name);
    for (const name of [...state.charts.keys()]) dropChart(name);
    $("capacity").replaceChildren();
    $("switches").replaceChildren();
    setText($("viewer"), "");
    showAdmin(false);
  }

  // -- rendering ------------------------------------------------------------------------
  function render(snap) {
    const viewer = snap.viewer || {};
    const admin = !!viewer.admin;
    setText($("viewer"), admin ? "admin" : viewer.name ? "key: " + viewer.name :
      viewer.keys_required ? "" : "open gateway (read-only without the admin key)");
    showAdmin(admin);
    setText($("actions-hint"), admin ? "Switch, wake and sleep act through the admin API." :
      viewer.admin_enabled ? "Enter the admin key above to switch, wake, sleep and reload." :
      "Actions are off: this gateway has no admin key (GATEWAY_ADMIN_KEY).");
    setText($("registry"), "registry: " + snap.registry_source);
    notice(snap.fleet_error ? "Fleet: " + snap.fleet_error : "");
    renderModels(snap.models, admin);
    renderCapacity(snap.capacity || []);
    renderSwitches(snap.switches || []);
    renderCharts(snap.series || { t: [], models: {} }, snap.models);
    renderLogChoices(snap.models, admin);
  }

  function showAdmin(admin) {
    document.querySelectorAll(".admin-only").forEach((n) => { n.hidden = !admin; });
  }

  function dropRow(name) {
    const row = state.rows.get(name);
    if (row) row.tr.remove();
    state.rows.delete(name);
  }

  function makeRow(name) {
    const cells = {};
    const cell = (key, label) => (cells[key] = el("td", { class: "c-" + key, data: { label } }));
    const tr = el("tr", { data: { model: name } },
      cell("model", "Model"), cell("state", "State"), cell("replicas", "Replicas"),
      cell("inflight", "In flight"), cell("queued", "Queued"), cell("wait", "Oldest wait"),
      cell("resident", "Resident"), cell("ttl", "TTL left"), cell("actions", "Actions"));
    cells.actions.classList.add("admin-only");
    cells.model.append(
      el("div", { class: "name" }), el("div", { class: "aliases muted" }),
      el("div", { class: "description" }));
    cells.state.append(el("span", { class: "state" }), el("div", { class: "detail muted" }));
    const buttons = {};
    for (const action of [...ACTIONS, "logs"]) {
      buttons[action] = el("button", {
        type: "button", class: "act act-" + action, data: { action },
        text: action[0].toUpperCase() + action.slice(1),
        on: { click: () => (action === "logs" ? showLogs(name) : act(action, name)) },
      });
      cells.actions.append(buttons[action]);
    }
    return { tr, cells, buttons };
  }

  function renderModels(models, admin) {
    const body = $("model-rows");
    const seen = new Set();
    models.forEach((m, i) => {
      seen.add(m.name);
      let row = state.rows.get(m.name);
      if (!row) {
        row = makeRow(m.name);
        state.rows.set(m.name, row);
      }
      if (body.children[i] !== row.tr) body.insertBefore(row.tr, body.children[i] || null);
      const c = row.cells;
      setText(c.model.querySelector(".name"), m.name);
      setText(c.model.querySelector(".aliases"), m.aliases.length ? "aka " + m.aliases.join(", ") : "");
      setText(c.model.querySelector(".description"), m.description);
      const badge = c.state.querySelector(".state");
      const st = STATES.includes(m.state) ? m.state : "unknown";
      setText(badge, st);
      badge.className = "state state-" + st;
      setText(c.state.querySelector(".detail"), m.detail);
      setText(c.replicas, m.replicas.map(replicaText).join("\n"));
      setText(c.inflight, m.max_concurrency ? m.in_flight + " / " + m.max_concurrency : m.in_flight);
      setText(c.queued, m.queued);
      c.queued.classList.toggle("hot", m.queued > 0);
      setText(c.wait, seconds(m.oldest_wait));
      setText(c.resident, seconds(m.time_resident) + (m.quantum_left === null ? "" :
        "\nquantum " + seconds(m.quantum_left) + " left" + (m.rival ? " (" + m.rival + " waits)" : "")));
      setText(c.ttl, m.ttl === null || m.state !== "awake" ? "-" :
        m.ttl_left === null ? "busy (ttl " + seconds(m.ttl) + ")" : seconds(m.ttl_left));
      c.actions.hidden = !admin;
      const running = state.busy.get(m.name);
      for (const [action, b] of Object.entries(row.buttons)) {
        b.hidden = !m.managed;
        b.disabled = action !== "logs" && !!running;
      }
    });
    for (const name of [...state.rows.keys()]) if (!seen.has(name)) dropRow(name);
    $("no-models").hidden = models.length > 0;
  }

  function replicaText(r) {
    const where = (r.node || "") + (r.port ? ":" + r.port : "");
    const flags = [r.state !== "-" ? r.state : null, r.ejected ? "ejected" : null,
      r.outstanding ? r.outstanding + " out" : null].filter(Boolean);
    return "#" + r.index + " " + where + (flags.length ? " (" + flags.join(", ") + ")" : "");
  }

  function renderCapacity(bars) {
    const box = $("capacity");
    box.replaceChildren(...bars.map((bar) => {
      const track = el("div", { class: "track" });
      const add = (cls, amount, title, bg) => {
        const seg = el("div", { class: "seg " + cls, title });
        seg.style.width = Math.max(0, Math.min(100, (amount / bar.capacity) * 100)) + "%";
        if (bg) seg.style.backgroundColor = bg;
        track.append(seg);
      };
      if (bar.reserved) add("reserved", bar.reserved, "gateway: " + bar.reserved, null);
      bar.shares.forEach((s) => add("share", s.amount, s.model + ": " + s.amount + " (" + s.state + ")", color(s.model)));
      const mark = el("div", { class: "ceiling", title: "ceiling " + bar.ceiling });
      mark.style.left = Math.min(100, (bar.ceiling / bar.capacity) * 100) + "%";
      track.append(mark);
      const used = bar.shares.reduce((a, s) => a + s.amount, bar.reserved || 0);
      const legend = el("div", { class: "legend" }, ...bar.shares.map((s) => {
        const dot = el("span", { class: "dot" });
        dot.style.backgroundColor = color(s.model);
        return el("span", { class: "item" }, dot, s.model + " " + fmtAmount(s.amount, bar.unit));
      }));
      return el("div", { class: "bar", data: { bar: bar.id } },
        el("div", { class: "bar-head" }, el("strong", { text: bar.label }),
          el("span", { class: "muted", text: " " + fmtAmount(used, bar.unit) + " of " +
            fmtAmount(bar.ceiling, bar.unit) + (bar.unit === "fraction" ? " ceiling" : "") })),
        track, legend);
    }));
    $("no-capacity").hidden = bars.length > 0;
  }

  function fmtAmount(v, unit) {
    if (unit !== "cores") return (Math.round(v * 100) / 100).toString();
    const n = Math.round(v * 10) / 10;
    return n + (n === 1 ? " core" : " cores");
  }

  function renderSwitches(switches) {
    $("switches").replaceChildren(...switches.map((s) => {
      const phases = ["evict", "start", "healthy"].filter((p) => s.timings[p] !== undefined);
      const total = s.timings.total || phases.reduce((a, p) => a + s.timings[p], 0) || s.seconds;
      const bar = el("div", { class: "phases" }, ...phases.map((p) => {
        const seg = el("div", { class: "phase phase-" + p, title: p + " " + s.timings[p] + " s" });
        seg.style.width = (total ? (s.timings[p] / total) * 100 : 0) + "%";
        return seg;
      }));
      const timing = phases.map((p) => p + " " + seconds(s.timings[p])).join(" · ");
      return el("li", { class: "switch outcome-" + s.outcome, data: { model: s.model } },
        el("div", { class: "switch-head" },
          el("span", { class: "when muted", text: clock(s.at) }),
          el("strong", { text: s.operation + " " + s.model }),
          el("span", { class: "outcome", text: s.outcome.replace("_", " ") }),
          el("span", { class: "muted", text: seconds(s.seconds) })),
        phases.length ? bar : null,
        timing ? el("div", { class: "timings muted", text: timing }) : null,
        s.reason ? el("div", { class: "reason", text: s.reason }) : null);
    }));
    $("no-switches").hidden = switches.length > 0;
  }

  // -- charts (canvas, drawn here) --------------------------------------------------------
  function dropChart(name) {
    const ch = state.charts.get(name);
    if (ch) ch.card.remove();
    state.charts.delete(name);
  }

  function renderCharts(series, models) {
    const box = $("charts");
    const names = models.map((m) => m.name);
    names.forEach((name, i) => {
      let ch = state.charts.get(name);
      if (!ch) {
        const canvases = {};
        const fig = (key, label) => el("figure", {},
          (canvases[key] = el("canvas", { width: "220", height: "60", "aria-label": label })),
          el("figcaption", { class: "muted", text: label }));
        const card = el("div", { class: "chart", data: { model: name } },
          el("div", { class: "chart-name", text: name }),
          fig("rate", "requests/s"), fig("ttft", "time to first token, ms (streams)"), fig("errors", "errors/s"));
        ch = { card, canvases };
        state.charts.set(name, ch);
      }
      if (box.children[i] !== ch.card) box.insertBefore(ch.card, box.children[i] || null);
      const s = (series.models || {})[name] || { rate: [], ttft: [], errors: [] };
      ch.card.dataset.points = String(s.rate.length);
      draw(ch.canvases.rate, s.rate, "hsl(210 70% 45%)", (v) => v.toFixed(2));
      draw(ch.canvases.ttft, s.ttft.map((v) => (v === null ? null : v * 1000)), "hsl(150 55% 35%)",
        (v) => Math.round(v) + " ms");
      draw(ch.canvases.errors, s.errors, "hsl(0 65% 48%)", (v) => v.toFixed(2));
    });
    for (const name of [...state.charts.keys()]) if (!names.includes(name)) dropChart(name);
  }

  function draw(canvas, values, stroke, label) {
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || 220, h = canvas.clientHeight || 60;
    if (canvas.width !== Math.round(w * ratio)) canvas.width = Math.round(w * ratio);
    if (canvas.height !== Math.round(h * ratio)) canvas.height = Math.round(h * ratio);
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, w, h);
    g.strokeStyle = "rgba(128,128,128,0.35)";
    g.beginPath(); g.moveTo(0, h - 0.5); g.lineTo(w, h - 0.5); g.stroke();
    const known = values.filter((v) => v !== null);
    if (!known.length) {
      g.fillStyle = "rgba(128,128,128,0.9)";
      g.font = "11px sans-serif";
      g.fillText(values.length ? "no data" : "collecting", 4, h / 2 + 4);
      return;
    }
    const peak = Math.max(...known);
    const max = peak || 1;
    const n = Math.max(values.length - 1, 1);
    const top = 14;
    g.strokeStyle = stroke;
    g.lineWidth = 1.5;
    g.beginPath();
    let pen = false;
    values.forEach((v, i) => {
      if (v === null) { pen = false; return; }
      const x = (i / n) * (w - 2) + 1;
      const y = h - 2 - (v / max) * (h - top - 2);
      if (pen) g.lineTo(x, y); else g.moveTo(x, y);
      pen = true;
    });
    g.stroke();
    g.fillStyle = stroke;  // a value with no neighbour draws no line: a dot then
    values.forEach((v, i) => {
      if (v === null || (values[i - 1] ?? null) !== null || (values[i + 1] ?? null) !== null) return;
      g.beginPath();
      g.arc((i / n) * (w - 2) + 1, h - 2 - (v / max) * (h - top - 2), 2, 0, 2 * Math.PI);
      g.fill();
    });
    const last = [...values].reverse().find((v) => v !== null);
    g.fillStyle = "rgba(90,90,90,1)";
    g.font = "11px sans-serif";
    g.fillText("now " + label(last) + " · max " + label(peak), 4, 11);
  }

  // -- actions (admin key) ----------------------------------------------------------------
  async function act(action, model) {
    const path = action === "reload" ? "/admin/reload" : "/admin/" + action + "/" + encodeURIComponent(model);
    const started = performance.now();
    const label = action + (model ? " " + model : "");
    const status = el("span", { class: "status", text: "running" });
    const entry = el("li", { class: "action running", data: { action, model: model || "" } },
      el("span", { class: "when muted", text: clock(Date.now() / 1000) }), el("strong", { text: label }), status);
    $("actions").prepend(entry);
    while ($("actions").children.length > 20) $("actions").lastChild.remove();
    if (model) state.busy.set(model, action);
    const tick = setInterval(() => setText(status, "running " + seconds((performance.now() - started) / 1000)), 250);
    poll();
    try {
      const resp = await fetch(path, { method: "POST", headers: headers(), cache: "no-store" });
      const took = seconds((performance.now() - started) / 1000);
      if (resp.ok) {
        const body = await resp.json();
        entry.className = "action ok";
        setText(status, "done in " + took + (body.seconds !== undefined ? " (server " + seconds(body.seconds) + ")" : "") +
          (action === "reload" ? ": " + JSON.stringify(body) : ""));
      } else {
        entry.className = "action failed";
        setText(status, "HTTP " + resp.status + " after " + took + ": " + (await errorText(resp)));
      }
    } catch (e) {
      entry.className = "action failed";
      setText(status, "no answer: " + e);
    } finally {
      clearInterval(tick);
      if (model) state.busy.delete(model);
      poll();
    }
  }

  // -- logs (admin key) --------------------------------------------------------------------
  function renderLogChoices(models, admin) {
    const select = $("logs-model");
    const managed = admin ? models.filter((m) => m.managed).map((m) => m.name) : [];
    const current = [...select.options].map((o) => o.value);
    if (current.join("\n") !== managed.join("\n")) {
      const keep = select.value;
      select.replaceChildren(...managed.map((n) => el("option", { value: n, text: n })));
      if (managed.includes(keep)) select.value = keep;
    }
  }

  function showLogs(model) {
    $("logs-model").value = model;
    loadLogs();
    $("logs-section").scrollIntoView({ behavior: "smooth", block: "start" });
  }

  async function loadLogs() {
    const model = $("logs-model").value;
    if (!model) return;
    setText($("logs-status"), "loading " + model);
    try {
      const resp = await fetch("/ui/api/logs/" + encodeURIComponent(model) + "?n=200",
        { headers: headers(), cache: "no-store" });
      if (resp.ok) {
        const body = await resp.json();
        setText($("logs"), body.lines.join("\n"));
        setText($("logs-status"), body.model + " replica " + body.replica + ": " +
          body.lines.length + " lines at " + clock(Date.now() / 1000));
      } else {
        setText($("logs-status"), "HTTP " + resp.status + ": " + (await errorText(resp)));
      }
    } catch (e) {
      setText($("logs-status"), "no answer: " + e);
    }
  }

  // -- wiring ------------------------------------------------------------------------------
  function init() {
    $("key-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const key = $("key").value.trim();
      $("key").value = "";
      try {
        if (key) sessionStorage.setItem(KEY_SLOT, key); else sessionStorage.removeItem(KEY_SLOT);
      } catch (e) { /* storage off: the key is not kept */ }
      clearData();
      poll();
    });
    $("key-forget").addEventListener("click", () => {
      try { sessionStorage.removeItem(KEY_SLOT); } catch (e) { /* nothing kept */ }
      clearData();
      poll();
    });
    $("reload").addEventListener("click", () => act("reload", ""));
    $("logs-load").addEventListener("click", loadLogs);
    setInterval(() => {
      if ($("logs-follow").checked && !$("logs-section").hidden) loadLogs();
      if (state.lastOk && Date.now() - state.lastOk > 5000) {
        setConn("stale for " + seconds((Date.now() - state.lastOk) / 1000), "conn-bad");
      }
    }, 2000);
    document.addEventListener("visibilitychange", () => { if (!document.hidden) poll(); });
    poll();
  }

  init();
})();
