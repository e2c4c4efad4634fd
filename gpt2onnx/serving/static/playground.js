// gpt2onnx playground: streams /v1/completions (SSE over fetch) and shades each token by its probability.
"use strict";

const $ = (id) => document.getElementById(id);
const SLIDERS = ["temperature", "top_p", "top_k", "max_tokens"];
const SAVED = ["prompt", "temperature", "top_p", "top_k", "max_tokens", "seed", "stop", "api-key"];
const tokenInfo = new WeakMap(); // span -> [{token, logprob, top: {token: logprob}}]
let modelName = null;
let controller = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(ok, text) {
  $("status").className = "status " + (ok ? "ok" : "bad");
  $("status-text").textContent = text;
}

async function connect() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    const body = await response.json();
    if (!response.ok) {
      setStatus(false, response.status === 401 ? "API key needed" : (body.error && body.error.message) || response.statusText);
      return;
    }
    modelName = body.data[0].id;
    setStatus(true, modelName + " · context " + body.data[0].max_model_len);
  } catch (error) {
    setStatus(false, "server unreachable");
  }
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function visible(token) {
  return token.replace(/ /g, "␣").replace(/\n/g, "↵").replace(/\t/g, "⇥");
}

function shade(probability) {
  // red (unlikely) -> amber -> green (likely), lighter as the model is surer
  const hue = Math.round(120 * Math.pow(probability, 0.6));
  const alpha = (0.55 - 0.27 * probability).toFixed(2);
  return `hsla(${hue}, 80%, 52%, ${alpha})`;
}

function addToken(output, text, entries, extraClass) {
  const span = document.createElement("span");
  span.className = "tok" + (extraClass ? " " + extraClass : "");
  span.textContent = text;
  const scored = entries.filter((e) => e.logprob !== null);
  if (scored.length) {
    const p = Math.min(...scored.map((e) => Math.exp(e.logprob)));
    span.style.background = shade(p);
    span.dataset.p = p.toFixed(4);
    span.setAttribute("aria-label", scored.map((e) => `${e.token}: ${(100 * Math.exp(e.logprob)).toFixed(1)}%`).join(", "));
  }
  tokenInfo.set(span, entries);
  output.insertBefore(span, output.querySelector(".cursor"));
  return span;
}

function tooltipHtml(entries) {
  const esc = (s) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  return entries.map((e) => {
    const chosenP = e.logprob === null ? null : Math.exp(e.logprob);
    const rows = Object.entries(e.top || {}).sort((a, b) => b[1] - a[1]).map(([token, lp]) => {
      const p = Math.exp(lp);
      const chosen = token === e.token ? " class=\"chosen\"" : "";
      return `<tr${chosen}><td class="t">${esc(visible(token))}</td><td class="bar"><span style="width:${Math.max(2, 100 * p).toFixed(0)}%"></span></td><td class="p">${(100 * p).toFixed(1)}%</td></tr>`;
    }).join("");
    const head = `<div class="head">${esc(visible(e.token))}${chosenP === null ? "" : ` · ${(100 * chosenP).toFixed(1)}%`}</div>`;
    return head + `<table>${rows}</table>`;
  }).join("<hr>");
}

function onHover(event) {
  const span = event.target.closest(".tok");
  const tip = $("tooltip");
  if (!span || !tokenInfo.has(span)) { tip.hidden = true; return; }
  tip.innerHTML = tooltipHtml(tokenInfo.get(span));
  tip.hidden = false;
  const box = span.getBoundingClientRect();
  const left = Math.min(window.innerWidth - tip.offsetWidth - 8, Math.max(8, box.left));
  const below = box.bottom + 6 + tip.offsetHeight < window.innerHeight;
  tip.style.left = left + "px";
  tip.style.top = (below ? box.bottom + 6 : box.top - tip.offsetHeight - 6) + "px";
}

