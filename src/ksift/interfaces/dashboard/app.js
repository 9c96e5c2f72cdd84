// ksift dashboard: plain JavaScript, no build step, nothing loaded from the network.
// Every piece of alert data reaches the page as text nodes (textContent), never parsed as markup.
"use strict";

(function () {
  const MAX_ALERTS = 100;
  const MAX_ACTIONS = 50;
  const FUNNEL_POLL_MS = 2000;
  const INCIDENTS_POLL_MS = 5000;
  const STATUS_POLL_MS = 15000;

  const numberFormat = new Intl.NumberFormat("en-US", { maximumFractionDigits: 1 });
  const alertIds = new Set();
  let previousFunnel = null;

  function byId(id) {
    return document.getElementById(id);
  }

  // Build an element from a tag, attributes and children (strings become text nodes).
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined) continue;
      if (name === "class") node.className = value;
      else node.setAttribute(name, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function setText(id, value) {
    const node = byId(id);
    if (node) node.textContent = value;
  }

  function fmt(n) {
    return typeof n === "number" && isFinite(n) ? numberFormat.format(n) : "–";
  }

  function plural(n, noun) {
    return fmt(n) + " " + noun + (n === 1 ? "" : "s");
  }

  function shortTime(ts) {
    if (!ts) return "";
    const date = new Date(ts);
    return isNaN(date) ? String(ts) : date.toLocaleTimeString();
  }

  function showBanner(message) {
    const banner = byId("banner");
    if (message) {
      banner.textContent = message;
      banner.hidden = false;
    } else {
      banner.hidden = true;
    }
  }

  async function getJSON(path) {
    const response = await fetch(path, { credentials: "same-origin", cache: "no-store" });
    if (response.status === 401) {
      showBanner("This agent requires a token: open /?token=YOUR_TOKEN once in this browser.");
      throw new Error("unauthorized");
    }
    const body = await response.json();
    if (!response.ok && response.status !== 503) {
      throw new Error(body && body.error ? body.error : "HTTP " + response.status);
    }
    return { status: response.status, body: body };
  }

  // -- funnel ----------------------------------------------------------------

  function rate(current, previous, key, seconds) {
    if (!previous || seconds <= 0) return null;
    return Math.max(0, (current.summary[key] - previous.summary[key]) / seconds);
  }

  // Log scale: a bar's length is its number of decimal digits relative to the largest stage.
  function setBar(id, value, largest) {
    const width = value > 0 && largest > 0 ? Math.max(2, (100 * Math.log10(value + 1)) / Math.log10(largest + 1)) : 0;
    byId(id).style.width = width.toFixed(1) + "%";
  }

  function renderFunnel(report) {
    const s = report.summary;
    const seconds = previousFunnel ? report.ts - previousFunnel.ts : 0;
    const kernelRate = rate(report, previousFunnel, "kernel_events", seconds);
    const recordsRate = rate(report, previousFunnel, "records_emitted", seconds);
    previousFunnel = report;

    setText("funnel-kernel-total", fmt(s.kernel_events));
    setText("funnel-records-total", fmt(s.records_emitted));
    setText("funnel-dropped", fmt(s.records_dropped));
    setText("funnel-alerts-total", fmt(s.alerts_opened));
    setText("funnel-resolved-total", fmt(s.alerts_resolved));
    setText("funnel-open-incidents", fmt(s.open_incidents));
    setText("funnel-kernel-rate", kernelRate === null ? "–" : fmt(kernelRate));
    setText("funnel-records-rate", recordsRate === null ? "–" : fmt(recordsRate));
    byId("funnel-dropped").className = s.records_dropped > 0 ? "bad" : "";

    const largest = Math.max(s.kernel_events, s.records_emitted, s.alerts_opened);
    setBar("bar-kernel", s.kernel_events, largest);
    setBar("bar-records", s.records_emitted, largest);
    setBar("bar-alerts", s.alerts_opened, largest);

    let ratio = "";
    if (s.alerts_opened > 0) {
      ratio = plural(s.kernel_events, "kernel event") + " → " + plural(s.records_emitted, "record") + " → " +
        plural(s.alerts_opened, "alert") + ": about " + fmt(Math.round(s.kernel_events / s.alerts_opened)) +
        " events per alert.";
    } else if (s.kernel_events > 0) {
      ratio = plural(s.kernel_events, "kernel event") + ", " + plural(s.records_emitted, "record") + ", no alert yet.";
    }
    setText("funnel-ratio", ratio);
  }

  async function pollFunnel() {
    try {
      const { body } = await getJSON("/api/v1/funnel");
      renderFunnel(body);
    } catch (err) {
      setText("host-status", "agent unreachable");
      byId("host-status").className = "pill bad";
    }
  }

  // -- status ------------------------------------------------------------------

  async function pollStatus() {
    try {
      const ready = await getJSON("/readyz");
      const pill = byId("host-status");
      if (ready.status === 200) {
        pill.textContent = "ready";
        pill.className = "pill good";
        showBanner(null);
      } else {
        pill.textContent = "not ready";
        pill.className = "pill bad";
        pill.title = ready.body.reason || "";
      }
      const { body } = await getJSON("/api/v1/status");
      const sensors = body.sensors.map((s) => s.name + " (" + s.attached.length + " programs)").join(", ");
      setText("version", "v" + body.version + " · pid " + body.pid + " · sensors: " + (sensors || "none"));
    } catch (err) {
      /* shown by the funnel poll */
    }
  }

  // -- incidents ---------------------------------------------------------------

  function subjectLine(subject) {
    if (!subject) return "";
    const parts = ["PID " + subject.pid, subject.comm ? "(" + subject.comm + ")" : ""];
    if (subject.exe) parts.push(subject.exe);
    return parts.filter(Boolean).join(" ");
  }

  function contextList(subject, ancestry) {
    const list = el("dl", { class: "context" });
    function add(label, value) {
      if (value === null || value === undefined || value === "") return;
      list.append(el("dt", null, label), el("dd", null, value));
    }
    if (subject) {
      add("command", Array.isArray(subject.cmdline) ? subject.cmdline.join(" ") : subject.cmdline);
      add("user", subject.uid);
      add("cgroup", subject.cgroup);
      add("container", subject.container_id ? subject.container_id.slice(0, 12) + " (" + subject.container_runtime + ")" : null);
      add("pod", subject.pod_uid);
      add("unit", subject.systemd_unit);
    }
    if (Array.isArray(ancestry) && ancestry.length) {
      add("ancestry", ancestry.map((a) => a.pid + " " + a.comm).join(" ← "));
    }
    return list;
  }

  function renderIncidents(incidents) {
    const box = byId("incidents");
    setText("incidents-count", String(incidents.length));
    if (!incidents.length) {
      box.replaceChildren(el("p", { class: "empty" }, "No open incidents."));
      return;
    }
    box.replaceChildren(...incidents.map((inc) => el("article", { class: "card sev-" + inc.severity, "data-incident-id": inc.incident_id },
      el("header", null,
        el("span", { class: "badge sev-" + inc.severity }, inc.severity),
        el("strong", null, inc.rule),
        el("span", { class: "muted" }, " since " + shortTime(inc.opened_at))),
      el("p", { class: "summary" }, inc.summary),
      el("p", { class: "figures" },
        fmt(inc.count) + " events · peak " + fmt(inc.peak_window_count) + " in " + inc.window_s + "s (threshold " +
        inc.threshold + ") · " + fmt(inc.suppressed) + " folded",
        inc.degraded ? el("span", { class: "bad" }, " · " + inc.degraded.records_lost + " records lost") : null),
      el("p", { class: "subject" }, subjectLine(inc.subject)),
      contextList(inc.subject, inc.ancestry))));
  }

  async function pollIncidents() {
    try {
      const { body } = await getJSON("/api/v1/incidents");
      renderIncidents(body.incidents);
    } catch (err) {
      /* shown by the funnel poll */
    }
  }

  // -- alerts and actions --------------------------------------------------------

  function alertItem(alert) {
    const details = el("details", null,
      el("summary", null, "context"),
      contextList(alert.subject, alert.ancestry),
      el("pre", null, JSON.stringify(alert, null, 2)));
    return el("li", { class: "alert status-" + alert.status, "data-alert-id": alert.id },
      el("span", { class: "time" }, shortTime(alert.ts)),
      el("span", { class: "badge sev-" + alert.severity }, alert.severity),
      el("span", { class: "badge status" }, alert.status),
      el("strong", null, alert.rule),
      el("span", { class: "summary" }, alert.summary),
      details);
  }

  function addAlert(alert, atTop) {
    if (!alert || !alert.id || alertIds.has(alert.id)) return;
    alertIds.add(alert.id);
    const list = byId("alerts");
    const empty = list.querySelector(".empty");
    if (empty) empty.remove();
    const item = alertItem(alert);
    if (atTop) list.prepend(item);
    else list.append(item);
    while (list.children.length > MAX_ALERTS) {
      const last = list.lastElementChild;
      alertIds.delete(last.getAttribute("data-alert-id"));
      last.remove();
    }
  }

  async function loadRecentAlerts() {
    try {
      const { body } = await getJSON("/api/v1/alerts?limit=" + MAX_ALERTS);
      // The API returns oldest first; the list shows newest first.
      for (const alert of body.alerts.slice().reverse()) addAlert(alert, false);
    } catch (err) {
      /* shown by the funnel poll */
    }
  }

  function addAction(action) {
    const list = byId("actions");
    const empty = list.querySelector(".empty");
    if (empty) empty.remove();
    const what = action.action || action.kind || "action";
    const target = action.target || action.subject || {};
    list.prepend(el("li", { class: "action state-" + (action.state || action.status || "unknown") },
      el("span", { class: "time" }, shortTime(action.ts)),
      el("span", { class: "badge" }, action.state || action.status || ""),
      el("strong", null, what),
      el("span", { class: "summary" }, action.summary || action.reason || (target.pid ? "PID " + target.pid : "")),
      el("details", null, el("summary", null, "details"), el("pre", null, JSON.stringify(action, null, 2)))));
    while (list.children.length > MAX_ACTIONS) list.lastElementChild.remove();
  }

  // -- the event stream ------------------------------------------------------------

  function connectStream() {
    const pill = byId("stream-status");
    const source = new EventSource("/api/v1/events");
    source.onopen = () => {
      pill.textContent = "live";
      pill.className = "pill good";
    };
    source.onerror = () => {
      // EventSource reconnects by itself (and resumes with Last-Event-ID).
      pill.textContent = "stream: reconnecting…";
      pill.className = "pill bad";
    };
    source.addEventListener("alert", (event) => {
      addAlert(JSON.parse(event.data), true);
      pollIncidents();
    });
    source.addEventListener("action", (event) => addAction(JSON.parse(event.data)));
    source.addEventListener("lost", (event) => {
      const lost = JSON.parse(event.data).lost;
      setText("sse-lost", "this page was too slow and missed " + lost + " event(s); reload to catch up");
    });
  }

  function start() {
    pollStatus();
    pollFunnel();
    loadRecentAlerts();
    pollIncidents();
    connectStream();
    setInterval(pollFunnel, FUNNEL_POLL_MS);
    setInterval(pollIncidents, INCIDENTS_POLL_MS);
    setInterval(pollStatus, STATUS_POLL_MS);
  }

  document.addEventListener("DOMContentLoaded", start);
})();
