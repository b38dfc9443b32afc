// The web console: vanilla JS, no build step, no third-party code (the CSP allows only this
// origin). Pages are hash routes; live data comes from one server-sent event stream (/feed)
// that the server fans out from its single tail of the store, so no page polls the list.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const HISTORY = 120; // seconds of throughput/latency on the charts
const MAX_ROWS = 500; // rows the live list keeps before dropping the oldest
// Leases are not events, so the feed does not carry them: the nodes page asks /nodes this often.
const NODES_EVERY_MS = 2000;
// Records that mean a step failed (order, payment and shipment streams): marked in the timeline.
const FAILURES = new Set([
  "PaymentFailed", "ShipmentFailed", "OrderFulfillmentFailed", "InventoryUnavailable",
  "ChargeDeclined", "ShipmentRefused",
]);
const COLUMNS = {
  order: (id) => "Order stream",
  payment: (id) => `Payment records (payment-${id})`,
  shipment: (id) => `Shipment records (shipment-${id})`,
};
const CHECKS = {
  one_terminal_event: "Every placed order has at most one terminal event, and starts with OrderPlaced",
  gapless_versions: "Stream versions run 0, 1, 2, … without gaps; nothing after the terminal event",
  stock_consistent: "Per product 0 ≤ reserved ≤ on hand, and reserved equals what paid and in-flight orders hold",
  reservations_settled: "Every reservation is kept (paid or in flight), consumed by its shipment, or released exactly once",
  money_balanced: "At most one charge per order; cancelled/failed orders refunded; charged − refunded = paid and shipped",
};

// --- small helpers ------------------------------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else if (key === "data") Object.assign(node.dataset, value);
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

class ApiError extends Error {
  constructor(status, body) {
    super(`${body.title || status}: ${body.detail || ""}`);
    this.status = status;
    this.code = body.code;
    this.detail = body.detail;
  }
}

async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const reply = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const answer = await reply.json();
  if (!reply.ok) throw new ApiError(reply.status, answer);
  return answer;
}

function showError(error) {
  const box = $("error");
  box.textContent = error ? String(error.message || error) : "";
  box.hidden = !error;
}

const ms = (value) =>
  value == null ? "–" : value >= 1000 ? `${(value / 1000).toFixed(2)} s` : `${value.toFixed(value < 10 ? 1 : 0)} ms`;
const clock = (iso) => new Date(iso).toLocaleTimeString();
const statusBadge = (status) => el("span", { class: `status ${status}`, text: status });
const seconds = (value) => (value == null ? "–" : `${value.toFixed(1)} s`);

// --- routing ------------------------------------------------------------------------------

let leavePage = () => {};

function route() {
  const [, page = "orders", arg] = location.hash.split("/");
  leavePage();
  leavePage = () => {};
  showError(null);
  const name = page === "order" && arg ? "order" : ["stock", "nodes", "audit"].includes(page) ? page : "orders";
  for (const section of document.querySelectorAll(".page")) section.hidden = section.id !== `page-${name}`;
  for (const link of document.querySelectorAll("nav a[data-page]")) {
    link.classList.toggle("active", link.dataset.page === (name === "order" ? "orders" : name));
  }
  const load = {
    orders: loadOrders, order: () => openOrder(decodeURIComponent(arg)), stock: loadStock, nodes: openNodes, audit: loadAudit,
  }[name];
  Promise.resolve(load()).catch(showError);
}

// --- the live feed ------------------------------------------------------------------------

const stats = [];

function connectFeed() {
  const feed = new EventSource("/feed");
  const live = $("live");
  feed.addEventListener("open", () => { live.textContent = "live"; live.className = "live on"; });
  feed.addEventListener("error", () => { live.textContent = "reconnecting"; live.className = "live off"; });
  feed.addEventListener("orders", (e) => onOrders(JSON.parse(e.data)));
  feed.addEventListener("stats", (e) => onStats(JSON.parse(e.data)));
  feed.addEventListener("resync", () => { if (!$("page-orders").hidden) loadOrders().catch(showError); });
}

// --- orders -------------------------------------------------------------------------------

const list = { status: "", customer: "", cursor: null, rows: new Map() };

function orderRow(order) {
  const link = el("a", { href: `#/order/${encodeURIComponent(order.order_id)}`, text: order.order_id });
  return el(
    "tr",
    { data: { orderId: order.order_id, status: order.status } },
    el("td", {}, link),
    el("td", { text: order.customer_id }),
    el("td", { class: "status-cell" }, statusBadge(order.status)),
    el("td", { class: "num", text: order.total_amount }),
    el("td", { text: order.payment_method }),
    el("td", { text: order.last_event }),
    el("td", { text: clock(order.placed_at) }),
  );
}

