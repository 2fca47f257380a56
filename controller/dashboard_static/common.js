// Shared helpers of the dashboard pages. Every value reaches the page through textContent or
// element attributes set one by one, never through innerHTML: user strings stay text.
"use strict";

const PL = (() => {
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = String(value);
      else if (key === "title") node.title = String(value);
      else if (key === "href") node.setAttribute("href", String(value));
      else if (key.startsWith("data-")) node.setAttribute(key, String(value));
      else if (key === "style") node.setAttribute("style", String(value));
      else node[key] = value;
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
    return node;
  }

  async function api(path, options) {
    const response = await fetch(path, Object.assign({ credentials: "same-origin" }, options || {}));
    if (!response.ok) {
      const text = (await response.text()).trim();
      throw new Error(text || `${response.status} ${response.statusText}`);
    }
    return response.json();
  }

  const fmt = {
    num(x, digits = 3) {
      return x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toFixed(digits);
    },
    int(x) {
      return x === null || x === undefined ? "–" : Math.round(x).toLocaleString("en-US");
    },
    rate(x) {
      if (x === null || x === undefined) return "–";
      if (x >= 1e6) return (x / 1e6).toFixed(2) + "M";
      if (x >= 1e3) return (x / 1e3).toFixed(1) + "k";
      return x.toFixed(0);
    },
    pct(x) {
      return x === null || x === undefined ? "–" : (100 * x).toFixed(2) + "%";
    },
    flops(x) {
      return x ? `${x.toExponential(3)} FLOP/s` : "–";
    },
    bytes(x) {
      if (!x) return "0 B";
      const units = ["B", "KiB", "MiB", "GiB", "TiB"];
      let i = 0;
      while (x >= 1024 && i < units.length - 1) { x /= 1024; i += 1; }
      return `${x.toFixed(i ? 1 : 0)} ${units[i]}`;
    },
    time(t) {
      if (!t) return "–";
      const d = new Date(t * 1000);
      return d.toLocaleTimeString("en-GB", { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
    },
    ago(t) {
      if (!t) return "–";
      const s = Math.max(0, Date.now() / 1000 - t);
      if (s < 60) return `${Math.floor(s)}s ago`;
      if (s < 3600) return `${Math.floor(s / 60)}m ago`;
      if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
      return `${Math.floor(s / 86400)}d ago`;
    },
    duration(s) {
      if (s === null || s === undefined || !Number.isFinite(s)) return "–";
      if (s < 60) return `${s.toFixed(0)}s`;
      if (s < 3600) return `${Math.floor(s / 60)}m ${Math.floor(s % 60)}s`;
      return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
    },
  };

  function badge(state) {
    return el("span", { class: `badge state-${state}`, text: state });
  }

  function progress(done, total) {
    const frac = total ? Math.min(1, done / total) : 0;
    return el("div", { class: "progress", title: `${done} / ${total} steps` },
      el("div", { class: "bar" }, el("div", { class: "fill", style: `width:${(100 * frac).toFixed(1)}%` })),
      el("span", { class: "label", text: `${done}/${total}` }));
  }

  function live(state) {
    const node = document.getElementById("live");
    const text = document.getElementById("live-text");
    node.className = `live ${state}`;
    text.textContent = state === "on" ? "live" : state === "off" ? "reconnecting" : state;
  }

  // Follows a server-sent event stream; handlers maps event names to functions of the data.
  function stream(path, handlers) {
    const source = new EventSource(path);
    source.onopen = () => live("on");
    source.onerror = () => live("off");
    for (const [name, fn] of Object.entries(handlers)) {
      source.addEventListener(name, (event) => fn(JSON.parse(event.data)));
    }
    return source;
  }

  const palette = ["#4f8cff", "#f5a524", "#2fbf71", "#e5484d", "#a371f7", "#12b5cb", "#f76b15", "#8d99ae"];
  const colors = new Map();
  function colorOf(key) {
    if (!colors.has(key)) colors.set(key, palette[colors.size % palette.length]);
    return colors.get(key);
  }

  const chartLayout = {
    paper_bgcolor: "rgba(0,0,0,0)",
    plot_bgcolor: "rgba(0,0,0,0)",
    font: { family: "Inter, system-ui, -apple-system, Segoe UI, sans-serif", size: 11, color: "#9aa4b2" },
    margin: { l: 56, r: 16, t: 8, b: 36 },
    xaxis: { gridcolor: "#232a36", zerolinecolor: "#232a36", linecolor: "#2c3442" },
    yaxis: { gridcolor: "#232a36", zerolinecolor: "#232a36", linecolor: "#2c3442" },
    showlegend: false,
  };
  const chartConfig = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["lasso2d", "select2d"] };

  return { el, clear, api, fmt, badge, progress, stream, live, colorOf, chartLayout, chartConfig };
})();
