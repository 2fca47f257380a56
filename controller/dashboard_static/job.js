// One job: live loss, throughput and MFU charts, events, log tail, why pending, cancel.
"use strict";

(() => {
  const { el, clear, api, fmt, badge, progress, stream, chartLayout, chartConfig } = PL;
  const jobId = decodeURIComponent(location.pathname.split("/").pop());
  const MAX_LOG_LINES = 500;
  let job = null;
  let lastStep = -1;
  let chartsReady = false;
  const pendingPoints = [];

  // The peak FLOP/s the job's MFU is measured against (from the job's detail).
  let peakFlops = null;

  function renderJob(j) {
    job = j;
    document.title = `pathways-lite · ${j.name}`;
    document.getElementById("crumb-id").textContent = j.id;
    document.getElementById("job-name").textContent = j.name;
    document.getElementById("job-id").textContent = j.id;
    document.getElementById("job-model").textContent = j.model;
    const state = document.getElementById("job-state");
    state.className = `badge state-${j.state}`;
    state.textContent = j.phase ? `${j.state} · ${j.phase}` : j.state;
    const serveLink = document.getElementById("serve-link");
    serveLink.hidden = j.phase !== "serving";
    serveLink.setAttribute("href", `/jobs/${encodeURIComponent(j.id)}/serve`);
    document.getElementById("cancel").hidden = ["succeeded", "failed", "cancelled"].includes(j.state);
    const message = document.getElementById("message");
    message.hidden = !j.message;
    message.textContent = j.message;
    const elapsed = j.started ? ((j.finished || Date.now() / 1000) - j.started) : null;
    const remaining = j.steps_completed && j.state === "running" && elapsed
      ? (elapsed / j.steps_completed) * (j.steps - j.steps_completed) : null;
    const stats = [
      ["Progress", progress(j.steps_completed, j.steps)],
      ["Loss", fmt.num(j.loss, 4)],
      ["Tokens/s", fmt.rate(j.tokens_per_s)],
      ["MFU", peakFlops ? `${fmt.pct(j.mfu)} of ${fmt.flops(peakFlops)}` : fmt.pct(j.mfu)],
      ["Elapsed", fmt.duration(elapsed)],
      ["ETA", fmt.duration(remaining)],
      ["Islands", j.islands.join(", ") || "–"],
      ["Priority / weight", `${j.priority} / ${j.weight}`],
      ["Queue position", j.queue_position || "–"],
    ];
    clear(document.getElementById("stats")).append(...stats.map(([label, value]) =>
      el("div", { class: "stat" }, el("div", { class: "stat-label", text: label }),
        el("div", { class: "stat-value", "data-stat": label }, value))));
  }

  function renderWhy(why, ahead) {
    const box = document.getElementById("why");
    box.hidden = !job || job.state !== "queued";
    let text = why || "";
    if (ahead && ahead.length) text += ` Jobs ahead: ${ahead.join(", ")}.`;
    document.getElementById("why-text").textContent = text;
  }

  function addEvent(e, prepend) {
    const row = el("tr", {}, el("td", { class: "mono", text: fmt.time(e.time) }),
      el("td", {}, el("span", { class: `kind kind-${e.kind}`, text: e.kind })),
      el("td", { class: "event-message", text: e.message }));
    const tbody = document.querySelector("#events tbody");
    if (prepend) tbody.prepend(row); else tbody.append(row);
  }

  function addLog(r) {
    const logs = document.getElementById("logs");
    logs.append(el("div", { class: `log level-${r.level}` },
      el("span", { class: "log-time", text: fmt.time(r.time) }),
      el("span", { class: "log-source", text: r.source }),
      el("span", { class: "log-message", text: r.message })));
    while (logs.childElementCount > MAX_LOG_LINES) logs.firstElementChild.remove();
    if (document.getElementById("follow").checked) logs.scrollTop = logs.scrollHeight;
  }

  // Which job this one came from (init_from's checkpoint), what it waits for, what follows.
  function renderChain(chain) {
    const box = document.getElementById("chain");
    const text = document.getElementById("chain-text");
    clear(text);
    const link = (j) => el("a", { href: `/jobs/${encodeURIComponent(j.id)}`, text: `${j.name || j.id} (${j.state})` });
    const parts = [];
    if (chain.init_from) {
      const from = [document.createTextNode("parameters from ")];
      if (chain.init_from.job) from.push(link(chain.init_from.job), document.createTextNode("'s checkpoint "));
      else from.push(document.createTextNode("checkpoint "));
      from.push(el("span", { class: "mono", text: chain.init_from.checkpoint || (chain.init_from.step !== null ? `at step ${chain.init_from.step}` : "(its last, once it succeeds)") }));
      parts.push(from);
    }
    if (chain.after.length) parts.push([document.createTextNode("after "), ...chain.after.flatMap((j, i) => i ? [document.createTextNode(", "), link(j)] : [link(j)])]);
    if (chain.children.length) parts.push([document.createTextNode("followed by "), ...chain.children.flatMap((j, i) => {
      const item = [link(j), document.createTextNode(j.how === "init_from" ? " (from its checkpoint)" : " (after)")];
      return i ? [document.createTextNode(", "), ...item] : item;
    })]);
    parts.forEach((p, i) => { if (i) text.append(document.createTextNode(" · ")); text.append(...p); });
    box.hidden = !parts.length;
  }

  function renderEvals(evals) {
    document.getElementById("eval-card").hidden = !evals.length;
    const tbody = clear(document.querySelector("#evals tbody"));
    const num = (v, d) => (v === undefined || v === null ? "–" : fmt.num(v, d));
    for (const e of evals.slice().reverse()) {
      for (const [name, s] of Object.entries(e.sources)) {
        tbody.append(el("tr", {}, el("td", { class: "mono", text: String(e.step) }), el("td", { text: String(e.shots) }),
          el("td", { text: name }), el("td", { text: num(s.loss, 4) }), el("td", { text: num(s.perplexity, 2) }),
          el("td", { text: num(s.exact_match, 3) }), el("td", { text: num(s.token_f1, 3) }), el("td", { text: String(s.examples) })));
      }
    }
  }

  // The evaluations' loss per source, as markers on the loss chart beside the training loss.
  function evalTraces(evals) {
    const bySource = {};
    for (const e of evals) {
      for (const [name, s] of Object.entries(e.sources)) {
        (bySource[name] = bySource[name] || { x: [], y: [] });
        bySource[name].x.push(e.step);
        bySource[name].y.push(s.loss);
      }
    }
    return Object.entries(bySource).map(([name, xy]) => ({ type: "scatter", mode: "markers+lines",
      x: xy.x, y: xy.y, name: `eval ${name}`, line: { dash: "dot", width: 1 }, marker: { size: 8 } }));
  }

  const CHARTS = [
    ["loss-chart", "loss", "#4f8cff", {}],
    ["tps-chart", "tokens_per_s", "#2fbf71", {}],
    ["mfu-chart", "mfu", "#e0a030", { tickformat: ".1%" }],
  ];
  // Before the first step a chart says so instead of drawing empty axes.
  const EMPTY = { annotations: [{ text: "no steps yet", showarrow: false, xref: "paper", yref: "paper",
    x: 0.5, y: 0.5, font: { size: 14, color: "#8a94a6" } }] };

  function initCharts(metrics, evals) {
    if (!window.Plotly) return;
    const steps = metrics.map((m) => m.step);
    const line = (color) => ({ type: "scatter", mode: "lines", line: { color, width: 2 } });
    for (const [id, key, color, yaxis] of CHARTS) {
      const layout = Object.assign({}, chartLayout, { height: 260,
        xaxis: Object.assign({}, chartLayout.xaxis, { title: { text: "step" }, visible: steps.length > 0 }),
        yaxis: Object.assign({}, chartLayout.yaxis, yaxis, { visible: steps.length > 0 }) },
        steps.length ? {} : EMPTY);
      Plotly.newPlot(id, [Object.assign(line(color), { x: steps, y: metrics.map((m) => m[key]), name: key })],
        layout, chartConfig);
    }
    const traces = evalTraces(evals || []);
    if (traces.length) {
      Plotly.addTraces("loss-chart", traces);
      Plotly.relayout("loss-chart", { annotations: [], "xaxis.visible": true, "yaxis.visible": true, showlegend: true });
    }
    chartsReady = true;
    lastStep = steps.length ? steps[steps.length - 1] : -1;
    document.getElementById("loss-hint").textContent = `${steps.length} points`;
  }

  // Steps can arrive tens of times a second: buffer them and draw twice a second, in one
  // extendTraces call, so the page stays responsive.
  const buffered = [];
  function onMetrics(m) {
    if (!chartsReady) { pendingPoints.push(m); return; }
    // A step the charts have: the job rolled back to a checkpoint and runs it again (the
    // stream sends the steps from there): the charts drop their points from it on.
    if (m.step <= lastStep) rollBack(m.step);
    lastStep = m.step;
    buffered.push(m);
  }

  function rollBack(step) {
    if (!chartsReady) return;
    // Points not drawn yet from there on are of the run rolled back: dropped, not drawn.
    for (let i = buffered.length - 1; i >= 0; i--) if (buffered[i].step >= step) buffered.splice(i, 1);
    flush();
    for (const [id] of CHARTS) {
      // The steps' line from `step` on, and the loss chart's evaluation markers of more
      // steps than `step` (the restored checkpoint's own evaluation stays).
      document.getElementById(id).data.forEach((trace, i) => {
        if (!trace.x) return;
        const xs = Array.from(trace.x), ys = Array.from(trace.y);
        const keep = xs.map((x) => (i === 0 ? x < step : x <= step));
        if (keep.every(Boolean)) return;
        Plotly.restyle(id, { x: [xs.filter((_, k) => keep[k])], y: [ys.filter((_, k) => keep[k])] }, [i]);
      });
    }
  }

  function flush() {
    if (!buffered.length || !chartsReady) return;
    const batch = buffered.splice(0);
    const steps = batch.map((m) => m.step);
    for (const [id, key] of CHARTS) {
      const wasEmpty = !document.getElementById(id).data[0].x.length;
      Plotly.extendTraces(id, { x: [steps], y: [batch.map((m) => m[key])] }, [0]);
      if (wasEmpty) Plotly.relayout(id, { annotations: [], "xaxis.visible": true, "yaxis.visible": true });
    }
    const points = document.getElementById("loss-chart").data[0].x.length;
    document.getElementById("loss-hint").textContent = `${points} points`;
    const m = batch[batch.length - 1];
    if (job) {
      renderJob(Object.assign({}, job, {
        steps_completed: m.step + 1, loss: m.loss, tokens_per_s: m.tokens_per_s, mfu: m.mfu,
      }));
    }
  }
  setInterval(flush, 500);

  // A pipeline job: its schedule as a Gantt chart (one row per stage, forward and backward
  // microbatches as bars) from the hosts' execution logs, with the bubble beside theory.
  async function drawPipeline() {
    if (!job || job.state !== "running") return;
    let reply;
    try {
      reply = await api(`/api/jobs/${encodeURIComponent(jobId)}/pipeline`);
    } catch (e) {
      return;
    }
    const p = reply.pipeline;
    if (!p || !p.bars.length) return;
    document.getElementById("pipe-card").hidden = false;
    const measured = p.bubble_measured == null ? "–" : p.bubble_measured.toFixed(2);
    document.getElementById("pipe-hint").textContent =
      `steps ${p.steps.join(", ")}: bubble ${measured} measured, ${p.bubble_theory.toFixed(2)} theory (S=${p.stages}, M=${p.microbatches})`;
    const traces = ["forward", "backward"].map((kind) => {
      const bars = p.bars.filter((b) => b.kind === kind);
      return {
        type: "bar", orientation: "h", name: kind,
        y: bars.map((b) => `stage ${b.stage}`), x: bars.map((b) => b.duration_ms),
        base: bars.map((b) => b.start_ms), text: bars.map((b) => b.name),
        textposition: "inside", hovertemplate: "%{text}: %{base:.1f} ms + %{x:.1f} ms<extra></extra>",
      };
    });
    const layout = Object.assign({}, chartLayout, {
      barmode: "overlay",
      xaxis: Object.assign({}, chartLayout.xaxis, { title: "ms" }),
      yaxis: Object.assign({}, chartLayout.yaxis, { autorange: "reversed" }),
    });
    Plotly.react("pipe-chart", traces, layout, chartConfig);
  }
  setInterval(drawPipeline, 5000);

  document.getElementById("cancel").addEventListener("click", async () => {
    if (!job || !window.confirm(`Cancel job ${job.name} (${job.id})?`)) return;
    const button = document.getElementById("cancel");
    button.disabled = true;
    try {
      renderJob(await api(`/api/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST", headers: { "X-Pathways-Lite": "1" } }));
    } catch (e) {
      window.alert(String(e.message || e));
    } finally {
      button.disabled = false;
    }
  });

  // The job's record, why, events, logs, spec, chain and evaluations (on load, and again when
  // its stream says the page lagged and lost updates).
  function renderDetail(detail) {
    peakFlops = detail.peak_flops;
    renderJob(detail.job);
    renderWhy(detail.why, detail.jobs_ahead);
    clear(document.querySelector("#events tbody"));
    for (const e of detail.events.slice().reverse()) addEvent(e, false);
    clear(document.getElementById("logs"));
    for (const r of detail.logs) addLog(r);
    document.getElementById("spec").textContent = JSON.stringify(detail.spec, null, 2);
    renderChain(detail.chain);
    renderEvals(detail.evals);
  }

  async function resync() {
    try {
      renderDetail(await api(`/api/jobs/${encodeURIComponent(jobId)}`));
    } catch (e) {
      // The stream's next resync (or a reload) tries again.
    }
  }

  window.addEventListener("DOMContentLoaded", async () => {
    let detail;
    try {
      detail = await api(`/api/jobs/${encodeURIComponent(jobId)}`);
    } catch (e) {
      document.getElementById("job-name").textContent = "Job not found";
      document.getElementById("message").hidden = false;
      document.getElementById("message").textContent = String(e.message || e);
      return;
    }
    renderDetail(detail);
    initCharts(detail.metrics, detail.evals);
    for (const m of pendingPoints.splice(0)) onMetrics(m);
    // The stream sends the steps after the detail's (those recorded since, and those the
    // controller batched before the stream began); a reconnect asks from the last one it got
    // (the events' ids). After a reconnect or a lag (a resync event) the steps it missed come
    // on the stream, the rest is refetched.
    const metrics = detail.metrics;
    const fromStep = metrics.length ? metrics[metrics.length - 1].step + 1 : 0;
    const source = stream(`/api/jobs/${encodeURIComponent(jobId)}/stream?from_step=${fromStep}`, {
      job: (j) => {
        if (j.rolled_back_to !== undefined) {
          // Its steps from there were forgotten and run again: the charts drop them now.
          rollBack(j.rolled_back_to);
          lastStep = Math.min(lastStep, j.rolled_back_to - 1);
          renderJob(j);  // (after the drawing of the points before it)
          addEvent({ time: Date.now() / 1000, kind: "rollback",
            message: `Rolled back to step ${j.rolled_back_to}: the steps from there run again.` }, true);
          return;
        }
        renderJob(j);
        addEvent({ time: Date.now() / 1000, kind: "state",
          message: `Job ${j.state}${j.reason ? ` (${j.reason})` : ""}.${j.message ? " " + j.message : ""}` }, true);
      },
      metrics: onMetrics,
      log: addLog,
      why: (w) => renderWhy(w.why, []),
      event: (e) => addEvent(e, true),
      resync,
    });
    let opened = false;
    source.addEventListener("open", () => {
      if (opened) resync();
      opened = true;
    });
  });
})();