function requestBody() {
  const body = {
    prompt: $("prompt").value,
    max_tokens: Number($("max_tokens").value),
    temperature: Number($("temperature").value),
    top_p: Number($("top_p").value),
    stream: true,
    stream_options: { include_usage: true },
    logprobs: 5,
  };
  if (modelName) body.model = modelName;
  const topK = Number($("top_k").value);
  if (topK > 0) body.top_k = topK;
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = Number(seed);
  const stops = $("stop").value.split("\n").filter((s) => s.length).map((s) => s.replace(/\\n/g, "\n").replace(/\\t/g, "\t"));
  if (stops.length) body.stop = stops.slice(0, 4);
  return body;
}

async function generate() {
  if ($("generate").disabled) return;  // Ctrl+Enter while a run is streaming
  $("error").hidden = true;
  const output = $("output");
  output.innerHTML = "";
  const prompt = document.createElement("span");
  prompt.className = "prompt";
  prompt.textContent = $("prompt").value;
  output.appendChild(prompt);
  const cursor = document.createElement("span");
  cursor.className = "cursor";
  output.appendChild(cursor);
  $("stats").textContent = "";
  $("generate").disabled = true;
  $("stop-button").disabled = false;
  controller = new AbortController();
  const started = performance.now();
  let firstToken = null, tokens = 0, finish = null, usage = null, seed = null;
  let pending = [];
  try {
    const response = await fetch("/v1/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    seed = response.headers.get("x-gpt2onnx-seed");
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || `${response.status} ${response.statusText}`);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          for (const choice of chunk.choices || []) {
            const lp = choice.logprobs;
            if (lp) {
              lp.tokens.forEach((token, i) => pending.push({ token, logprob: lp.token_logprobs[i], top: lp.top_logprobs[i] }));
              tokens += lp.tokens.length;
            }
            if (firstToken === null && (choice.text || (lp && lp.tokens.length))) firstToken = performance.now();
            if (choice.text) { addToken(output, choice.text, pending); pending = []; }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
      }
      showStats(started, firstToken, usage ? usage.completion_tokens : tokens, finish, seed);
    }
  } catch (error) {
    if (error.name !== "AbortError") showError(error.message);
    else finish = "stopped";
  } finally {
    if (pending.length) addToken(output, "⟨end⟩", pending, "end");
    cursor.remove();
    showStats(started, firstToken, usage ? usage.completion_tokens : tokens, finish, seed);
    $("generate").disabled = false;
    $("stop-button").disabled = true;
    controller = null;
  }
}

function showStats(started, firstToken, tokens, finish, seed) {
  const elapsed = (performance.now() - started) / 1000;
  const parts = [`<b>${tokens}</b> tokens`];
  if (firstToken !== null) {
    parts.push(`first token <b>${Math.round(firstToken - started)} ms</b>`);
    const rest = (performance.now() - firstToken) / 1000;
    if (tokens > 1 && rest > 0) parts.push(`<b>${((tokens - 1) / rest).toFixed(1)}</b> tok/s`);
  }
  parts.push(`${elapsed.toFixed(2)} s`);
  if (finish) parts.push(`finish: <b>${finish}</b>`);
  if (seed) parts.push(`seed <b>${seed}</b>`);
  $("stats").innerHTML = parts.join(" · ");
}

function init() {
  for (const name of SAVED) {
    const saved = localStorage.getItem("gpt2onnx." + name);
    if (saved !== null) $(name).value = saved;
    $(name).addEventListener("change", () => localStorage.setItem("gpt2onnx." + name, $(name).value));
  }
  for (const name of SLIDERS) {
    const show = () => { $(name + "-value").textContent = $(name).value; };
    $(name).addEventListener("input", show);
    show();
  }
  $("api-key").addEventListener("change", connect);
  $("generate").addEventListener("click", generate);
  $("stop-button").addEventListener("click", () => controller && controller.abort());
  $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(); });
  $("output").addEventListener("mouseover", onHover);
  $("output").addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
  connect();
}

init();
