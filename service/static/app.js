// The page talks only to the service that served it: /classify/compare, /models/fpet/explain, /samples, /stats,
// /models.
"use strict";

const $ = (id) => document.getElementById(id);
const TYPES = ["image/jpeg", "image/png", "image/webp"];
let busy = false;
const shown = { preview: null, overlay: null }; // blob URLs on screen, freed when replaced

function show(id, blob) {
  if (shown[id]) URL.revokeObjectURL(shown[id]);
  shown[id] = blob ? URL.createObjectURL(blob) : null;
  if (shown[id]) $(id).src = shown[id];
  else $(id).removeAttribute("src");
}

function headers(type) {
  const h = { "Content-Type": type };
  const key = $("key").value.trim();
  if (key) h["X-API-Key"] = key;
  return h;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function failure(response) {
  try {
    const body = await response.json();
    return `${body.error} (HTTP ${response.status}${body.request_id ? ", request " + body.request_id : ""})`;
  } catch {
    return `the service answered HTTP ${response.status}`;
  }
}

async function post(url, blob, accept) {
  const h = headers(blob.type);
  if (accept) h.Accept = accept;
  const response = await fetch(url, { method: "POST", body: blob, headers: h });
  if (!response.ok) throw new Error(await failure(response));
  return response;
}

function fmt(ms) {
  return ms < 10 ? ms.toFixed(1) : ms.toFixed(0);
}

function renderModel(name, entry) {
  const box = $(`model-${name}`);
  if (!box) return;
  const list = box.querySelector(".top");
  list.replaceChildren(...entry.predictions.map((p) => {
    const item = document.createElement("li");
    item.dataset.label = p.label;
    const pct = (100 * p.score).toFixed(1);
    item.textContent = `${p.label} — ${pct}%`;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.max(1, p.score * 100)}%`;
    bar.setAttribute("aria-hidden", "true");
    item.append(bar);
    return item;
  }));
  box.querySelector(".timing").textContent =
    `inference ${fmt(entry.inference_ms_per_image)} ms per image (batch of ${entry.batch_size}), ` +
    `queue ${fmt(entry.queue_ms)} ms, ${entry.execution_provider}`;
}

async function classify(blob, name) {
  if (busy) return;
  if (!TYPES.includes(blob.type)) {
    showError(`${name || "This file"} is not a JPEG, PNG or WebP image (it is ${blob.type || "of an unknown type"}).`);
    return;
  }
  busy = true;
  showError("");
  document.body.setAttribute("aria-busy", "true");
  try {
    show("preview", blob);
    show("overlay", null); // no stale map beside a new image
    $("overlay-caption").textContent = "";
    delete $("result").dataset.done;
    const compare = await (await post("/classify/compare?top_k=5", blob)).json();
    for (const [model, entry] of Object.entries(compare.models)) renderModel(model, entry);
    $("speedup").textContent = compare.speedup
      ? `On this image fpet computed ${compare.speedup.toFixed(2)}x faster than the backbone` +
        (compare.top1_agreement ? ", with the same top-1 answer." : ", and the two disagree on top-1.")
      : "";
    $("stages").textContent =
      `decode ${fmt(compare.timing_ms.decode)} ms · whole request ${fmt(compare.timing_ms.total)} ms`;
    $("result").hidden = false;
    if (compare.models.fpet) {
      const plan = await (await post("/models/fpet/explain?top_k=1", blob)).json();
      const picture = await (await post("/models/fpet/explain?format=png", blob, "image/png")).blob();
      show("overlay", picture);
      $("overlay-caption").textContent = plan.merges
        .map((m) => `after block ${m.block}: ${m.tokens_before - 1} patches → ${m.tokens_after - 1} tokens`)
        .join("; ");
    }
    $("result").dataset.done = "true";
  } catch (error) {
    showError(error.message);
  } finally {
    busy = false;
    document.body.removeAttribute("aria-busy");
  }
}

async function loadSamples() {
  const response = await fetch("/samples");
  if (!response.ok) return;
  for (const name of await response.json()) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = name.replace(/\.[a-z]+$/, "");
    button.addEventListener("click", async () => {
      const blob = await (await fetch(`/samples/files/${encodeURIComponent(name)}`)).blob();
      classify(blob, name);
    });
    $("samples").append(button);
  }
}

async function refreshLive() {
  try {
    const response = await fetch("/stats");
    if (!response.ok) return;
    const stats = await response.json();
    const rows = Object.entries(stats.models).map(([model, s]) => {
      const row = document.createElement("tr");
      for (const text of [model, s.requests_per_s.toFixed(2), s.p50_ms == null ? "–" : fmt(s.p50_ms),
                          s.p95_ms == null ? "–" : fmt(s.p95_ms)]) {
        const cell = document.createElement("td");
        cell.textContent = text;
        row.append(cell);
      }
      return row;
    });
    $("live").querySelector("tbody").replaceChildren(...rows);
  } catch {
    // the panel keeps its last figures while the service is unreachable
  }
}

async function showRuntime() {
  try {
    const response = await fetch("/models");
    if (!response.ok) return;
    const { models } = await response.json();
    const each = models.map((m) => `${m.name}: ${m.runtime} ${m.compute_precision} (${m.runtime_reason})`);
    const features = models.length ? models[0].cpu_features.join(", ") || "none found" : "";
    $("runtime").textContent = `Running on ${each.join("; ")}. CPU features: ${features}.`;
  } catch {
    // no runtime line while the service is unreachable
  }
}

function init() {
  $("file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) classify(file, file.name);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) classify(file, file.name);
  });
  loadSamples();
  showRuntime();
  refreshLive();
  setInterval(refreshLive, 2000);
}

init();
