// fashionrec's page: look up an item or drop a photo, see similar products, browse on.
// Plain JavaScript, no dependencies; every piece of data is set with textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { seq: 0, wanted: null, total: null, preview: null };

class UserError extends Error {}

const imageUrl = (id) => "/api/items/" + encodeURIComponent(String(id)) + "/image";

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  const box = $("error");
  box.hidden = true;
  box.textContent = "";
}

// k / same class / category, checked before anything is sent.
function options() {
  const raw = $("k").value.trim();
  const k = Number(raw);
  if (raw === "" || !Number.isInteger(k) || k < 1 || k > 100) {
    throw new UserError("k must be a whole number from 1 to 100.");
  }
  return { k, sameClass: $("same-class").checked, category: $("category").value.trim(),
           where: $("where").value.trim() };
}

// fetch + JSON; every failure becomes one sentence for the error box.
async function api(url, init) {
  let response;
  try {
    response = await fetch(url, init);
  } catch (e) {
    throw new UserError("The service is not reachable.");
  }
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const said = body && typeof body.error === "string" && body.error.trim();
    throw new UserError(said || "The service answered with status " + response.status + ".");
  }
  if (body === null || typeof body !== "object") {
    throw new UserError("The service sent an answer that could not be read.");
  }
  return body;
}

function setBusy(busy) {
  for (const id of ["find", "random", "photo"]) $(id).disabled = busy;
  $("drop-zone").classList.toggle("busy", busy);
  $("results").setAttribute("aria-busy", String(busy));
}

// One user action: controls off, "Loading…", timing, errors; the newest action wins.
async function run(task, onSuccess) {
  const seq = ++state.seq;
  setBusy(true);
  $("status").textContent = "Loading…";
  const t0 = performance.now();
  try {
    const result = await task();
    if (seq !== state.seq) return;
    const ms = Math.round(performance.now() - t0);
    clearError();
    if (onSuccess) onSuccess(result);
    render(result);
    const n = Array.isArray(result.items) ? result.items.length : 0;
    $("status").textContent = n + (n === 1 ? " item" : " items") + " in " + ms + " ms";
  } catch (e) {
    if (seq !== state.seq) return;
    showError(e instanceof UserError ? e.message : "Something went wrong in the page.");
    $("status").textContent = "";
    if (!(e instanceof UserError)) console.error(e);
  } finally {
    if (seq === state.seq) setBusy(false);
  }
}

// ------------------------------------------------------------------ rendering
function picture(src, alt, className) {
  const img = el("img", className);
  img.alt = alt;
  img.decoding = "async";
  img.addEventListener("load", () => {
    // tiny pictures (28x28 Fashion-MNIST) stay crisp; photos are smoothed
    if (img.naturalWidth > 0 && img.naturalWidth <= 64) img.classList.add("pixelated");
  });
  img.src = src;
  return img;
}

function renderQuery(query) {
  const box = $("query");
  box.replaceChildren();
  const isUpload = query.kind === "upload";
  const figure = el("figure", "query-figure");
  figure.append(isUpload
    ? picture(state.preview || "", "Your uploaded photo", "query-img")
    : picture(query.image_url || imageUrl(query.id), "Query item " + query.id, "query-img"));
  const info = el("div", "query-info");
  info.append(el("h2", null, "Query"));
  if (isUpload) {
    info.append(el("p", "query-id", "Your photo"));
  } else {
    info.append(el("p", "query-id", "Item " + query.id));
    if (query.true_class) info.append(el("p", null, "Class: " + query.true_class));
    const name = productName(query.attributes);
    if (name) info.append(el("p", "query-name", name));
  }
  if (query.predicted_class && (isUpload || query.predicted_class !== query.true_class)) {
    let text = "Predicted class: " + query.predicted_class;
    if (typeof query.probability === "number") {
      text += " (" + (query.probability * 100).toFixed(1) + "%)";
    }
    info.append(el("p", null, text));
  }
  const parts = [];
  if (query.filter) parts.push("Filter: " + query.filter);
  if (typeof query.n_candidates === "number") {
    parts.push(query.n_candidates + (query.n_candidates === 1 ? " candidate" : " candidates"));
  }
  if (parts.length) info.append(el("p", "query-filter", parts.join(" · ")));
  figure.append(info);
  box.append(figure);
}

// the product's name (when its catalog has one), and what the card lists under it
const NAME_ATTRIBUTES = ["name", "title", "productDisplayName", "display_name", "product_name"];
function productName(attributes) {
  if (!attributes) return null;
  const key = NAME_ATTRIBUTES.find((k) => typeof attributes[k] === "string");
  return key ? attributes[key] : null;
}

function shownAttributes(attributes) {
  if (!attributes) return [];
  const used = state.filterNames || [];
  const rest = Object.keys(attributes).filter((k) => !NAME_ATTRIBUTES.includes(k) && !used.includes(k));
  return used.filter((k) => k in attributes).concat(rest).slice(0, 4);
}

function card(item) {
  const button = el("button", "card");
  button.type = "button";
  button.title = "Show items similar to " + item.id;
  button.dataset.id = String(item.id);
  button.append(picture(item.image_url || imageUrl(item.id),
                        "Item " + item.id + " (" + item.class_name + ")", "card-img"));
  button.append(el("span", "card-rank", "#" + item.rank));
  const name = productName(item.attributes);
  if (name) button.append(el("span", "card-name", name));
  button.append(el("span", "card-id", item.id));
  button.append(el("span", "card-class", item.class_name));
  if (item.category) button.append(el("span", "card-category", item.category));
  const keys = shownAttributes(item.attributes);
  if (keys.length) {
    const list = el("ul", "card-attrs");
    for (const key of keys) list.append(el("li", null, key + ": " + String(item.attributes[key])));
    button.append(list);
  }
  const distance = Number(item.distance);
  button.append(el("span", "card-distance",
                   "distance " + (Number.isFinite(distance) ? distance.toFixed(4) : "n/a")));
  button.addEventListener("click", () => {
    $("item-id").value = String(item.id);
    showSimilar(item.id, true);
    const results = $("results");
    if (results.getBoundingClientRect().top < 0) results.scrollIntoView({ block: "start" });
  });
  return button;
}