async function loadOrders(append = false) {
  const params = new URLSearchParams({ limit: "100" });
  if (list.status) params.set("status", list.status);
  if (list.customer) params.set("customer_id", list.customer);
  if (append && list.cursor) params.set("cursor", list.cursor);
  const page = await api(`/orders?${params}`);
  const body = $("orders-body");
  if (!append) { body.replaceChildren(); list.rows.clear(); }
  for (const order of page.orders) {
    const row = orderRow(order);
    list.rows.set(order.order_id, row);
    body.append(row);
  }
  list.cursor = page.next_cursor || null;
  $("more").hidden = !list.cursor;
  $("orders-count").textContent = `${list.rows.size} shown`;
}

function matches(order) {
  return (!list.status || order.status === list.status) && (!list.customer || order.customer_id === list.customer);
}

function onOrders(message) {
  $("kpi-inflight").textContent = message.pending;
  const body = $("orders-body");
  for (const order of message.orders) { // oldest first: each new one goes on top
    const old = list.rows.get(order.order_id);
    if (old && !matches(order)) { old.remove(); list.rows.delete(order.order_id); continue; }
    if (!old && !matches(order)) continue;
    const row = orderRow(order);
    if (old) old.replaceWith(row);
    else { row.classList.add("fresh"); body.prepend(row); }
    list.rows.set(order.order_id, row);
  }
  while (list.rows.size > MAX_ROWS) {
    const last = body.lastElementChild;
    list.rows.delete(last.dataset.orderId);
    last.remove();
  }
  $("orders-count").textContent = `${list.rows.size} shown`;
}

// --- throughput and latency charts --------------------------------------------------------

function onStats(entries) {
  stats.push(...entries);
  stats.splice(0, Math.max(0, stats.length - HISTORY));
  const last = stats[stats.length - 1];
  if (!last) return;
  $("kpi-rate").textContent = last.completed;
  $("kpi-p50").textContent = ms(last.p50_ms);
  $("kpi-p99").textContent = ms(last.p99_ms);
  $("kpi-inflight").textContent = last.in_flight;
  drawChart($("chart-rate"), [{ cls: "rate", values: stats.map((s) => s.completed), area: true }], "/s");
  drawChart($("chart-latency"), [
    { cls: "p50", values: stats.map((s) => s.p50_ms) },
    { cls: "p99", values: stats.map((s) => s.p99_ms) },
  ], " ms");
}

function niceMax(value) {
  if (value <= 0) return 1;
  const step = 10 ** Math.floor(Math.log10(value));
  return [1, 2, 5, 10].map((m) => m * step).find((m) => m >= value);
}

function drawChart(node, series, unit) {
  const width = 600, height = 140, left = 44, top = 8, bottom = 16;
  const all = series.flatMap((s) => s.values.filter((v) => v != null));
  const max = niceMax(Math.max(0, ...all));
  const x = (i) => left + (i * (width - left - 4)) / (HISTORY - 1);
  const y = (v) => top + (1 - v / max) * (height - top - bottom);
  node.replaceChildren();
  for (const v of [0, max / 2, max]) {
    node.append(svg("line", { class: "grid", x1: left, x2: width, y1: y(v), y2: y(v) }));
    const label = svg("text", { class: "axis", x: left - 6, y: y(v) + 3, "text-anchor": "end" });
    label.textContent = unit === " ms" ? (v ? ms(v) : "0") : `${+v.toFixed(1)}${unit}`;
    node.append(label);
  }
  for (const s of series) {
    const offset = HISTORY - s.values.length;
    const points = s.values.map((v, i) => (v == null ? null : [x(i + offset), y(v)])).filter(Boolean);
    if (!points.length) continue;
    const path = points.map(([px, py], i) => `${i ? "L" : "M"}${px.toFixed(1)},${py.toFixed(1)}`).join("");
    if (s.area) {
      const [firstX] = points[0], [lastX] = points[points.length - 1];
      node.append(svg("path", { class: "area", d: `${path}L${lastX},${y(0)}L${firstX},${y(0)}Z` }));
    }
    node.append(svg("path", { class: s.cls, d: path }));
  }
}

// --- one order: facts and timeline --------------------------------------------------------

async function openOrder(orderId) {
  let reload = null;
  const feed = new EventSource(`/feed?order_id=${encodeURIComponent(orderId)}`);
  feed.addEventListener("events", () => { // coalesce a burst of events into one reload
    clearTimeout(reload);
    reload = setTimeout(() => renderOrder(orderId).catch(showError), 150);
  });
  leavePage = () => { feed.close(); clearTimeout(reload); shownOrder = null; };
  $("cancel-order").hidden = true;
  $("cancel-note").hidden = true;
  await renderOrder(orderId);
}

