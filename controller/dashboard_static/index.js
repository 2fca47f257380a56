// The cluster page: islands (devices, resident jobs, memory, the time-multiplexing timeline)
// and the jobs history (keyset pages, newest first), kept live by /api/stream.
"use strict";

(() => {
  const { el, clear, api, fmt, badge, progress, stream, colorOf, chartLayout, chartConfig } = PL;
  const rows = new Map(); // job id -> <tr>
  const cursors = [""]; // cursors[i] fetches page i
  let page = 0;
  let nextCursor = "";

  function renderSummary(overview) {
    const counts = overview.counts;
    const devices = overview.islands.reduce((n, i) => n + i.devices, 0);
    const items = [
      ["Islands", overview.islands.length],
      ["Devices", devices],
      ["Running", counts.running || 0],
      ["Queued", counts.queued || 0],
      ["Succeeded", counts.succeeded || 0],
      ["Failed", counts.failed || 0],
      ["Controller epoch", overview.epoch,
        "controller starts on this state dir so far; hosts refuse the steps of an older one"],
    ];
    clear(document.getElementById("summary")).append(
      ...items.map(([label, value, hint]) => el("div", { class: "stat", title: hint },
        el("div", { class: "stat-label", text: label }), el("div", { class: "stat-value", text: value }),
        hint ? el("div", { class: "stat-hint", text: hint }) : null)));
  }

  function renderIslands(islands) {
    const root = clear(document.getElementById("islands"));
    for (const island of islands) {
      const used = island.memory_used_bytes, budget = island.memory_budget_bytes;
      const frac = budget ? Math.min(1, used / budget) : 0;
      const jobs = island.jobs.length
        ? island.jobs.map((id) => el("a", { class: "chip", href: `/jobs/${encodeURIComponent(id)}`,
            style: `border-color:${colorOf(id)}` }, el("span", { class: "swatch", style: `background:${colorOf(id)}` }), id))
        : [el("span", { class: "muted", text: "idle" })];
      root.append(el("div", { class: "card island", "data-island": island.id },
        el("div", { class: "card-head" }, el("h3", { text: island.id }),
          el("span", { class: "hint", text: `${island.devices} × ${island.device_kind || "device"} · ${island.hosts.length} host${island.hosts.length === 1 ? "" : "s"}` })),
        el("div", { class: "devices" }, Array.from({ length: island.devices }, (_, i) =>
          el("div", { class: `device ${island.jobs.length ? "busy" : ""}`, title: `device ${i}`,
            style: island.jobs.length ? `background:${colorOf(island.jobs[0])}` : "" }))),
        island.down ? el("div", { class: "kv down" }, el("span", { text: "Down" }), el("span", { text: island.down })) : null,
        el("div", { class: "kv" }, el("span", { text: "Resident jobs" }), el("div", { class: "chips" }, jobs)),
        el("div", { class: "kv" }, el("span", { text: "Memory" }),
          el("span", { class: "mono", text: `${fmt.bytes(used)} / ${fmt.bytes(budget)}` })),
        el("div", { class: "meter" }, el("div", { class: "fill", style: `width:${(100 * frac).toFixed(1)}%` })),
        el("div", { class: "kv", title: "the peak that MFU on this island is measured against" },
          el("span", { text: "MFU peak" }),
          el("span", { class: "mono", "data-peak": island.id,
            text: island.peak_flops ? `${fmt.flops(island.peak_flops)} (${island.peak_flops_source})` : "–" })),
        el("div", { class: "hosts" }, island.hosts.map((h) =>
          el("div", { class: "host mono", text: `${h.address} · pid ${h.pid} · ${h.devices} dev · ${h.state}` })))));
    }
    document.getElementById("islands-hint").textContent = `${islands.length} island${islands.length === 1 ? "" : "s"}`;
  }

  function renderTimeline(overview) {
    const node = document.getElementById("timeline");
    document.getElementById("window").textContent = overview.timeline_window_s;
    if (!window.Plotly) return;
    const byJob = new Map();
    for (const island of overview.islands) {
      for (const e of island.timeline) {
        if (!byJob.has(e.job_id)) byJob.set(e.job_id, { y: [], base: [], x: [], text: [] });
        const t = byJob.get(e.job_id);
        t.y.push(island.id);
        t.base.push(new Date(e.start * 1000).toISOString());
        t.x.push(Math.max(1, (e.end - e.start) * 1000));
        t.text.push(e.last_step > e.step ? `${e.job_id} steps ${e.step}-${e.last_step}` : `${e.job_id} step ${e.step}`);
      }
    }
    const traces = [...byJob.entries()].map(([job, t]) => ({
      type: "bar", orientation: "h", name: job, y: t.y, base: t.base, x: t.x, text: t.text,
      hovertemplate: "%{text}<br>%{base|%H:%M:%S.%L}<extra></extra>", textposition: "none",
      marker: { color: colorOf(job) },
    }));
    const now = overview.now * 1000;
    const layout = Object.assign({}, chartLayout, {
      barmode: "overlay", bargap: 0.35, height: 60 + 44 * Math.max(1, overview.islands.length),
      showlegend: traces.length > 0, legend: { orientation: "h", y: 1.15, x: 0 },
      margin: { l: 72, r: 16, t: 24, b: 30 },
      xaxis: Object.assign({}, chartLayout.xaxis, { type: "date",
        range: [new Date(now - overview.timeline_window_s * 1000).toISOString(), new Date(now).toISOString()] }),
      yaxis: Object.assign({}, chartLayout.yaxis, { type: "category",
        categoryarray: overview.islands.map((i) => i.id).reverse(), categoryorder: "array" }),
    });
    if (!traces.length) {
      traces.push({ type: "bar", orientation: "h", y: overview.islands.map((i) => i.id), x: overview.islands.map(() => 0),
        base: overview.islands.map(() => new Date(now).toISOString()), hoverinfo: "skip" });
    }
    Plotly.react(node, traces, layout, chartConfig);
    renderShares(overview.islands);
  }

  // Each job's measured share of its island's device time beside its weight's share.
  function renderShares(islands) {
    const root = clear(document.getElementById("shares"));
    for (const island of islands) {
      if (!island.shares || !island.shares.length) continue;
      root.append(el("div", { class: "share-row", "data-island": island.id },
        el("span", { class: "share-island", text: island.id }),
        island.shares.map((s) => el("span", { class: "chip", "data-job": s.job_id, style: `border-color:${colorOf(s.job_id)}` },
          el("span", { class: "swatch", style: `background:${colorOf(s.job_id)}` }),
          `${s.job_id}: measured ${fmt.pct(s.share)} · weight ${s.weight} (asks ${fmt.pct(s.weight_share)})`))));
    }
    if (!root.childElementCount) {
      root.append(el("span", { class: "muted", text: "no steps in the window yet" }));
    }
  }

  function jobCells(job) {
    const link = el("a", { href: `/jobs/${encodeURIComponent(job.id)}`, class: "job-link" },
      el("span", { class: "job-name", text: job.name }), el("span", { class: "job-id mono", text: job.id }));
    return [
      el("td", {}, link),
      el("td", {}, badge(job.state), job.phase ? el("span", { class: "hint", text: ` ${job.phase}` }) : null),
      el("td", { class: "wide" }, progress(job.steps_completed, job.steps)),
      el("td", { class: "num mono", text: fmt.num(job.loss, 4), "data-field": "loss" }),
      el("td", { class: "num mono", text: fmt.rate(job.tokens_per_s) }),
      el("td", { class: "num mono", text: fmt.pct(job.mfu) }),
      el("td", { class: "num mono", text: job.priority }),
      el("td", { class: "num mono", text: job.weight }),
      el("td", { class: "num mono", text: job.queue_position || "–" }),
      el("td", { class: "mono", text: job.islands.join(", ") || "–" }),
      el("td", { text: fmt.ago(job.created), title: new Date(job.created * 1000).toISOString() }),
    ];
  }

  function upsertRow(job, prepend) {
    const tbody = document.querySelector("#jobs tbody");
    let row = rows.get(job.id);
    if (!row) {
      row = el("tr", { "data-job": job.id });
      rows.set(job.id, row);
      if (prepend) tbody.prepend(row); else tbody.append(row);
    }
    row.dataset.state = job.state;
    row.job = job;
    clear(row).append(...jobCells(job));
    document.getElementById("jobs-empty").hidden = rows.size > 0;
  }

  async function loadJobs() {
    const state = document.getElementById("state-filter").value;
    const query = new URLSearchParams({ limit: "25", cursor: cursors[page] });
    if (state) query.set("state", state);
    const data = await api(`/api/jobs?${query}`);
    clear(document.querySelector("#jobs tbody"));
    rows.clear();
    for (const job of data.jobs) upsertRow(job, false);
    document.getElementById("jobs-empty").hidden = data.jobs.length > 0;
    nextCursor = data.next_cursor;
    document.getElementById("older").disabled = !nextCursor;
    document.getElementById("newer").disabled = page === 0;
    document.getElementById("retention").textContent = data.retention_s
      ? `history kept ${fmt.duration(data.retention_s)}` : "history kept forever";
  }

  function onJob(job) {
    const filter = document.getElementById("state-filter").value;
    if (rows.has(job.id)) {
      if (filter && job.state !== filter) { rows.get(job.id).remove(); rows.delete(job.id); }
      else upsertRow(job, false);
    } else if (page === 0 && (!filter || job.state === filter)) {
      upsertRow(job, true);
    }
  }

  // Steps arrive tens of times a second: keep the newest per job, redraw rows twice a second.
  const latest = new Map();
  function onMetrics(m) { latest.set(m.job_id, m); }
  setInterval(() => {
    for (const [id, m] of latest) {
      const row = rows.get(id);
      if (!row || !row.job) continue;
      upsertRow(Object.assign({}, row.job, {
        steps_completed: m.step + 1, loss: m.loss, tokens_per_s: m.tokens_per_s, mfu: m.mfu,
      }), false);
    }
    latest.clear();
  }, 500);

  function onOverview(overview) {
    renderSummary(overview);
    renderIslands(overview.islands);
    renderTimeline(overview);
  }

  document.getElementById("older").addEventListener("click", () => {
    cursors[page + 1] = nextCursor; page += 1; loadJobs();
  });
  document.getElementById("newer").addEventListener("click", () => {
    page = Math.max(0, page - 1); loadJobs();
  });
  document.getElementById("state-filter").addEventListener("change", () => {
    page = 0; cursors.length = 1; loadJobs();
  });

  window.addEventListener("DOMContentLoaded", async () => {
    try {
      onOverview(await api("/api/overview"));
      await loadJobs();
    } catch (e) {
      document.getElementById("summary").append(el("div", { class: "error", text: String(e.message || e) }));
    }
    // A lagging page lost updates (the server counted them): reload what it shows.
    const resync = () => loadJobs();
    const source = stream("/api/stream", { overview: onOverview, job: onJob, metrics: onMetrics, resync });
    // Reopened (the controller restarted, the network dropped): what came meanwhile was lost.
    let opened = false;
    source.addEventListener("open", () => {
      if (opened) resync();
      opened = true;
    });
  });
})();
