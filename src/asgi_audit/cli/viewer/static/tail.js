// The live tail: rows for the records the server sends as events.
// Record text is untrusted: it only ever goes into textContent (never innerHTML), and
// links come from the server's own href field. Served from /static under the viewer's
// CSP (script-src 'self'): no inline script, no eval.
"use strict";

(function () {
  const rows = document.getElementById("tail-rows");
  const status = document.getElementById("tail-status");
  if (!rows || !status) {
    return;
  }
  const MAX_ROWS = 500;
  const shown = new Set();
  let received = 0;

  function cell(row, text, className) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "-" : String(text);
    if (className) {
      td.className = className;
    }
    row.appendChild(td);
    return td;
  }

  function add(record) {
    if (typeof record.id !== "string" || shown.has(record.id)) {
      return;
    }
    shown.add(record.id);
    const row = document.createElement("tr");
    row.dataset.id = record.id;
    cell(row, record.started_at, "time");
    cell(row, record.method, "method");
    const statusCell = cell(row, "", "");
    const badge = document.createElement("span");
    const code = typeof record.status === "number" ? record.status : null;
    badge.className = "status s" + (code ? Math.floor(code / 100) : 0);
    badge.textContent = code === null ? "-" : String(code);
    statusCell.textContent = "";
    statusCell.appendChild(badge);
    const pathCell = cell(row, "", "path");
    const link = document.createElement("a");
    if (typeof record.href === "string" && record.href.startsWith("/records/")) {
      link.href = record.href;
    }
    link.textContent = record.path;
    pathCell.textContent = "";
    pathCell.appendChild(link);
    cell(row, record.route, "route");
    cell(row, record.duration, "number");
    cell(row, record.request_size, "number");
    cell(row, record.response_size, "number");
    cell(row, record.outcome, record.outcome === "complete" ? "outcome" : "outcome bad");
    rows.insertBefore(row, rows.firstChild);
    while (rows.rows.length > MAX_ROWS) {
      const last = rows.lastElementChild;
      shown.delete(last.dataset.id);
      last.remove();
    }
    received += 1;
    status.textContent = "live · " + received + " new";
  }

  const source = new EventSource(rows.dataset.events);
  source.addEventListener("open", function () {
    status.textContent = "connected…";
  });
  source.addEventListener("ready", function () {
    status.textContent = "live · " + received + " new";
  });
  source.addEventListener("record", function (event) {
    try {
      add(JSON.parse(event.data));
    } catch (error) {
      status.textContent = "an event did not read: " + error;
    }
  });
  source.addEventListener("problem", function (event) {
    try {
      status.textContent = "the sink failed: " + JSON.parse(event.data).message;
    } catch (error) {
      status.textContent = "the sink failed";
    }
  });
  source.addEventListener("error", function () {
    status.textContent = "reconnecting…";
  });
})();
