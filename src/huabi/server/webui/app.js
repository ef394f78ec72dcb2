// huabi web UI: plain JavaScript over the server's JSON API (/sdapi/v1 listings, /huabi/v1 jobs and gallery).
// No framework and no build step: the page is three static files served by `huabi serve`, working offline.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { tab: "txt2img", job: null, lastSeed: null, maskPainted: false, hasInit: false, galleryItem: null };

async function api(path, options = {}) {
  const init = { headers: {}, ...options };
  if (options.json !== undefined) {
    init.method = init.method || "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.json);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  const body = text ? JSON.parse(text) : null;
  if (!response.ok) throw new Error((body && body.detail) || `${response.status} ${response.statusText}`);
  return body;
}

function fillSelect(select, items, selected) {
  select.replaceChildren(...items.map(([value, label]) => new Option(label, value, false, value === selected)));
}

// ---------------------------------------------------------------- start-up: fill the pickers from the API
async function loadLists() {
  const [samplers, schedulers, models, options, loras, embeddings, styles, latent, upscalers] = await Promise.all([
    api("/sdapi/v1/samplers"), api("/sdapi/v1/schedulers"), api("/sdapi/v1/sd-models"), api("/sdapi/v1/options"),
    api("/sdapi/v1/loras"), api("/sdapi/v1/embeddings"), api("/sdapi/v1/prompt-styles"),
    api("/sdapi/v1/latent-upscale-modes"), api("/sdapi/v1/upscalers"),
  ]);
  fillSelect($("sampler"), samplers.map((s) => [s.name, s.name]), "DPM++ 2M");
  fillSelect($("schedule"), schedulers.map((s) => [s.label, s.label]), "Automatic");
  fillSelect($("model"), models.map((m) => [m.title, m.model_name]), options.sd_model_checkpoint);
  for (const l of loras) $("lora-pick").add(new Option(l.name, l.name));
  for (const name of Object.keys(embeddings.loaded || {})) $("embedding-pick").add(new Option(name, name));
  fillSelect($("styles"), styles.map((s) => [s.name, s.name]));
  $("styles").size = Math.min(4, Math.max(1, styles.length));
  const pixel = upscalers.filter((u) => u.name !== "None" && u.name !== "Nearest").map((u) => [u.name, u.name]);
  fillSelect($("hires_upscaler"), [...latent.map((m) => [m.name, m.name]), ...pixel], "Latent");
}

$("model").addEventListener("change", async () => {
  try { await api("/sdapi/v1/options", { json: { sd_model_checkpoint: $("model").value } }); showError(""); }
  catch (err) { showError(err.message); }
});

function insertIntoPrompt(text) {
  const prompt = $("prompt");
  prompt.value = prompt.value.trim() ? `${prompt.value.trim()}, ${text}` : text;
}
$("lora-pick").addEventListener("change", (e) => { if (e.target.value) insertIntoPrompt(`<lora:${e.target.value}:1>`); e.target.value = ""; });
$("embedding-pick").addEventListener("change", (e) => { if (e.target.value) insertIntoPrompt(e.target.value); e.target.value = ""; });
$("dice").addEventListener("click", () => { $("seed").value = -1; });
$("recycle").addEventListener("click", () => { if (state.lastSeed !== null) $("seed").value = state.lastSeed; });

// ---------------------------------------------------------------- tabs
function showTab(tab) {
  state.tab = tab;
  document.querySelectorAll("nav button").forEach((b) => b.classList.toggle("active", b.dataset.tab === tab));
  $("generate-panel").hidden = !(tab === "txt2img" || tab === "img2img");
  $("img2img-inputs").hidden = tab !== "img2img";
  $("hires-box").hidden = tab !== "txt2img";
  $("queue-panel").hidden = tab !== "queue";
  $("gallery-panel").hidden = tab !== "gallery";
  if (tab === "queue") refreshQueue();
  if (tab === "gallery") refreshGallery();
}
document.querySelectorAll("nav button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));

// ---------------------------------------------------------------- img2img: the init image and the painted mask
const initCanvas = $("init-canvas"), maskCanvas = $("mask-canvas");

function loadInit(src) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => {
      for (const canvas of [initCanvas, maskCanvas]) { canvas.width = image.naturalWidth; canvas.height = image.naturalHeight; }
      initCanvas.getContext("2d").drawImage(image, 0, 0);
      state.hasInit = true; state.maskPainted = false;
      $("width").value = Math.round(image.naturalWidth / 8) * 8;
      $("height").value = Math.round(image.naturalHeight / 8) * 8;
      resolve();
    };
    image.onerror = () => reject(new Error("cannot read that image"));
    image.src = src;
  });
}
$("init-file").addEventListener("change", (e) => {
  const file = e.target.files[0];
  if (file) loadInit(URL.createObjectURL(file)).catch((err) => showError(err.message));
});
$("mask-clear").addEventListener("click", () => {
  maskCanvas.getContext("2d").clearRect(0, 0, maskCanvas.width, maskCanvas.height);
  state.maskPainted = false;
});

