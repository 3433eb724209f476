/* analog checkpoint-metrics report: canvas charts, no dependencies, works offline.
 * Data comes from <script type="application/json" id="analog-data">; every name is inserted with
 * textContent (never innerHTML), so names from checkpoints cannot inject markup. */
(function () {
  "use strict";
  var statusEl = document.getElementById("analog-status");
  var errors = [];
  var chartsDrawn = 0;
  function report() {
    statusEl.setAttribute("data-charts", String(chartsDrawn));
    statusEl.setAttribute("data-errors", String(errors.length));
    statusEl.textContent = chartsDrawn + " charts drawn" + (errors.length ? "; errors: " + errors.join(" | ") : "");
  }
  window.addEventListener("error", function (e) { errors.push(String(e.message)); report(); });

  /* Series colours never include the transition marker's red (MARK). */
  var MARK = "#d62728";
  var PALETTE = ["#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#17becf", "#8c564b", "#e377c2",
    "#7f7f7f", "#bcbd22", "#393b79", "#637939", "#8c6d31", "#7b4173", "#3182bd", "#31a354"];
  statusEl.setAttribute("data-transition-color", MARK);
  var LOG_DEFAULT = /(^|[#&])log(=1)?(&|$)/.test(window.location.hash);
  var data = JSON.parse(document.getElementById("analog-data").textContent);

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  /* metric -> ordered list of series {key, component, layer, points: [[step, value]]} */
  var byMetric = {};
  var metricOrder = [];
  /* a chart per metric for its layers, and one for its whole-model value(s) */
  function groupOf(metric, component) { return component === "whole_model" ? metric + " \u00b7 whole model" : metric; }
  data.rows.forEach(function (r) {
    var metric = r[1], key = r[2] + " | " + r[3], group = groupOf(metric, r[2]);
    if (!byMetric[group]) { byMetric[group] = { list: [], index: {}, metric: metric, whole: r[2] === "whole_model" }; metricOrder.push(group); }
    var m = byMetric[group];
    if (!(key in m.index)) {
      m.index[key] = m.list.length;
      m.list.push({ metric: metric, key: key, component: r[2], layer: r[3], points: [] });
    }
    m.list[m.index[key]].points.push([r[0], r[4]]);
  });
  metricOrder.forEach(function (metric) {
    byMetric[metric].list.forEach(function (s, i) {
      s.points.sort(function (a, b) { return a[0] - b[0]; });
      s.color = PALETTE[i % PALETTE.length];
    });
  });
  var transitionsBy = {};
  data.transitions.forEach(function (t) {
    var k = t.metric + "\u0000" + t.component + " | " + t.layer;
    (transitionsBy[k] = transitionsBy[k] || []).push(t);
  });
  function transitionsOf(s) { return transitionsBy[s.metric + "\u0000" + s.key] || []; }

  function niceTicks(lo, hi, count) {
    if (!(hi > lo)) { hi = lo + 1; lo = lo - 1; }
    var raw = (hi - lo) / count, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    var step = [1, 2, 5, 10].map(function (f) { return f * mag; }).filter(function (s) { return s >= raw; })[0];
    var ticks = [];
    for (var v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) { ticks.push(v); }
    return ticks;
  }
  function fmt(v) {
    if (v === 0) { return "0"; }
    var a = Math.abs(v);
    return (a >= 1e5 || a < 1e-3) ? v.toExponential(2) : String(Math.round(v * 1e4) / 1e4);
  }

  function normalise(values, mode) {
    var finite = values.filter(function (v) { return v !== null && isFinite(v); });
    if (!mode || mode === "none" || finite.length === 0) { return values; }
    var lo = Math.min.apply(null, finite), hi = Math.max.apply(null, finite);
    var mean = finite.reduce(function (a, b) { return a + b; }, 0) / finite.length;
    var sd = Math.sqrt(finite.reduce(function (a, b) { return a + (b - mean) * (b - mean); }, 0) / finite.length);
    return values.map(function (v) {
      if (v === null || !isFinite(v)) { return null; }
      if (mode === "minmax") { return hi > lo ? (v - lo) / (hi - lo) : 0.5; }
      return sd > 0 ? (v - mean) / sd : 0;
    });
  }

  /* Draw series [{color, label, points:[[x,y]], marks:[[x,y]]}] on a canvas; returns a hover lookup. */
  function drawChart(canvas, series, yLabel, log) {
    function ty(y) { return y === null || !isFinite(y) ? null : (log ? (y > 0 ? Math.log10(y) : null) : y); }
    var ratio = window.devicePixelRatio || 1, width = canvas.clientWidth || 860, height = 320;
    canvas.width = width * ratio; canvas.height = height * ratio; canvas.style.height = height + "px";
    var ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, width, height);
    var xs = [], ys = [];
    var hidden = 0;
    series.forEach(function (s) {
      s.points.forEach(function (p) {
        var y = ty(p[1]);
        if (y !== null) { xs.push(p[0]); ys.push(y); } else if (p[1] !== null && isFinite(p[1])) { hidden += 1; }
      });
    });
    canvas.setAttribute("data-scale", log ? "log" : "linear");
    canvas.setAttribute("data-hidden", String(hidden));
    var pad = { l: 72, r: 16, t: 14, b: 40 };
    ctx.font = "12px sans-serif"; ctx.fillStyle = "#333";
    if (xs.length === 0) { ctx.fillText("no finite values", pad.l, height / 2); chartsDrawn += 1; report(); return null; }
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs), y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    if (y1 === y0) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
    var ym = (y1 - y0) * 0.05; y0 -= ym; y1 += ym;
    canvas.setAttribute("data-ymin", String(y0)); canvas.setAttribute("data-ymax", String(y1));
    var W = width - pad.l - pad.r, H = height - pad.t - pad.b;
    function px(x) { return pad.l + (x - x0) / (x1 - x0) * W; }
    function py(y) { return pad.t + (1 - (y - y0) / (y1 - y0)) * H; }
    ctx.strokeStyle = "#ddd"; ctx.lineWidth = 1; ctx.textAlign = "right"; ctx.textBaseline = "middle";
    niceTicks(y0, y1, 5).forEach(function (t) {
      ctx.beginPath(); ctx.moveTo(pad.l, py(t)); ctx.lineTo(pad.l + W, py(t)); ctx.stroke();
      ctx.fillText(log ? fmt(Math.pow(10, t)) : fmt(t), pad.l - 6, py(t));
    });
    ctx.textAlign = "center"; ctx.textBaseline = "top";
    niceTicks(x0, x1, 6).forEach(function (t) { ctx.fillText(fmt(t), px(t), pad.t + H + 6); });
    ctx.fillText("step", pad.l + W / 2, pad.t + H + 22);
    var label = yLabel + (log ? " (log scale" + (hidden ? ", " + hidden + " values \u2264 0 hidden" : "") + ")" : "");
    ctx.save(); ctx.translate(12, pad.t + H / 2); ctx.rotate(-Math.PI / 2); ctx.fillText(label, 0, 0); ctx.restore();
    ctx.strokeStyle = "#888"; ctx.strokeRect(pad.l, pad.t, W, H);
    series.forEach(function (s) {
      ctx.strokeStyle = s.color; ctx.lineWidth = 1.6; ctx.beginPath();
      var pen = false;
      s.points.forEach(function (p) {
        var y = ty(p[1]);
        if (y === null) { pen = false; return; }
        if (pen) { ctx.lineTo(px(p[0]), py(y)); } else { ctx.moveTo(px(p[0]), py(y)); pen = true; }
      });
      ctx.stroke();
      ctx.fillStyle = s.color;
      s.points.forEach(function (p) { var y = ty(p[1]); if (y !== null) { ctx.fillRect(px(p[0]) - 1.5, py(y) - 1.5, 3, 3); } });
      (s.marks || []).forEach(function (m) {
        ctx.save(); ctx.strokeStyle = MARK; ctx.globalAlpha = 0.35; ctx.setLineDash([4, 3]);
        ctx.beginPath(); ctx.moveTo(px(m[0]), pad.t); ctx.lineTo(px(m[0]), pad.t + H); ctx.stroke(); ctx.restore();
        var y = ty(m[1]);
        if (y !== null) {
          ctx.strokeStyle = MARK; ctx.lineWidth = 2; ctx.beginPath(); ctx.arc(px(m[0]), py(y), 6, 0, 2 * Math.PI); ctx.stroke();
        }
      });
    });
    chartsDrawn += 1; report();
    return { px: px, py: function (y) { var t = ty(y); return t === null ? NaN : py(t); }, series: series };
  }

  function attachHover(canvas, readout, getView) {
    canvas.addEventListener("mousemove", function (ev) {
      var view = getView();
      if (!view) { return; }
      var rect = canvas.getBoundingClientRect(), mx = ev.clientX - rect.left, my = ev.clientY - rect.top, best = null;
      view.series.forEach(function (s) {
        s.points.forEach(function (p) {
          if (p[1] === null || !isFinite(p[1]) || isNaN(view.py(p[1]))) { return; }
          var d = Math.pow(view.px(p[0]) - mx, 2) + Math.pow(view.py(p[1]) - my, 2);
          if (!best || d < best.d) { best = { d: d, s: s, p: p }; }
        });
      });
      readout.textContent = best ? best.s.label + " @ step " + best.p[0] + ": " + fmt(best.p[1]) : "";
    });
  }

  function download(name, mime, content) {
    var a = el("a", { download: name });
    a.href = typeof content === "string" && content.indexOf("data:") === 0 ? content : URL.createObjectURL(new Blob([content], { type: mime }));
    document.body.appendChild(a); a.click(); a.remove();
  }
  function csvCell(v) { var s = String(v === null ? "" : v); return /[",\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s; }
  function toCsv(rows) {
    return "step,metric,component,layer,value\n" + rows.map(function (r) { return r.map(csvCell).join(","); }).join("\n") + "\n";
  }
  function safeFile(name) { return name.replace(/[^A-Za-z0-9_.-]+/g, "_"); }

  function buttons(parent, canvas, name, rows) {
    var bar = el("div", { "class": "buttons" });
    var png = el("button", { type: "button" }, "PNG");
    png.addEventListener("click", function () { download(safeFile(name) + ".png", "image/png", canvas.toDataURL("image/png")); });
    var csv = el("button", { type: "button" }, "CSV");
    csv.addEventListener("click", function () { download(safeFile(name) + ".csv", "text/csv", toCsv(rows())); });
    bar.appendChild(png); bar.appendChild(csv); parent.appendChild(bar);
  }

  function legend(parent, series) {
    var box = series.length > 12 ? el("details") : el("div");
    if (series.length > 12) { box.appendChild(el("summary", {}, series.length + " series")); }
    var list = el("ul", { "class": "legend" });
    series.forEach(function (s) {
      var item = el("li");
      var swatch = el("span", { "class": "swatch" }); swatch.style.background = s.color;
      item.appendChild(swatch); item.appendChild(document.createTextNode(s.label));
      list.appendChild(item);
    });
    box.appendChild(list); parent.appendChild(box);
  }

  function chartSeries(list, mode) {
    return list.map(function (s) {
      var values = normalise(s.points.map(function (p) { return p[1]; }), mode);
      var pts = s.points.map(function (p, i) { return [p[0], values[i]]; });
      var marks = transitionsOf(s).map(function (t) {
        for (var i = 0; i < pts.length; i++) { if (pts[i][0] === t.step) { return pts[i]; } }
        return [t.step, null];
      });
      return { color: s.color, label: (mode === undefined ? "" : s.metric + " · ") + s.key, points: pts, marks: marks };
    });
  }

  function hasPositive(series) {
    return series.some(function (s) { return s.points.some(function (p) { return p[1] !== null && p[1] > 0; }); });
  }

  /* A "log scale" checkbox; disabled when no value is positive. */
  function logToggle(parent, series, onChange) {
    var box = el("label", { "class": "log-toggle" });
    var input = el("input", { type: "checkbox" });
    input.disabled = !hasPositive(series);
    input.checked = LOG_DEFAULT && !input.disabled;
    if (input.disabled) { box.title = "no positive values"; }
    input.addEventListener("change", onChange);
    box.appendChild(input); box.appendChild(document.createTextNode(" log scale"));
    parent.appendChild(box);
    return input;
  }

  function transitionList(sec, hits) {
    if (!hits.length) { return; }
    var tl = el("details", { "class": "transitions" });
    tl.appendChild(el("summary", {}, hits.length + " transition(s)"));
    var ul = el("ul");
    hits.slice(0, 200).forEach(function (t) {
      ul.appendChild(el("li", {}, "step " + t.previous_step + " \u2192 " + t.step + ": " + t.component + " | " + t.layer +
        " (" + t.rule + ", score " + (t.score === null ? "inf" : fmt(t.score)) + ")"));
    });
    tl.appendChild(ul); sec.appendChild(tl);
  }

  function metricSection(container, group) {
    var info = byMetric[group], metric = info.metric, whole = info.whole;
    var sec = el("section", { "class": "chart" + (whole ? " whole-model" : "") });
    sec.appendChild(el("h2", {}, group));
    var canvas = el("canvas", { "class": "plot" });
    var series = chartSeries(info.list);
    var toggle = logToggle(sec, series, function () { view = drawChart(canvas, series, metric, toggle.checked); });
    sec.appendChild(canvas);
    var readout = el("div", { "class": "readout" }); sec.appendChild(readout);
    container.appendChild(sec);
    var view = drawChart(canvas, series, metric, toggle.checked);
    attachHover(canvas, readout, function () { return view; });
    buttons(sec, canvas, group, function () {
      return data.rows.filter(function (r) { return r[1] === metric && (r[2] === "whole_model") === whole; });
    });
    legend(sec, series);
    transitionList(sec, data.transitions.filter(function (t) {
      return t.metric === metric && (t.component === "whole_model") === whole;
    }));
  }

  function overlaySection(container) {
    var sec = el("section", { "class": "chart overlay" });
    sec.appendChild(el("h2", {}, "Overlay"));
    var controls = el("div", { "class": "controls" });
    var select = el("select", { multiple: "multiple", size: "8", id: "overlay-series" });
    var all = [];
    metricOrder.forEach(function (metric) {
      var group = el("optgroup", { label: metric });
      byMetric[metric].list.forEach(function (s, i) {
        var opt = el("option", { value: String(all.length) }, s.key);
        if (i === 0 && all.length < 60) { opt.selected = true; }
        all.push(s); group.appendChild(opt);
      });
      select.appendChild(group);
    });
    var mode = el("select", { id: "overlay-norm" });
    [["minmax", "normalise: min-max to [0, 1]"], ["zscore", "normalise: z-score"], ["none", "no normalisation"]].forEach(function (o) {
      mode.appendChild(el("option", { value: o[0] }, o[1]));
    });
    controls.appendChild(select); controls.appendChild(mode); sec.appendChild(controls);
    var allSeries = [];
    metricOrder.forEach(function (g) { allSeries = allSeries.concat(byMetric[g].list); });
    var toggle = logToggle(controls, allSeries, function () { redraw(); });
    var canvas = el("canvas", { "class": "plot" }); sec.appendChild(canvas);
    var readout = el("div", { "class": "readout" }); sec.appendChild(readout);
    var legendBox = el("div"); var view = null;
    function chosen() {
      return Array.prototype.filter.call(select.options, function (o) { return o.selected; }).map(function (o) { return all[Number(o.value)]; });
    }
    function redraw() {
      var picked = chosen().map(function (s, i) { return Object.assign({}, s, { color: PALETTE[i % PALETTE.length] }); });
      var series = chartSeries(picked, mode.value);
      view = drawChart(canvas, series, mode.value === "none" ? "value" : "normalised value", toggle.checked);
      legendBox.textContent = ""; legend(legendBox, series);
    }
    container.appendChild(sec);
    select.addEventListener("change", redraw); mode.addEventListener("change", redraw);
    attachHover(canvas, readout, function () { return view; });
    buttons(sec, canvas, "overlay", function () {
      var keys = chosen().map(function (s) { return s.metric + "\u0000" + s.key; });
      return data.rows.filter(function (r) { return keys.indexOf(r[1] + "\u0000" + r[2] + " | " + r[3]) >= 0; });
    });
    sec.appendChild(legendBox);
    redraw();
  }

  function main() {
    var root = document.getElementById("analog-charts");
    var all = el("button", { type: "button", id: "download-all" }, "Download all (CSV)");
    all.addEventListener("click", function () { download("metrics.csv", "text/csv", toCsv(data.rows)); });
    root.appendChild(all);
    if (metricOrder.length === 0) { root.appendChild(el("p", {}, "No metric values.")); report(); return; }
    if (metricOrder.length > 0) { overlaySection(root); }
    metricOrder.forEach(function (metric) { metricSection(root, metric); });
    report();
  }
  try { main(); } catch (e) { errors.push(String(e && e.message)); report(); throw e; }
}());