function render(result) {
  const query = result.query || {};
  // the attributes the filter reads are listed first on each card
  state.filterNames = query.where ? (query.where.match(/[A-Za-z_][A-Za-z0-9_]*/g) || []) : [];
  renderQuery(query);
  const grid = $("grid");
  grid.replaceChildren();
  const items = Array.isArray(result.items) ? result.items : [];
  if (items.length === 0) grid.append(el("p", "empty", "No item matches these filters."));
  for (const item of items) grid.append(card(item));
  $("results").hidden = false;
}

// ------------------------------------------------------------------ URL hash
function hashId() {
  const match = /^#item=(.+)$/.exec(location.hash);
  if (!match) return null;
  try { return decodeURIComponent(match[1]); } catch (e) { return null; }
}

function setHash(id, replace) {
  const hash = "#item=" + encodeURIComponent(String(id));
  if (location.hash === hash) return;
  if (replace) history.replaceState(null, "", hash);
  else history.pushState(null, "", hash);
}

function onHash() {
  const id = hashId();
  if (id === null || id === state.wanted) return;
  $("item-id").value = id;
  showSimilar(id, false);
}

// ------------------------------------------------------------------ actions
function similarUrl(id, o) {
  const params = new URLSearchParams({ k: String(o.k), same_class: String(o.sameClass) });
  if (o.category) params.set("category", o.category);
  if (o.where) params.set("where", o.where);
  return "/api/items/" + encodeURIComponent(String(id)) + "/similar?" + params.toString();
}

function showSimilar(id, push) {
  state.wanted = String(id);
  run(() => api(similarUrl(id, options())), () => setHash(id, !push));
}

function randomItem(replace) {
  let picked = null;
  state.wanted = null;
  run(async () => {
    const o = options();
    let total = state.total;
    if (typeof total !== "number") total = (await api("/api/items?offset=0&limit=1")).total;
    if (!total) throw new UserError("The catalog is empty.");
    const offset = Math.floor(Math.random() * total);
    const page = await api("/api/items?offset=" + offset + "&limit=1");
    if (!page.items || page.items.length === 0) throw new UserError("No item was found at that position.");
    picked = page.items[0].id;
    state.wanted = String(picked);
    return api(similarUrl(picked, o));
  }, () => {
    $("item-id").value = String(picked);
    setHash(picked, replace);
  });
}

function upload(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showError("Please choose an image file (PNG, JPEG, WebP…).");
    return;
  }
  state.wanted = null;
  run(() => {
    const o = options();
    const form = new FormData();
    form.append("image", file, file.name || "photo");
    form.append("k", String(o.k));
    form.append("same_class", String(o.sameClass));
    if (o.category) form.append("category", o.category);
    if (o.where) form.append("where", o.where);
    return api("/api/similar", { method: "POST", body: form });
  }, () => {
    if (state.preview) URL.revokeObjectURL(state.preview);
    state.preview = URL.createObjectURL(file);
    if (location.hash) history.pushState(null, "", location.pathname + location.search);
  });
}

async function loadStats() {
  try {
    const stats = await api("/api/stats");
    state.total = typeof stats.items === "number" ? stats.items : null;
    const run_ = stats.run || {};
    const parts = [(state.total ?? "?") + " items"];
    if (run_.dataset) parts.push("dataset " + run_.dataset + (run_.kind ? " (" + run_.kind + ")" : ""));
    if (stats.index && stats.index.search) parts.push(stats.index.search + " search");
    $("summary").textContent = parts.join(" · ");
    if (run_.backbone) $("summary").title = "Backbone: " + run_.backbone;
    const names = Object.keys(stats.attributes || {});
    if (names.length) {
      $("where-field").hidden = false;
      $("where").title = "Attributes: " + names.map((n) => n + " (" + stats.attributes[n] + ")").join(", ");
    }
  } catch (e) {
    $("summary").textContent = "Visually similar products.";
  }
}

// ------------------------------------------------------------------ wiring
function init() {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = $("item-id").value.trim();
    if (!id) {
      showError("Enter an item id, or pick a random item.");
      $("item-id").focus();
      return;
    }
    showSimilar(id, true);
  });
  $("random").addEventListener("click", () => randomItem(false));
  $("photo").addEventListener("change", () => {
    const file = $("photo").files && $("photo").files[0];
    upload(file);
    $("photo").value = "";
  });

  const zone = $("drop-zone");
  const over = (on) => (event) => { event.preventDefault(); zone.classList.toggle("over", on); };
  zone.addEventListener("dragenter", over(true));
  zone.addEventListener("dragover", over(true));
  zone.addEventListener("dragleave", over(false));
  zone.addEventListener("drop", (event) => {
    over(false)(event);
    const files = event.dataTransfer && event.dataTransfer.files;
    if (files && files.length) upload(files[0]);
  });
  // a photo dropped beside the zone must not replace the page
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());

  window.addEventListener("popstate", onHash);
  window.addEventListener("hashchange", onHash);

  loadStats().then(() => {
    const id = hashId();
    if (id !== null) {
      $("item-id").value = id;
      showSimilar(id, false);
    } else {
      randomItem(true);
    }
  });
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
else init();