let painting = false;
function paint(event) {
  if (!painting || !$("paint-mask").checked) return;
  const box = maskCanvas.getBoundingClientRect();
  const x = (event.clientX - box.left) * (maskCanvas.width / box.width);
  const y = (event.clientY - box.top) * (maskCanvas.height / box.height);
  const ctx = maskCanvas.getContext("2d");
  const radius = Number($("brush").value) * (maskCanvas.width / box.width) / 2;
  ctx.fillStyle = "#ffffff";
  ctx.beginPath(); ctx.arc(x, y, radius, 0, Math.PI * 2); ctx.fill();
  state.maskPainted = true;
}
maskCanvas.addEventListener("pointerdown", (e) => { painting = true; maskCanvas.setPointerCapture(e.pointerId); paint(e); });
maskCanvas.addEventListener("pointermove", paint);
maskCanvas.addEventListener("pointerup", () => { painting = false; });

function maskDataUrl() {
  // White strokes on black: the mask format A1111 and huabi read (white = repaint).
  const out = document.createElement("canvas");
  out.width = maskCanvas.width; out.height = maskCanvas.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000"; ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(maskCanvas, 0, 0);
  return out.toDataURL("image/png");
}

// ---------------------------------------------------------------- generating
function number(id) { return Number($(id).value); }

function collectOptions() {
  const options = {
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value, sampler: $("sampler").value,
    schedule: $("schedule").value, steps: number("steps"), cfg_scale: number("cfg_scale"),
    size: `${number("width")}x${number("height")}`, seed: number("seed"), batch_size: number("batch_size"),
    batch_count: number("batch_count"),
  };
  const styles = [...$("styles").selectedOptions].map((o) => o.value);
  if (styles.length) options.styles = styles;
  if (state.tab === "txt2img" && $("hires").checked) {
    Object.assign(options, { hires: true, hires_upscaler: $("hires_upscaler").value, hires_scale: number("hires_scale"),
      hires_denoise: number("hires_denoise") });
    if (number("hires_steps") > 0) options.hires_steps = number("hires_steps");
  }
  if (state.tab === "img2img") {
    if (!state.hasInit) throw new Error("img2img: choose an image first");
    Object.assign(options, { image: initCanvas.toDataURL("image/png"), strength: number("strength") });
    if (state.maskPainted) {
      Object.assign(options, { mask: maskDataUrl(), mask_blur: number("mask_blur"),
        masked_content: $("masked_content").value, inpaint_area: $("inpaint_area").value });
    }
  }
  return options;
}

function showError(message) { $("error").textContent = message; }

function setProgress(step, total, text) {
  $("bar").style.width = total ? `${Math.round((100 * step) / total)}%` : "0";
  $("progress-text").textContent = text;
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  showError("");
  try {
    const kind = state.tab === "img2img" ? "edit" : "generate";
    const job = await api("/huabi/v1/jobs", { json: { kind, options: collectOptions(), source: "webui" } });
    state.job = job.id;
    setProgress(0, 0, job.position > 1 ? `queued (${job.position - 1} ahead)` : "starting…");
  } catch (err) { showError(err.message); }
});

$("cancel").addEventListener("click", async () => {
  if (!state.job) return;
  try { await api(`/huabi/v1/jobs/${state.job}/cancel`, { method: "POST" }); } catch (err) { showError(err.message); }
});

async function showJobResult(jobId) {
  const job = await api(`/huabi/v1/jobs/${jobId}`);
  $("results").replaceChildren(...job.images.map((image) => {
    const img = document.createElement("img");
    img.src = image.url; img.alt = image.prompt; img.title = `seed ${image.seed}`;
    img.addEventListener("click", () => { $("result-info").textContent = image.infotext; });
    return img;
  }));
  $("result-info").textContent = job.images.length ? job.images[0].infotext : "";
  if (job.images.length) state.lastSeed = job.images[0].seed;
  $("preview").hidden = true;
  setProgress(job.status === "done" ? 1 : 0, 1, job.status);
  if (job.status === "failed") showError(job.error);
}

