// fashionrec's page: look up an item or drop a photo, see similar products, browse on.
// Plain JavaScript, no dependencies; every text is set with textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const buttons = () => [$("find"), $("random")];
let total = 0;

function imageUrl(id) { return "/api/items/" + encodeURIComponent(id) + "/image"; }

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function clearError() { $("error").hidden = true; $("error").textContent = ""; }

function options() {
  const k = Number($("k").value);
  if (!Number.isInteger(k) || k < 1 || k > 100) {
    throw new Error("k must be a whole number from 1 to 100.");
  }
  const category = $("category").value.trim();
  return { k, sameClass: $("same-class").checked, category };
}

// One request at a time: buttons off, status line, errors as one sentence.
async function call(url, init) {
  buttons().forEach((b) => { b.disabled = true; });
  $("status").textContent = "Loading…";
  const t0 = performance.now();
  try {
    let response;
    try {
      response = await fetch(url, init);
    } catch (e) {
      throw new Error("The service is not reachable.");
    }
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    if (!response.ok) {
      throw new Error((body && body.error) || ("The service answered " + response.status + "."));
    }
    return { body, ms: performance.now() - t0 };
  } finally {
    buttons().forEach((b) => { b.disabled = false; });
  }
}

function picture(src, alt) {
  const img = document.createElement("img");
  img.src = src;
  img.alt = alt;
  img.addEventListener("load", () => {
    if (img.naturalWidth && img.naturalWidth <= 64) img.classList.add("small");
  });
  return img;
}

function line(cls, text) {
  const div = document.createElement("div");
  div.className = cls;
  div.textContent = text;
  return div;
}

function render(result, queryPicture, ms) {
  const q = result.query;
  const query = $("query");
  query.replaceChildren();
  query.appendChild(queryPicture);
  const text = document.createElement("div");
  if (q.kind === "item") {
    text.appendChild(line("what", "Item " + q.id + " — " + q.true_class));
    if (q.category && q.category !== q.true_class) {
      text.appendChild(line("detail", "category " + q.category));
    }
  } else {
    text.appendChild(line("what", "Your photo — predicted " + q.predicted_class +
      " (p = " + Number(q.probability).toFixed(2) + ")"));
  }
  if (q.filter) {
    text.appendChild(line("detail", "only " + q.filter + " (" + q.n_candidates + " candidates)"));
  }
  query.appendChild(text);

  const grid = $("grid");
  grid.replaceChildren();
  for (const item of result.items) {
    const card = document.createElement("button");
    card.type = "button";
    card.className = "card";
    card.title = "Show items similar to " + item.id;
    card.appendChild(picture(item.image_url || imageUrl(item.id), "product " + item.id));
    card.appendChild(line("id", String(item.id)));
    card.appendChild(line("cls", item.class_name));
    card.appendChild(line("dist", "distance " + Number(item.distance).toFixed(4)));
    card.addEventListener("click", () => showItem(String(item.id)));
    grid.appendChild(card);
  }
  $("results").hidden = false;
  $("status").textContent = result.items.length + " items in " + Math.round(ms) + " ms";
}

async function showItem(id) {
  clearError();
  try {
    const o = options();
    $("item-id").value = id;
    const params = new URLSearchParams({ k: String(o.k), same_class: String(o.sameClass) });
    if (o.category) params.set("category", o.category);
    const { body, ms } = await call("/api/items/" + encodeURIComponent(id) + "/similar?" + params);
    if (location.hash !== "#item=" + encodeURIComponent(id)) {
      history.pushState(null, "", "#item=" + encodeURIComponent(id));
    }
    render(body, picture(imageUrl(id), "query item " + id), ms);
  } catch (e) {
    $("status").textContent = "";
    showError(e.message);
  }
}

async function showPhoto(file) {
  clearError();
  if (!file) return;
  try {
    const o = options();
    const form = new FormData();
    form.append("image", file);
    form.append("k", String(o.k));
    form.append("same_class", String(o.sameClass));
    if (o.category) form.append("category", o.category);
    const { body, ms } = await call("/api/similar", { method: "POST", body: form });
    const preview = picture(URL.createObjectURL(file), "your photo");
    render(body, preview, ms);
  } catch (e) {
    $("status").textContent = "";
    showError(e.message);
  }
}

async function randomItem() {
  clearError();
  try {
    if (!total) total = (await call("/api/items?limit=1")).body.total;
    const offset = Math.floor(Math.random() * total);
    const { body } = await call("/api/items?limit=1&offset=" + offset);
    if (body.items.length) await showItem(String(body.items[0].id));
  } catch (e) {
    $("status").textContent = "";
    showError(e.message);
  }
}

function fromHash() {
  const m = location.hash.match(/^#item=(.+)$/);
  return m ? decodeURIComponent(m[1]) : null;
}

async function start() {
  try {
    const { body } = await call("/api/stats");
    total = body.items;
    $("summary").textContent = body.items.toLocaleString() + " items · " + body.run.dataset +
      " · " + body.classes.length + " classes · " + body.index.search + " search";
  } catch (e) {
    showError(e.message);
  }
  const id = fromHash();
  if (id !== null) await showItem(id); else await randomItem();
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const id = $("item-id").value.trim();
  if (id) showItem(id); else showError("Type an item id, or pick a random item.");
});
$("random").addEventListener("click", randomItem);
$("photo").addEventListener("change", (event) => {
  showPhoto(event.target.files[0]);
  event.target.value = "";
});
const zone = $("drop-zone");
["dragenter", "dragover"].forEach((name) => zone.addEventListener(name, (event) => {
  event.preventDefault();
  zone.classList.add("over");
}));
["dragleave", "drop"].forEach((name) => zone.addEventListener(name, () => {
  zone.classList.remove("over");
}));
zone.addEventListener("drop", (event) => {
  event.preventDefault();
  const file = event.dataTransfer.files[0];
  if (file) showPhoto(file);
});
window.addEventListener("popstate", () => {
  const id = fromHash();
  if (id !== null) showItem(id);
});
start();
