// The serve page of a `kind: serve` job: polls /api/jobs/{id}/serve every 2 s and charts
// requests/s, tokens/s, batch occupancy and latency percentiles over time (Plotly).
"use strict";

(() => {
  const jobId = decodeURIComponent(location.pathname.split("/")[2] || "");
  const link = document.getElementById("job-link");
  link.textContent = jobId;
  link.setAttribute("href", `/jobs/${encodeURIComponent(jobId)}`);
  const layout = { height: 260, margin: { l: 50, r: 20, t: 10, b: 40 }, showlegend: true,
    xaxis: { type: "date" } };
  const line = (name) => ({ type: "scatter", mode: "lines", name, x: [], y: [] });
  const charts = {
    "load-chart": ["requests_per_s", "tokens_per_s"],
    "occ-chart": ["occupancy"],
    "lat-chart": ["ttft_p50_ms", "ttft_p99_ms", "token_p50_ms", "token_p99_ms"],
  };
  let ready = false;
  function init() {
    if (!window.Plotly) return;
    for (const [id, keys] of Object.entries(charts)) {
      Plotly.newPlot(id, keys.map(line), layout, { displayModeBar: false, responsive: true });
    }
    ready = true;
  }
  function stat(label, value) {
    return PL.el("div", { class: "stat" }, PL.el("div", { class: "label", text: label }),
      PL.el("div", { class: "value", text: value }));
  }
  async function poll() {
    let s;
    try {
      s = await PL.api(`/api/jobs/${encodeURIComponent(jobId)}/serve`);
      document.getElementById("live-text").textContent = "live";
    } catch (e) {
      document.getElementById("live-text").textContent = "offline";
      return;
    }
    const msg = document.getElementById("message");
    if (!s.status) {
      msg.hidden = false;
      msg.textContent = "This job is not serving.";
      return;
    }
    msg.hidden = true;
    s.occupancy = s.slots ? s.inflight / s.slots : 0;
    const stats = PL.clear(document.getElementById("stats"));
    stats.append(stat("status", s.status), stat("replicas", s.replicas.join(", ")),
      stat("requests", s.requests), stat("tokens", s.tokens),
      stat("KV cache", `${(s.kv_cache_bytes / 2 ** 20).toFixed(1)} MiB`));
    if (!ready) init();
    if (!ready) return;
    const now = new Date();
    for (const [id, keys] of Object.entries(charts)) {
      Plotly.extendTraces(id, { x: keys.map(() => [now]), y: keys.map((k) => [s[k]]) },
        keys.map((_, i) => i), 1800);
    }
  }
  poll();
  setInterval(poll, 2000);
})();