// ---------------------------------------------------------------- live events (SSE): progress, queue, results
function listen() {
  const events = new EventSource("/huabi/v1/events");
  let queueTimer = null;
  const onEvent = (message) => {
    const event = JSON.parse(message.data);
    if (event.job && event.job === state.job) {
      if (event.event === "progress") setProgress(event.step, event.total, `step ${event.step} / ${event.total}`);
      if (event.event === "started") setProgress(0, 0, "loading…");
      if (event.event === "preview" && event.image) { $("preview").src = event.image; $("preview").hidden = false; }
      if (event.event === "finished") showJobResult(event.job);
    }
    clearTimeout(queueTimer);
    queueTimer = setTimeout(() => { if (state.tab === "queue") refreshQueue(); updateQueueCount(); }, 200);
  };
  for (const name of ["hello", "queued", "started", "progress", "preview", "finished"]) events.addEventListener(name, onEvent);
}

async function updateQueueCount() {
  const { queued, running } = await api("/huabi/v1/jobs?status=queued&limit=1");
  const count = queued + (running ? 1 : 0);
  $("queue-count").textContent = count ? `(${count})` : "";
}

async function refreshQueue() {
  const { jobs } = await api("/huabi/v1/jobs?limit=50");
  $("queue-rows").replaceChildren(...jobs.map((job) => {
    const row = document.createElement("tr");
    const progress = job.progress ? ` ${job.progress.step}/${job.progress.total}` : "";
    for (const text of [job.id.slice(0, 8), job.options.prompt || "(from image)", job.status + progress]) {
      const cell = document.createElement("td"); cell.textContent = text; row.append(cell);
    }
    const cell = document.createElement("td");
    if (job.status === "queued" || job.status === "running") {
      const button = document.createElement("button");
      button.textContent = "Cancel";
      button.addEventListener("click", () => api(`/huabi/v1/jobs/${job.id}/cancel`, { method: "POST" }).then(refreshQueue));
      cell.append(button);
    }
    row.append(cell);
    return row;
  }));
}

// ---------------------------------------------------------------- gallery
async function refreshGallery() {
  const query = new URLSearchParams();
  if ($("gallery-q").value) query.set("q", $("gallery-q").value);
  if ($("gallery-seed").value) query.set("seed", $("gallery-seed").value);
  if ($("gallery-fav").checked) query.set("favourite", "true");
  const { images } = await api(`/huabi/v1/gallery?${query}`);
  $("gallery-grid").replaceChildren(...images.map((item) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = item.thumbnail_url; img.alt = item.prompt; img.loading = "lazy";
    const caption = document.createElement("figcaption");
    caption.textContent = `${item.favourite ? "★ " : ""}${item.prompt}`;
    figure.append(img, caption);
    figure.addEventListener("click", () => openDetail(item));
    return figure;
  }));
}
$("gallery-search").addEventListener("submit", (e) => { e.preventDefault(); refreshGallery(); });

function openDetail(item) {
  state.galleryItem = item;
  $("detail-image").src = item.url;
  $("detail-info").textContent = item.infotext;
  $("detail-fav").textContent = item.favourite ? "★ Favourite" : "☆ Favourite";
  $("gallery-detail").showModal();
}
$("detail-close").addEventListener("click", () => $("gallery-detail").close());
$("detail-fav").addEventListener("click", async () => {
  const item = await api(`/huabi/v1/gallery/${state.galleryItem.id}/favourite`, { json: { favourite: !state.galleryItem.favourite } });
  openDetail(item); refreshGallery();
});
$("detail-delete").addEventListener("click", async () => {
  if (!confirm("Delete this image and its file?")) return;
  await api(`/huabi/v1/gallery/${state.galleryItem.id}`, { method: "DELETE" });
  $("gallery-detail").close(); refreshGallery();
});
$("detail-redo").addEventListener("click", async () => {
  try {
    const job = await api(`/huabi/v1/gallery/${state.galleryItem.id}/redo`, { method: "POST" });
    state.job = job.id; $("gallery-detail").close(); showTab("txt2img");
  } catch (err) { alert(err.message); }
});
async function sendToImg2img(paintMask) {
  const item = state.galleryItem;
  $("gallery-detail").close();
  showTab("img2img");
  $("prompt").value = item.prompt; $("negative_prompt").value = item.negative_prompt;
  $("paint-mask").checked = paintMask;
  await loadInit(item.url);
}
$("detail-img2img").addEventListener("click", () => sendToImg2img(false));
$("detail-inpaint").addEventListener("click", () => sendToImg2img(true));

// ---------------------------------------------------------------- go
loadLists().then(updateQueueCount).catch((err) => showError(err.message));
listen();
showTab("txt2img");
