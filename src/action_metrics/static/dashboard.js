/* action-metrics dashboard page.
 *
 * Every figure comes from the JSON endpoints (/v1/towns, /v1/town/{town}/metrics, .../breakdown,
 * .../checks), read with the token this tab's session storage keeps and sent only in an Authorization
 * header: never in a URL, a cookie or the page. What is shown (town, range, zone) is kept in the page's
 * own address (`?town=&range=&tz=`, `&since=&until=` for a custom range), so a reload or a bookmark
 * shows the same view; the token never goes there. `report --html` embeds the same answers in an
 * <script type="application/json" id="am-data"> element; the page then draws them without a network.
 * Charts: uPlot (static/uPlot.iife.min.js, MIT).
 */
"use strict";

(() => {
  const TOKEN_KEY = "action-metrics.token";
  const TZ_KEY = "action-metrics.tz";
  const TOWN_KEY = "action-metrics.town";
  const COLORS = { cost: "#d9480f", revenue: "#2b8a3e", profit: "#1c7ed6", p50: "#1c7ed6", p95: "#e8590c", p99: "#c92a2a", margin: "#5f3dc4" };

  const $ = (id) => document.getElementById(id);
  let view = null;
  let refreshes = 0;  // the latest refresh draws; an earlier one answering late is dropped
  let lastPreset = 168;  // the preset a custom range starts from
  let askedTown = null;  // the town the page's address names, chosen when the towns are listed

  class Unauthorized extends Error {}

  // --- reading the endpoints -----------------------------------------------------------------

  function bucketFor(hours) {
    return hours <= 24 * 7 ? "hour" : "day";
  }

  function authorization() {
    const token = sessionStorage.getItem(TOKEN_KEY);
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  async function getJSON(path, params = []) {
    const url = new URL(path, document.baseURI);
    for (const [name, value] of params) url.searchParams.append(name, value);
    const response = await fetch(url, {
      headers: authorization(), cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer",
    });
    if (response.status === 401) throw new Unauthorized("the token was refused");
    if (!response.ok) {
      let detail = response.statusText;
      try {
        detail = problem((await response.json()).detail);
      } catch (_) { /* not JSON: keep the status text */ }
      throw new Error(`${url.pathname}: ${response.status} ${detail}`);
    }
    return response.json();
  }

  /** A 422's list of problems as a sentence, each naming its parameter. */
  function problem(detail) {
    if (!Array.isArray(detail)) return typeof detail === "string" ? detail : JSON.stringify(detail);
    return detail.map((item) => {
      const name = Array.isArray(item.loc) ? item.loc[item.loc.length - 1] : "";
      return name && !String(item.msg).startsWith(`${name}:`) ? `${name}: ${item.msg}` : item.msg;
    }).join("; ");
  }

  /** The answers one view of the page needs, in the shape `report --html` embeds. */
  async function loadView(town, window, tz) {
    // A URL's path cannot hold the ids "." and "..", encoded or not: browsers resolve them as "here"
    // and "up". The server takes those as ?town_id= on /v1/town/metrics (and .../breakdown, .../checks).
    const inQuery = town === "." || town === "..";
    const base = inQuery ? "v1/town/" : `v1/town/${encodeURIComponent(town)}/`;
    const shared = inQuery ? [["town_id", town], ...window.params] : window.params;
    const bucket = bucketFor(window.hours);
    const [metrics, buckets, latency, topCost, topLoss, checks] = await Promise.all([
      getJSON(base + "metrics", shared),
      getJSON(base + "breakdown", [["bucket", bucket], ["tz", tz], ...shared]),
      getJSON(base + "breakdown", [["by", "action_type"], ["bucket", bucket], ["tz", tz], ...shared]),
      getJSON(base + "breakdown", [["by", "user_id"], ["sort", "total_cost_usd"], ["top", "10"], ...shared]),
      getJSON(base + "breakdown", [["by", "user_id"], ["sort", "total_profit_usd"], ["order", "asc"], ["top", "10"], ...shared]),
      getJSON(base + "checks", shared),
    ]);
    return {
      town_id: town, since_hours: window.hours, since: window.since, until: window.until, tz, bucket,
      generated_at: new Date().toISOString(),
      metrics, buckets: buckets.rows, latency: latency.rows, top_cost: topCost.rows, top_loss: topLoss.rows,
      checks,
    };
  }

  // --- time zones: the custom range's inputs are wall-clock times in the chosen zone ------------

  const wallClocks = new Map();
  function wallClockFormat(tz) {
    if (!wallClocks.has(tz)) {
      try {
        wallClocks.set(tz, new Intl.DateTimeFormat("en-US", {
          timeZone: tz, hourCycle: "h23", year: "numeric", month: "2-digit", day: "2-digit",
          hour: "2-digit", minute: "2-digit", second: "2-digit",
        }));
      } catch (_) {
        throw new Error(`unknown time zone "${tz}": use an IANA name such as Europe/Berlin`);
      }
    }
    return wallClocks.get(tz);
  }

  /** The wall clock of `tz` at an instant (ms), as the milliseconds of that same reading in UTC. */
  function wallClock(instant, tz) {
    const parts = {};
    for (const { type, value } of wallClockFormat(tz).formatToParts(new Date(instant))) parts[type] = Number(value);
    return Date.UTC(parts.year, parts.month - 1, parts.day, parts.hour, parts.minute, parts.second);
  }

  /** The instant (ms) a datetime-local value ("2025-06-01T09:30") names in `tz`; NaN if none. */
  function zonedInstant(local, tz) {
    const found = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2}))?/.exec(local);
    if (!found) return NaN;
    const [year, month, day, hour, minute, second] = found.slice(1).map((part) => Number(part || 0));
    const wall = Date.UTC(year, month - 1, day, hour, minute, second);
    // The zone's offset at a first guess, then at the instant that guess gives: right on both sides
    // of a change of the clocks (a time the change skipped lands just after it).
    const guess = wall - (wallClock(wall, tz) - wall);
    return wall - (wallClock(guess, tz) - Math.floor(guess / 1000) * 1000);
  }

  /** An instant as a datetime-local value in `tz`, to the minute. */
  function localInput(instant, tz) {
    return new Date(wallClock(instant, tz)).toISOString().slice(0, 16);
  }

  // --- formatting ------------------------------------------------------------------------------

  function number(value, digits = 0) {
    return value.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
  }
  function usd(value) {
    const digits = Math.abs(value) < 1 ? 6 : 2;
    return `${value < 0 ? "-" : ""}$${number(Math.abs(value), digits)}`;
  }
  function percent(value) {
    return value === null ? "-" : `${(value * 100).toFixed(1)}%`;
  }
  const compact = new Intl.NumberFormat("en-US", { notation: "compact", maximumSignificantDigits: 3 });
  function usdAxis(value) {
    return `${value < 0 ? "-" : ""}$${compact.format(Math.abs(value))}`;
  }
  function ms(value) {
    return value === null ? "-" : `${number(value, 1)} ms`;
  }
  function hoursLabel(hours) {
    const named = { 24: "24 h", 168: "7 d", 720: "30 d", 2160: "90 d" };
    return named[hours] || (hours < 48 ? `${number(hours, 1)} h` : `${number(hours / 24, 1)} d`);
  }

  function show(id, value, text, alarm = false) {
    const element = $(id);
    element.textContent = text;
    element.dataset.value = value === null ? "" : String(value);
    element.classList.toggle("negative", typeof value === "number" && value < 0);
    const tile = element.closest(".kpi");
    if (tile) tile.classList.toggle("alarm", alarm);
  }

  function cell(text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    return td;
  }
  function barCell(value, largest, className) {
    const td = document.createElement("td");
    td.className = "bar-cell";
    const bar = document.createElement("div");
    bar.className = className;
    bar.style.width = `${largest > 0 && value > 0 ? Math.max((100 * value) / largest, 1) : 0}%`;  // CSSOM: allowed by the CSP
    td.append(bar);
    return td;
  }

  // --- charts ----------------------------------------------------------------------------------

  function seconds(row) {
    return Date.parse(row.bucket_start) / 1000;
  }

  function drawChart(id, rows, series, format, axisFormat = format) {
    const element = $(id);
    element.replaceChildren();
    const sorted = [...rows].sort((a, b) => seconds(a) - seconds(b));
    element.dataset.points = String(sorted.length);
    if (!sorted.length) {
      const empty = document.createElement("p");
      empty.className = "subtitle";
      empty.textContent = "no actions in this range";
      element.append(empty);
      return;
    }
    const data = [sorted.map(seconds), ...series.map((s) => sorted.map(s.value))];
    const end = Date.parse(view.until || view.generated_at) / 1000;
    const start = view.since ? Date.parse(view.since) / 1000 : end - view.since_hours * 3600;
    const options = {
      width: Math.max(element.clientWidth, 240),
      height: 220,
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), view.tz),
      // The whole window, so a lone bucket sits where it happened.
      scales: { x: { time: true, range: () => [start, end] } },
      series: [
        {},
        ...series.map((s) => ({
          label: s.label, stroke: s.color, width: 2, spanGaps: false,
          points: { show: sorted.length < 50 },
          value: (_, v) => (v === null || v === undefined ? "-" : format(v)),
        })),
      ],
      axes: [{}, { size: 72, values: (_, ticks) => ticks.map(axisFormat) }],
    };
    new uPlot(options, data, element);
  }

  function drawLatency() {
    const action = $("latency-action").value;
    const rows = action === "" ? view.buckets : view.latency.filter((row) => row.action_type === action);
    drawChart("chart-latency", rows, [
      { label: "p50", color: COLORS.p50, value: (row) => row.p50_latency_ms },
      { label: "p95", color: COLORS.p95, value: (row) => row.p95_latency_ms },
      { label: "p99", color: COLORS.p99, value: (row) => row.p99_latency_ms },
    ], (v) => `${number(v, v < 10 ? 1 : 0)}`);
  }

  // --- the page --------------------------------------------------------------------------------

  function windowLabel() {
    if (!view.until) return `last ${hoursLabel(view.since_hours)}`;
    const moment = (iso) => new Date(iso).toLocaleString("en-GB", { timeZone: view.tz, dateStyle: "medium", timeStyle: "short" });
    return `${moment(view.since)} to ${moment(view.until)}`;
  }

  function render() {
    const m = view.metrics.metrics;
    $("subtitle").textContent =
      `${view.town_id ?? "all towns"} · ${windowLabel()} · per ${view.bucket} in ${view.tz}` +
      ` · read ${new Date(view.generated_at).toLocaleString("en-GB", { timeZone: view.tz })}`;
    for (const element of document.querySelectorAll(".bucket-name")) element.textContent = view.bucket;

    show("kpi-count", m.count, number(m.count));
    show("kpi-cost", m.total_cost_usd, usd(m.total_cost_usd));
    show("kpi-revenue", m.total_revenue_usd, usd(m.total_revenue_usd));
    show("kpi-profit", m.total_profit_usd, usd(m.total_profit_usd), m.total_profit_usd < 0);
    show("kpi-margin", m.gross_margin, percent(m.gross_margin), m.gross_margin !== null && m.gross_margin < 0);
    show("kpi-p95", m.p95_latency_ms, ms(m.p95_latency_ms));
    show("kpi-unpriced", m.unpriced_count, number(m.unpriced_count), m.unpriced_count > 0);
    show("kpi-errors", m.error_count, number(m.error_count), m.error_count > 0);
    $("unpriced-alert").hidden = m.unpriced_count === 0;
    $("unpriced-alert-count").textContent = number(m.unpriced_count);

    const checks = $("checks");
    checks.replaceChildren();
    for (const check of view.checks.checks) {
      const tr = document.createElement("tr");
      tr.dataset.status = check.status;
      tr.append(
        cell(check.status.toUpperCase(), `verdict ${check.status.replace(" ", "-")}`),
        cell(check.kind), cell(check.name), cell(check.detail),
      );
      checks.append(tr);
    }

    drawChart("chart-money", view.buckets, [
      { label: "cost", color: COLORS.cost, value: (row) => row.total_cost_usd },
      { label: "revenue", color: COLORS.revenue, value: (row) => row.total_revenue_usd },
      { label: "profit", color: COLORS.profit, value: (row) => row.total_profit_usd },
    ], usd, usdAxis);
    drawChart("chart-margin", view.buckets, [
      { label: "gross margin", color: COLORS.margin, value: (row) => row.gross_margin },
    ], percent);

    const select = $("latency-action");
    const chosen = select.value;
    const actions = [...new Set(view.latency.map((row) => row.action_type))].sort();
    select.replaceChildren(new Option("all actions", ""), ...actions.map((a) => new Option(a, a)));
    select.value = actions.includes(chosen) ? chosen : "";
    drawLatency();

    const models = Object.entries(m.by_model).sort((a, b) => b[1].total_cost_usd - a[1].total_cost_usd);
    const costliest = Math.max(0, ...models.map(([, s]) => s.total_cost_usd));
    $("models").replaceChildren(...models.map(([model, s]) => {
      const tr = document.createElement("tr");
      tr.dataset.model = model;
      tr.append(cell(model), cell(number(s.count), "number"), cell(usd(s.total_cost_usd), "number"),
        cell(ms(s.p95_latency_ms), "number"),
        cell(s.unpriced_count ? number(s.unpriced_count) : "", s.unpriced_count ? "number negative" : "number"),
        barCell(s.total_cost_usd, costliest, "bar"));
      return tr;
    }));

    const topCost = Math.max(0, ...view.top_cost.map((row) => row.total_cost_usd));
    $("top-cost").replaceChildren(...view.top_cost.map((row) => {
      const tr = document.createElement("tr");
      tr.dataset.user = row.user_id;
      tr.append(cell(row.user_id), cell(number(row.count), "number"), cell(usd(row.total_cost_usd), "number"),
        cell(usd(row.total_revenue_usd), "number"), barCell(row.total_cost_usd, topCost, "bar"));
      return tr;
    }));

    const losers = view.top_loss.filter((row) => row.total_profit_usd < 0);
    const topLoss = Math.max(0, ...losers.map((row) => -row.total_profit_usd));
    const lossRows = losers.map((row) => {
      const tr = document.createElement("tr");
      tr.dataset.user = row.user_id;
      tr.append(cell(row.user_id), cell(number(row.count), "number"),
        cell(usd(-row.total_profit_usd), "number negative"), cell(usd(row.total_revenue_usd), "number"),
        barCell(-row.total_profit_usd, topLoss, "bar loss"));
      return tr;
    });
    if (!lossRows.length) {
      const tr = document.createElement("tr");
      const td = cell("no user costs more than they pay");
      td.colSpan = 5;
      tr.append(td);
      lossRows.push(tr);
    }
    $("top-loss").replaceChildren(...lossRows);
  }

  function showError(error) {
    $("error").hidden = false;
    $("error").textContent = String(error.message || error);
    document.body.dataset.state = "error";
  }

  /** The window the controls name: a preset's last N hours, or the custom range read in `tz`. */
  function chosenWindow(tz) {
    const range = $("range").value;
    if (range !== "custom") {
      return { hours: Number(range), since: null, until: null, params: [["since_hours", range]] };
    }
    const since = zonedInstant($("custom-since").value, tz);
    const until = zonedInstant($("custom-until").value, tz);
    if (!Number.isFinite(since)) throw new Error("choose the start of the custom range");
    if (!Number.isFinite(until)) throw new Error("choose the end of the custom range");
    if (!(since < until)) throw new Error("the custom range must end after it starts");
    const [from, to] = [new Date(since).toISOString(), new Date(until).toISOString()];
    return { hours: (until - since) / 3_600_000, since: from, until: to, params: [["since", from], ["until", to]] };
  }

  /** Switching to a custom range starts it as the preset it replaces: the last N hours to now. */
  function startCustomRange() {
    if ($("custom-since").value && $("custom-until").value) return;
    try {
      const tz = $("tz").value.trim() || "UTC";
      const now = Date.now();
      $("custom-since").value = localInput(now - lastPreset * 3_600_000, tz);
      $("custom-until").value = localInput(now, tz);
    } catch (_) { /* an unknown zone: refresh() says so */ }
  }

  /** The view in the page's address, replacing it (no history entry per change): a reload shows it again. */
  function rememberView(town, chosen, tz) {
    const shown = new URLSearchParams([["town", town], ["range", $("range").value], ["tz", tz]]);
    if (chosen.until) {
      shown.set("since", chosen.since);
      shown.set("until", chosen.until);
    }
    history.replaceState(null, "", `${location.pathname}?${shown}`);
  }

  /** The view the address names, if any: its zone and range into the controls; its town is chosen
   * once the towns are listed. Anything it names that the page does not offer is ignored. */
  function restoreView() {
    const asked = new URLSearchParams(location.search);
    if (asked.get("tz")) $("tz").value = asked.get("tz");
    const range = asked.get("range");
    if (![...$("range").options].some((option) => option.value === range)) return asked.get("town");
    $("range").value = range;
    if (range === "custom") {
      $("custom-range").hidden = false;
      const tz = $("tz").value.trim() || "UTC";
      const [since, until] = [Date.parse(asked.get("since")), Date.parse(asked.get("until"))];
      try {
        if (Number.isFinite(since)) $("custom-since").value = localInput(since, tz);
        if (Number.isFinite(until)) $("custom-until").value = localInput(until, tz);
      } catch (_) { /* an unknown zone: refresh() says so */ }
    } else {
      lastPreset = Number(range);
    }
    return asked.get("town");
  }

  async function refresh() {
    const mine = ++refreshes;
    document.body.dataset.state = "loading";
    $("error").hidden = true;
    try {
      const tz = $("tz").value.trim() || "UTC";
      sessionStorage.setItem(TZ_KEY, tz);
      sessionStorage.setItem(TOWN_KEY, $("town").value);
      const chosen = chosenWindow(tz);
      rememberView($("town").value, chosen, tz);
      const started = performance.now();
      const loaded = await loadView($("town").value, chosen, tz);
      if (mine !== refreshes) return;
      view = loaded;
      const elapsed = performance.now() - started;
      render();
      $("footer").textContent = `Data read from 6 JSON requests in ${number(elapsed)} ms.`;
      document.body.dataset.state = "ready";
    } catch (error) {
      if (mine !== refreshes) return;
      if (error instanceof Unauthorized) return signIn("The token was refused: sign in again.");
      showError(error);
    }
  }

  function signIn(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    $("dashboard").hidden = true;
    $("controls").hidden = true;
    $("sign-in").hidden = false;
    $("sign-in-error").hidden = !message;
    $("sign-in-error").textContent = message || "";
    document.body.dataset.state = "signed-out";
    $("token").focus();
  }

  async function connect() {
    let towns;
    try {
      ({ towns } = await getJSON("v1/towns"));
    } catch (error) {
      if (error instanceof Unauthorized) {
        return signIn(sessionStorage.getItem(TOKEN_KEY) ? "The token was refused." : "");
      }
      $("dashboard").hidden = false;
      return showError(error);
    }
    $("sign-in").hidden = true;
    $("controls").hidden = false;
    $("dashboard").hidden = false;
    $("sign-out").hidden = !sessionStorage.getItem(TOKEN_KEY);
    const remembered = askedTown ?? sessionStorage.getItem(TOWN_KEY);
    askedTown = null;
    $("town").replaceChildren(...towns.map((town) => new Option(town, town)));
    if (!towns.length) return showError(new Error("this token may read no town with recorded actions yet"));
    $("town").value = towns.includes(remembered) ? remembered : towns[0];
    await refresh();
  }

  function start() {
    const embedded = $("am-data");
    if (embedded) {
      view = JSON.parse(embedded.textContent);
      $("controls").hidden = true;
      $("dashboard").hidden = false;
      render();
      $("footer").textContent = "Written by action-metrics report --html.";
      document.body.dataset.state = "ready";
      $("latency-action").addEventListener("change", drawLatency);
      return;
    }
    $("tz").value = sessionStorage.getItem(TZ_KEY) || Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
    askedTown = restoreView();
    if (Intl.supportedValuesOf) {  // the zones this browser knows, offered as the reader types
      $("zones").replaceChildren(...Intl.supportedValuesOf("timeZone").map((zone) => new Option(zone)));
    }
    $("sign-in-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token").value.trim();
      $("token").value = "";
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
      connect();
    });
    $("sign-out").addEventListener("click", () => signIn(""));
    $("controls").addEventListener("submit", (event) => { event.preventDefault(); refresh(); });
    $("range").addEventListener("change", () => {
      const custom = $("range").value === "custom";
      $("custom-range").hidden = !custom;
      if (custom) startCustomRange();
      else lastPreset = Number($("range").value);
      refresh();
    });
    for (const id of ["town", "tz", "custom-since", "custom-until"]) $(id).addEventListener("change", refresh);
    $("latency-action").addEventListener("change", drawLatency);
    connect();
  }

  start();
})();
