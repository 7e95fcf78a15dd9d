/*
 * The monitor page's script: polls GET /metrics (Prometheus text format, all workers) about once a second, turns
 * counter and histogram differences between two polls into rates and interval means, keeps the latest MAX_POINTS
 * polls and draws them with uPlot. Plain JavaScript, no build step, no request beyond this server.
 *
 * For tests and curious readers, window.monitor holds what the charts draw: `series` (arrays aligned with
 * `series.time`, unix seconds; null where a value is undefined, e.g. a mean over an interval in which no request
 * finished) and `latest` (the numbers in the tiles).
 */
(function () {
  "use strict";

  var POLL_MS = 1000;
  var MAX_POINTS = 120;
  var METRICS_URL = "metrics"; // relative: also works behind a proxy that mounts the server under a path
  var EXCLUDED_ROUTES = { "/metrics": true }; // the page's own polling would otherwise dominate requests/s
  var CHART_HEIGHT = 220;
  var GPU_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];

  var series = {
    time: [],
    promptTokensPerS: [],
    generatedTokensPerS: [],
    requestsPerS: [],
    timeToFirstTokenS: [],
    requestDurationS: [],
    running: [],
    waiting: [],
    gpu: {} // gpu label -> {utilization: [ratio], memoryUsedBytes: [], memoryTotalBytes: []}
  };
  var state = {
    series: series,
    latest: {},
    gpus: [],
    polls: 0,
    errors: 0,
    lastError: null,
    maxPoints: MAX_POINTS,
    pollMs: POLL_MS
  };
  window.monitor = state;

  // ---- the Prometheus text format --------------------------------------------------------------------------

  /** Samples of a text exposition: [{name, labels: {..}, value}]; comments and timestamps are skipped. */
  function parseMetrics(text) {
    var samples = [];
    var lines = text.split("\n");
    for (var i = 0; i < lines.length; i++) {
      var line = lines[i].trim();
      if (line === "" || line.charAt(0) === "#") continue;
      var sample = parseLine(line);
      if (sample) samples.push(sample);
    }
    return samples;
  }

  function parseLine(line) {
    var nameMatch = /^[a-zA-Z_:][a-zA-Z0-9_:]*/.exec(line);
    if (!nameMatch) return null;
    var pos = nameMatch[0].length;
    var labels = {};
    if (line.charAt(pos) === "{") {
      pos++;
      for (;;) {
        while (line.charAt(pos) === " " || line.charAt(pos) === ",") pos++;
        if (line.charAt(pos) === "}") { pos++; break; }
        var labelMatch = /^[a-zA-Z_][a-zA-Z0-9_]*/.exec(line.slice(pos));
        if (!labelMatch) return null;
        pos += labelMatch[0].length;
        while (line.charAt(pos) === " ") pos++;
        if (line.charAt(pos) !== "=") return null;
        pos++;
        while (line.charAt(pos) === " ") pos++;
        if (line.charAt(pos) !== '"') return null;
        pos++;
        var value = "";
        for (;;) {
          if (pos >= line.length) return null;
          var c = line.charAt(pos++);
          if (c === '"') break;
          if (c === "\\") {
            var next = line.charAt(pos++);
            value += next === "n" ? "\n" : next; // \\ -> \, \" -> ", \n -> newline
          } else {
            value += c;
          }
        }
        labels[labelMatch[0]] = value;
      }
    }
    var rest = line.slice(pos).trim().split(/\s+/);
    return { name: nameMatch[0], labels: labels, value: parseNumber(rest[0]) };
  }

  function parseNumber(token) {
    if (token === "+Inf" || token === "Inf") return Infinity;
    if (token === "-Inf") return -Infinity;
    return token === undefined ? NaN : Number(token);
  }

  /** The sum of every sample named `name` whose labels pass `keep` (0 when there is none). */
  function sum(samples, name, keep) {
    var total = 0;
    for (var i = 0; i < samples.length; i++) {
      var s = samples[i];
      if (s.name === name && !isNaN(s.value) && (!keep || keep(s.labels))) total += s.value;
    }
    return total;
  }

  /** Workers per shared vLLM engine core, as "K workers on N cores" (none: every worker has its own engine). */
  function sharedCores(samples) {
    var workersOf = {};
    for (var i = 0; i < samples.length; i++) {
      var s = samples[i];
      if (s.name !== "llm_worker_engine_core" || s.value !== 1) continue;
      workersOf[s.labels.engine_core] = (workersOf[s.labels.engine_core] || 0) + 1;
    }
    var cores = Object.keys(workersOf);
    if (cores.length === 0) return "none";
    var workers = cores.reduce(function (total, core) { return total + workersOf[core]; }, 0);
    return workers + " workers on " + cores.length + (cores.length === 1 ? " core" : " cores");
  }

  function countedRoute(labels) {
    return !EXCLUDED_ROUTES[labels.route];
  }

  // ---- from one poll to the next ---------------------------------------------------------------------------

  /** The cumulative numbers of one poll; rates and means come from two of these. */
  function totalsOf(samples) {
    return {
      prompt: sum(samples, "llm_prompt_tokens_total"),
      generated: sum(samples, "llm_generation_tokens_total"),
      requests: sum(samples, "llm_requests_total", countedRoute),
      ttftSum: sum(samples, "llm_time_to_first_token_seconds_sum"),
      ttftCount: sum(samples, "llm_time_to_first_token_seconds_count"),
      durationSum: sum(samples, "llm_request_duration_seconds_sum", countedRoute),
      durationCount: sum(samples, "llm_request_duration_seconds_count", countedRoute)
    };
  }

  /** Per GPU (the `gpu` label; workers sharing one GPU report the same device, shown once). */
  function gpusOf(samples) {
    var byGpu = {};
    function entry(labels) {
      var key = labels.gpu;
      if (!byGpu[key]) byGpu[key] = { gpu: key, utilization: null, memoryUsedBytes: null, memoryTotalBytes: null, workers: [] };
      if (labels.worker && byGpu[key].workers.indexOf(labels.worker) < 0) byGpu[key].workers.push(labels.worker);
      return byGpu[key];
    }
    var fields = {
      llm_gpu_utilization_ratio: "utilization",
      llm_gpu_memory_used_bytes: "memoryUsedBytes",
      llm_gpu_memory_total_bytes: "memoryTotalBytes"
    };
    for (var i = 0; i < samples.length; i++) {
      var s = samples[i];
      var field = fields[s.name];
      if (!field || s.labels.gpu === undefined || isNaN(s.value)) continue;
      var e = entry(s.labels);
      e[field] = e[field] === null ? s.value : Math.max(e[field], s.value);
    }
    return Object.keys(byGpu).sort(function (a, b) { return Number(a) - Number(b) || (a < b ? -1 : a > b ? 1 : 0); })
      .map(function (key) { return byGpu[key]; });
  }

  var previous = null; // {at: performance.now() ms, totals}

  function record(samples, at) {
    var totals = totalsOf(samples);
    var gpus = gpusOf(samples);
    var point = {
      running: sum(samples, "llm_requests_running"),
      waiting: sum(samples, "llm_requests_waiting"),
      workersReady: sum(samples, "llm_worker_ready"),
      sharedCores: sharedCores(samples)
    };
    var last = previous;
    previous = { at: at, totals: totals };
    if (last === null) return false; // the first poll is only the baseline for the differences
    var seconds = (at - last.at) / 1000;
    var d = {};
    var reset = false;
    for (var key in totals) {
      d[key] = totals[key] - last.totals[key];
      if (d[key] < 0) reset = true; // the server restarted: no difference over this interval
    }
    point.promptTokensPerS = reset ? null : d.prompt / seconds;
    point.generatedTokensPerS = reset ? null : d.generated / seconds;
    point.requestsPerS = reset ? null : d.requests / seconds;
    point.timeToFirstTokenS = !reset && d.ttftCount > 0 ? d.ttftSum / d.ttftCount : null;
    point.requestDurationS = !reset && d.durationCount > 0 ? d.durationSum / d.durationCount : null;

    series.time.push(Date.now() / 1000);
    ["promptTokensPerS", "generatedTokensPerS", "requestsPerS", "timeToFirstTokenS", "requestDurationS",
      "running", "waiting"].forEach(function (name) { series[name].push(point[name]); });
    recordGpus(gpus);
    trim();
    state.latest = point;
    state.gpus = gpus;
    return true;
  }

  function recordGpus(gpus) {
    var length = series.time.length;
    var seen = {};
    gpus.forEach(function (g) {
      var s = series.gpu[g.gpu];
      if (!s) {
        s = series.gpu[g.gpu] = { utilization: [], memoryUsedBytes: [], memoryTotalBytes: [] };
        for (var i = 0; i < length - 1; i++) { s.utilization.push(null); s.memoryUsedBytes.push(null); s.memoryTotalBytes.push(null); }
      }
      s.utilization.push(g.utilization);
      s.memoryUsedBytes.push(g.memoryUsedBytes);
      s.memoryTotalBytes.push(g.memoryTotalBytes);
      seen[g.gpu] = true;
    });
    for (var key in series.gpu) {
      if (seen[key]) continue;
      var gone = series.gpu[key];
      gone.utilization.push(null); gone.memoryUsedBytes.push(null); gone.memoryTotalBytes.push(null);
    }
  }

  function trim() {
    var extra = series.time.length - MAX_POINTS;
    if (extra <= 0) return;
    for (var name in series) {
      if (name === "gpu") continue;
      series[name].splice(0, extra);
    }
    for (var key in series.gpu) {
      var s = series.gpu[key];
      s.utilization.splice(0, extra); s.memoryUsedBytes.splice(0, extra); s.memoryTotalBytes.splice(0, extra);
      if (s.utilization.every(function (v) { return v === null; })) delete series.gpu[key];
    }
  }

  // ---- numbers ---------------------------------------------------------------------------------------------

  function formatRate(v) {
    if (v === null || v === undefined) return "\u2013";
    return v >= 100 ? v.toFixed(0) : v.toFixed(1);
  }
  function formatSeconds(v) {
    if (v === null || v === undefined) return "\u2013";
    return v < 1 ? (v * 1000).toFixed(0) + " ms" : v.toFixed(2) + " s";
  }
  function formatCount(v) {
    return v === null || v === undefined ? "\u2013" : String(Math.round(v));
  }
  function formatText(v) {
    return v || "\u2013";
  }
  function gib(bytes) {
    return bytes === null || bytes === undefined ? null : bytes / Math.pow(1024, 3);
  }
  var FORMATS = {
    promptTokensPerS: formatRate, generatedTokensPerS: formatRate, requestsPerS: formatRate,
    timeToFirstTokenS: formatSeconds, requestDurationS: formatSeconds,
    running: formatCount, waiting: formatCount, workersReady: formatCount, sharedCores: formatText
  };

  function showNumbers() {
    var cells = document.querySelectorAll("[data-latest]");
    for (var i = 0; i < cells.length; i++) {
      var name = cells[i].getAttribute("data-latest");
      cells[i].textContent = FORMATS[name](state.latest[name]);
    }
  }

  function setStatus(text, isError) {
    var el = document.getElementById("status");
    el.textContent = text;
    el.className = isError ? "status error" : "status";
  }

  // ---- charts ----------------------------------------------------------------------------------------------

  function widthOf(el) {
    return Math.max(280, el.clientWidth || 360);
  }

  function fromZero(u, min, max) {
    return [0, max !== null && max > 0 ? max * 1.15 : 1];
  }

  function makeChart(el, lines, yAxis, yRange) {
    var opts = {
      width: widthOf(el),
      height: CHART_HEIGHT,
      legend: { live: false },
      scales: { x: { time: true }, y: { range: yRange || fromZero } },
      axes: [{ values: clockTicks, space: 70 }, { size: 56, values: yAxis }],
      series: [{}].concat(lines.map(function (line) {
        return {
          label: line.label,
          stroke: line.color,
          width: 2,
          spanGaps: !!line.sparse,
          points: line.sparse ? { show: true, size: 5, fill: line.color } : { show: false }
        };
      }))
    };
    var data = [[]].concat(lines.map(function () { return []; }));
    return new uPlot(opts, data, el);
  }

  function tickValues(format) {
    return function (u, splits) { return splits.map(format); };
  }
  var clockTicks = tickValues(function (t) {
    return t === null ? "" : new Date(t * 1000).toLocaleTimeString([], { hour12: false });
  });
  var plain = tickValues(function (v) { return v === null ? "" : +v.toFixed(3) + ""; });

  var charts = {};

  function createFixedCharts() {
    charts.tokens = {
      el: document.getElementById("chart-tokens"),
      names: ["promptTokensPerS", "generatedTokensPerS"],
      lines: [{ label: "prompt (in)", color: "#1f77b4" }, { label: "generated (out)", color: "#2ca02c" }],
      yAxis: plain
    };
    charts.latency = {
      el: document.getElementById("chart-latency"),
      names: ["timeToFirstTokenS", "requestDurationS"],
      lines: [{ label: "time to first token", color: "#ff7f0e", sparse: true },
        { label: "request duration", color: "#9467bd", sparse: true }],
      yAxis: plain
    };
    charts.requests = {
      el: document.getElementById("chart-requests"),
      names: ["requestsPerS", "running", "waiting"],
      lines: [{ label: "requests/s", color: "#1f77b4" }, { label: "running", color: "#2ca02c" },
        { label: "waiting", color: "#d62728" }],
      yAxis: plain
    };
    for (var key in charts) {
      var c = charts[key];
      c.plot = makeChart(c.el, c.lines, c.yAxis);
    }
  }

  function drawFixedCharts() {
    for (var key in charts) {
      var c = charts[key];
      c.plot.setData([series.time].concat(c.names.map(function (name) { return series[name]; })));
    }
  }

  var gpuCharts = { keys: "", utilization: null, memory: null };

  function drawGpus() {
    var keys = Object.keys(series.gpu).sort(function (a, b) { return Number(a) - Number(b) || (a < b ? -1 : 1); });
    var none = document.getElementById("gpu-none");
    var body = document.getElementById("gpu-body");
    var present = state.gpus.length > 0;
    none.hidden = present;
    body.hidden = !present;
    if (!present) {
      destroyGpuCharts();
      return;
    }
    if (keys.join(",") !== gpuCharts.keys) {
      destroyGpuCharts();
      var lines = keys.map(function (key, i) { return { label: "GPU " + key, color: GPU_COLORS[i % GPU_COLORS.length] }; });
      var memLimit = function (u, min, max) {
        var total = 0;
        keys.forEach(function (key) {
          series.gpu[key].memoryTotalBytes.forEach(function (v) { if (v !== null) total = Math.max(total, gib(v)); });
        });
        return [0, total > 0 ? total : (max !== null && max > 0 ? max * 1.15 : 1)];
      };
      var utilEl = document.getElementById("chart-gpu-utilization");
      var memEl = document.getElementById("chart-gpu-memory");
      utilEl.innerHTML = "<h2>utilization (%)</h2>";
      memEl.innerHTML = "<h2>memory used (GiB, up to the total)</h2>";
      gpuCharts.utilization = makeChart(utilEl, lines, plain, function () { return [0, 100]; });
      gpuCharts.memory = makeChart(memEl, lines, plain, memLimit);
      gpuCharts.keys = keys.join(",");
    }
    gpuCharts.utilization.setData([series.time].concat(keys.map(function (key) {
      return series.gpu[key].utilization.map(function (v) { return v === null ? null : v * 100; });
    })));
    gpuCharts.memory.setData([series.time].concat(keys.map(function (key) {
      return series.gpu[key].memoryUsedBytes.map(gib);
    })));
    var rows = state.gpus.map(function (g) {
      var used = gib(g.memoryUsedBytes);
      var total = gib(g.memoryTotalBytes);
      return "<tr><td>GPU " + escapeHtml(g.gpu) + "</td><td>" +
        (g.utilization === null ? "\u2013" : (g.utilization * 100).toFixed(0) + " %") + "</td><td>" +
        (used === null ? "\u2013" : used.toFixed(1)) + " / " + (total === null ? "\u2013" : total.toFixed(1)) +
        " GiB</td><td>" + escapeHtml(g.workers.join(", ")) + "</td></tr>";
    });
    document.querySelector("#gpu-table tbody").innerHTML = rows.join("");
  }

  function destroyGpuCharts() {
    if (gpuCharts.utilization) gpuCharts.utilization.destroy();
    if (gpuCharts.memory) gpuCharts.memory.destroy();
    gpuCharts = { keys: "", utilization: null, memory: null };
  }

  function escapeHtml(text) {
    return String(text).replace(/[&<>"]/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c];
    });
  }

  function resize() {
    for (var key in charts) charts[key].plot.setSize({ width: widthOf(charts[key].el), height: CHART_HEIGHT });
    if (gpuCharts.utilization) {
      var utilEl = document.getElementById("chart-gpu-utilization");
      var memEl = document.getElementById("chart-gpu-memory");
      gpuCharts.utilization.setSize({ width: widthOf(utilEl), height: CHART_HEIGHT });
      gpuCharts.memory.setSize({ width: widthOf(memEl), height: CHART_HEIGHT });
    }
  }

  // ---- polling ---------------------------------------------------------------------------------------------

  function poll() {
    var controller = typeof AbortController === "function" ? new AbortController() : null;
    var timer = controller ? setTimeout(function () { controller.abort(); }, 5000) : null;
    fetch(METRICS_URL, { cache: "no-store", signal: controller ? controller.signal : undefined })
      .then(function (response) {
        if (!response.ok) throw new Error("GET /metrics answered " + response.status);
        return response.text();
      })
      .then(function (text) {
        state.polls++;
        if (record(parseMetrics(text), performance.now())) {
          showNumbers();
          drawFixedCharts();
          drawGpus();
        }
        setStatus("updated " + new Date().toLocaleTimeString() + " \u00b7 polling /metrics every " +
          POLL_MS / 1000 + " s", false);
      })
      .catch(function (error) {
        state.errors++;
        state.lastError = String(error && error.message || error);
        setStatus("cannot read /metrics: " + state.lastError + " (retrying)", true);
      })
      .then(function () {
        if (timer) clearTimeout(timer);
        setTimeout(poll, POLL_MS);
      });
  }

  document.getElementById("max-points").textContent = String(MAX_POINTS);
  createFixedCharts();
  window.addEventListener("resize", resize);
  poll();
})();