// An order can be cancelled while pending, or paid and still waiting for its shipment; the
// server decides (a cancel that comes too late is a conflict), the button only avoids asking.
const cancellable = (order) => order.status === "pending" || (order.status === "paid" && order.shipping != null);

function orderFacts(order) {
  const facts = [
    ["Customer", order.customer_id], ["Total", order.total_amount],
    ["Payment method", order.payment_method], ["Placed", order.placed_at],
    ["Reason", order.reason || "–"], ["Last event", `${order.last_event} (v${order.version})`],
  ];
  if (order.shipping) {
    const { address: a, carrier } = order.shipping;
    facts.push(["Ship to", `${a.name}, ${a.line1}, ${a.postal_code} ${a.city}, ${a.country}`], ["Carrier", carrier]);
  }
  if (order.tracking_number) facts.push(["Tracking", order.tracking_number], ["Shipped", order.shipped_at]);
  if (order.cancelled_by) facts.push(["Cancelled by", order.cancelled_by]);
  return facts;
}

let shownOrder = null;

async function renderOrder(orderId) {
  const [order, timeline] = await Promise.all([
    api(`/orders/${encodeURIComponent(orderId)}`),
    api(`/orders/${encodeURIComponent(orderId)}/timeline`),
  ]);
  shownOrder = order;
  $("order-id").textContent = order.order_id;
  const badge = $("order-status");
  badge.textContent = order.status;
  badge.className = `status ${order.status}`;
  $("cancel-order").hidden = !cancellable(order);
  const facts = orderFacts(order);
  $("order-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v ?? "–" })]));
  $("timeline-total").textContent = `${ms(timeline.total_ms)} from placement to the last record`;
  renderTimeline(timeline, order.shipping != null);
}

async function cancelOrder() {
  const order = shownOrder;
  if (!order) return;
  const reason = window.prompt(`Cancel order ${order.order_id}? Reason:`, "customer request");
  if (reason === null) return; // the person changed their mind
  const note = $("cancel-note");
  note.hidden = false;
  note.className = "note";
  note.textContent = "cancelling…";
  $("cancel-order").disabled = true;
  try {
    const path = `/orders/${encodeURIComponent(order.order_id)}/cancel`;
    const done = await api(path, { method: "POST", body: { reason: reason.trim() || "customer request" } });
    note.textContent = `cancelled: ${done.reason || reason}`;
  } catch (error) {
    // A conflict is an answer, not a fault: the order ended otherwise before the cancel.
    note.className = "note bad";
    note.textContent = error.code === "conflict" ? `Not cancelled: ${error.detail}` : String(error.message || error);
  } finally {
    $("cancel-order").disabled = false;
  }
  await renderOrder(order.order_id);
}

function barClass(entry) {
  if (entry.compensation) return "comp";
  if (FAILURES.has(entry.type)) return "fail";
  if (entry.type === "OrderShipped") return "shipped";
  return { payment: "pay", shipment: "ship" }[entry.source] || "";
}

function timelineCell(entry, total) {
  const bar = el("div", { class: `tl-bar ${barClass(entry)}` });
  // The bar spans from the previous entry to this one, on the order's whole time axis.
  bar.style.left = `${((entry.since_start_ms - entry.duration_ms) / total) * 100}%`;
  bar.style.width = `${(entry.duration_ms / total) * 100}%`;
  const name = el("div", { class: "tl-name", title: JSON.stringify(entry.data, null, 1), text: entry.type });
  if (entry.compensation) name.append(el("span", { class: "tag", text: "↺ compensation" }));
  else if (FAILURES.has(entry.type)) name.append(el("span", { class: "tag fail", text: "✕ failed" }));
  return el("div", { class: `tl-cell ${entry.source}` },
    name, el("div", { class: "tl-track" }, bar), el("div", { class: "tl-dur", text: `+${ms(entry.duration_ms)}` }));
}

function renderTimeline(timeline, withShipment) {
  const total = Math.max(timeline.total_ms, 0.001);
  // A shipment column only for orders that have (or may get) shipment records.
  const columns = ["order", "payment"];
  if (withShipment || timeline.entries.some((e) => e.source === "shipment")) columns.push("shipment");
  const box = $("timeline");
  box.className = `timeline cols-${columns.length}`;
  const header = el("div", { class: "tl-row" },
    ...columns.map((c) => el("div", { class: `tl-cell tl-head ${c}`, text: COLUMNS[c](timeline.order_id) })));
  const rows = timeline.entries.map((entry) => el("div", {
    class: `tl-row${entry.compensation ? " compensation" : ""}${FAILURES.has(entry.type) ? " failure" : ""}`,
    data: { type: entry.type, source: entry.source, compensation: String(entry.compensation) },
  }, ...columns.map((c) => (c === entry.source ? timelineCell(entry, total) : el("div", { class: "tl-cell empty" })))));
  box.replaceChildren(header, ...rows);
}

// --- nodes --------------------------------------------------------------------------------

async function openNodes() {
  const timer = setInterval(() => loadNodes().then(() => showError(null), showError), NODES_EVERY_MS);
  leavePage = () => clearInterval(timer);
  await loadNodes();
}

async function loadNodes() {
  const { self, nodes } = await api("/nodes");
  const state = (node) => (node.state === "live" || node.state === "single" ? "ok" : "bad");
  $("nodes-body").replaceChildren(...nodes.map((node) => el("tr", { data: { nodeId: node.node_id, state: node.state } },
    el("td", {}, el("span", { class: "mono", text: node.node_id ?? "(no node id)" }),
      ...(node.node_id === self ? [el("span", { class: "tag-self", text: "this node" })] : [])),
    el("td", { class: "mono", text: node.address || "–" }),
    el("td", {}, el("span", { class: `status ${state(node)}`, text: node.state })),
    el("td", { class: "num", text: seconds(node.lease_age_s) }),
    el("td", { class: "num", text: seconds(node.lease_expires_in_s) }),
    el("td", { class: "num", text: node.orders_owned ?? "–" }),
    el("td", { class: "num", text: node.orders_in_flight ?? "–" }))));
  const live = nodes.filter((n) => state(n) === "ok").length;
  $("nodes-summary").textContent = `${live} of ${nodes.length} live · updated ${new Date().toLocaleTimeString()}`;
}

// --- stock and audit ----------------------------------------------------------------------

async function loadStock() {
  const stock = await api("/stock");
  $("stock-body").replaceChildren(...Object.keys(stock).sort().map((product) => {
    const { on_hand: onHand, reserved, available } = stock[product];
    const fill = el("span");
    fill.style.width = `${onHand ? (reserved / onHand) * 100 : 0}%`;
    return el("tr", { data: { product } },
      el("td", { text: product }), el("td", { class: "num", text: onHand }),
      el("td", { class: "num", text: reserved }), el("td", { class: "num", text: available }),
      el("td", {}, el("div", { class: "bar", title: `${reserved} of ${onHand} reserved` }, fill)));
  }));
}

async function loadAudit() {
  $("audit-result").textContent = "running…";
  $("audit-result").className = "status";
  const audit = await api("/audit");
  $("audit-result").textContent = audit.ok ? "all checks pass" : "violations";
  $("audit-result").className = `status ${audit.ok ? "ok" : "bad"}`;
  const counts = Object.entries(audit.status_counts).map(([s, n]) => `${n} ${s}`).join(", ");
  $("audit-summary").textContent = `${audit.orders} orders (${counts || "none"}); ${audit.in_flight_count} in flight; ` +
    `charged ${audit.charged}, refunded ${audit.refunded}, paid orders ${audit.paid_total}`;
  $("audit-checks").replaceChildren(...Object.entries(audit.checks).map(([name, check]) =>
    el("div", { class: `check ${check.ok ? "ok" : "bad"}`, data: { check: name } },
      el("h4", {}, statusBadge(check.ok ? "ok" : "bad"), ` ${name}`),
      el("p", { text: `${CHECKS[name] || ""} — ${check.ok ? "holds" : `${check.violation_count} violations`}` }),
      ...(check.violations.length ? [el("ul", {}, ...check.violations.map((v) => el("li", { text: v })))] : []))));
}

// --- start --------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("filters").addEventListener("submit", (e) => {
    e.preventDefault();
    list.status = $("filter-status").value;
    list.customer = $("filter-customer").value.trim();
    loadOrders().catch(showError);
  });
  $("filter-status").addEventListener("change", () => $("filters").requestSubmit());
  $("more").addEventListener("click", () => loadOrders(true).catch(showError));
  $("audit-again").addEventListener("click", () => loadAudit().catch(showError));
  $("cancel-order").addEventListener("click", () => cancelOrder().catch(showError));
  for (const id of ["chart-rate", "chart-latency"]) drawChart($(id), [], id === "chart-rate" ? "/s" : " ms");
  window.addEventListener("hashchange", route);
  connectFeed();
  route();
});
