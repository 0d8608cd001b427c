// The Nucleus-Image page: submits a job, polls its progress, shows the images with their settings and keeps
// the session's history (sessionStorage). Talks only to this server's API.
"use strict";

const $ = (id) => document.getElementById(id);
const HISTORY_KEY = "nucleus-history";
let model = null;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

async function loadModel() {
  const response = await fetch("/v1/models");
  model = (await response.json()).data[0];
  $("model").textContent = `${model.id} · ${model.sample_size}px native · batch ≤ ${model.max_batch}`;
  $("model").classList.add("ok");
  for (const [aspect, size] of Object.entries(model.aspect_sizes)) {
    $("aspect").append(el("option", { value: aspect }, `${aspect}  (${size})`));
  }
  for (let n = 1; n <= model.limits.max_images; n++) $("n").append(el("option", { value: n }, String(n)));
  $("steps").value = model.defaults.steps;
  $("steps").max = model.limits.max_steps;
  $("guidance").value = model.defaults.guidance_scale;
  $("guidance").max = model.limits.max_guidance;
  $("prompt").maxLength = model.limits.max_prompt_chars;
}

function setProgress(fraction, label, state) {
  const percent = Math.round(fraction * 100);
  $("progress-fill").style.width = `${percent}%`;
  $("progress").setAttribute("aria-valuenow", String(percent));
  $("progress").dataset.state = state;
  $("progress-label").textContent = label;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function requestBody() {
  const body = {
    prompt: $("prompt").value,
    aspect_ratio: $("aspect").value,
    n: Number($("n").value),
    steps: Number($("steps").value),
    guidance_scale: Number($("guidance").value),
    response_format: "url",
  };
  if ($("negative").value) body.negative_prompt = $("negative").value;
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  return body;
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = el("textarea", {}, text);
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "copied";
  setTimeout(() => (button.textContent = "copy command"), 1200);
}

function card(item) {
  const s = item.settings;
  const copy = el("button", { type: "button", class: "ghost copy" }, "copy command");
  copy.addEventListener("click", () => copyText(item.command, copy));
  return el("div", { class: "card result" },
    el("img", { src: item.url, alt: s.prompt, width: s.width, height: s.height }),
    el("div", { class: "meta" },
      el("span", { class: "prompt" }, s.prompt),
      ...(s.negative_prompt ? [el("span", {}, "negative: ", el("b", {}, s.negative_prompt))] : []),
      el("span", {}, el("b", {}, `${s.width}×${s.height}`), ` · ${s.steps} steps · guidance `,
         el("b", {}, String(s.guidance_scale)), " · seed ", el("b", { class: "seed" }, String(item.seed))),
      el("span", {}, `batch of ${item.batch_size}`),
      el("code", { class: "command" }, item.command),
      el("div", { class: "actions" }, copy,
         el("a", { href: item.url, download: `nucleus-${item.seed}.png` },
            el("button", { type: "button", class: "ghost" }, "download")))));
}

function history() {
  return JSON.parse(sessionStorage.getItem(HISTORY_KEY) || "[]");
}

function reuse(item) {
  const s = item.settings;
  $("prompt").value = s.prompt;
  $("negative").value = s.negative_prompt || "";
  if (s.aspect_ratio) $("aspect").value = s.aspect_ratio;
  $("steps").value = s.steps;
  $("guidance").value = s.guidance_scale;
  $("seed").value = item.seed;
  $("n").value = 1;
}

function renderHistory() {
  const items = history();
  $("history-count").textContent = items.length ? `(${items.length} this session; click to reuse settings)` : "";
  $("history").replaceChildren(...items.slice().reverse().map((item) => {
    const img = el("img", { src: item.url, class: "history-item",
                            title: `${item.settings.prompt} · seed ${item.seed}` });
    img.addEventListener("click", () => reuse(item));
    img.addEventListener("error", () => img.remove());  // the server keeps a bounded number of images
    return img;
  }));
}

function showResult(result) {
  const items = result.data.map((image) => ({ ...image, settings: result.settings }));
  $("results").replaceChildren(...items.map(card));
  sessionStorage.setItem(HISTORY_KEY, JSON.stringify(history().concat(items).slice(-200)));
  renderHistory();
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function generate(event) {
  event.preventDefault();
  showError("");
  $("generate").disabled = true;
  setProgress(0, "submitting...", "running");
  try {
    const response = await fetch("/v1/images/jobs", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(requestBody()),
    });
    const job = await response.json();
    if (!response.ok) {
      const retry = response.headers.get("Retry-After");
      throw new Error(job.error.message + (retry ? ` (retry after ${retry} s)` : ""));
    }
    for (;;) {
      const status = await (await fetch(`/v1/images/jobs/${job.id}`)).json();
      if (status.status === "done") {
        setProgress(1, `done: ${status.n} image${status.n > 1 ? "s" : ""} in ${status.result.latency_seconds.toFixed(2)} s`, "done");
        showResult(status.result);
        return;
      }
      if (status.status === "failed") throw new Error(status.error.message);
      const label = status.status === "queued"
        ? `queued: ${status.queue_position} image${status.queue_position === 1 ? "" : "s"} ahead`
        : `${Math.round(status.progress * 100)}% of ${status.n} × ${status.steps} steps`;
      setProgress(status.progress, label, "running");
      await sleep(150);
    }
  } catch (err) {
    setProgress(1, "failed", "failed");
    showError(err.message);
  } finally {
    $("generate").disabled = false;
  }
}

async function pollHealth() {
  try {
    const health = await (await fetch("/health")).json();
    $("server").textContent = `server ${health.status} · ${health.queue_images} queued`;
    $("server").classList.toggle("ok", health.status === "ok");
  } catch {
    $("server").textContent = "server unreachable";
    $("server").classList.remove("ok");
  }
}

$("form").addEventListener("submit", generate);
$("dice").addEventListener("click", () => ($("seed").value = Math.floor(Math.random() * 2 ** 31)));
loadModel().then(renderHistory).catch((err) => showError(`could not load /v1/models: ${err.message}`));
pollHealth();
setInterval(pollHealth, 3000);
