// EE-Megatron playground: reads the model's layers and exits from GET /health, sends the form as a
// streamed POST /v1/completions request (server-sent events, one text piece per token) and shows each
// generated token as soon as the server decided it, coloured by the layer it left the model at (full depth
// in neutral grey); the stream's last chunk brings tokens/s and the share of tokens per exit. In
// self-speculative mode a token coloured by the draft exit is a draft the full model accepted; a grey one
// is a token the full model chose itself. Plain browser JavaScript: no build step, no libraries.
"use strict";

const PALETTE = ["#f4a261", "#8ecae6", "#b5e48c", "#f28482", "#cdb4db", "#ffd166", "#90e0ef", "#c9ada7"];
const model = { numLayers: null, exits: [] };

const $ = (id) => document.getElementById(id);

function exitColour(layer) {
  const i = model.exits.indexOf(layer);
  return i < 0 ? null : PALETTE[i % PALETTE.length];
}

function layerLabel(layer) {
  return layer === model.numLayers ? `full depth (layer ${layer})` : `exit ${layer}`;
}

function showLegend() {
  const legend = $("legend");
  legend.replaceChildren();
  const entries = model.exits.filter((l) => l !== model.numLayers).map((l) => [l, exitColour(l)]);
  if (model.numLayers !== null) entries.push([model.numLayers, null]);
  for (const [layer, colour] of entries) {
    const item = document.createElement("span");
    item.className = "legend-item";
    item.dataset.exit = String(layer);
    const swatch = document.createElement("span");
    swatch.className = "swatch" + (colour ? "" : " full");
    swatch.style.background = colour || "#ececec";
    item.append(swatch, layerLabel(layer));
    legend.append(item);
  }
}

async function loadModel() {
  try {
    const response = await fetch("/health");
    const health = await response.json();
    model.numLayers = health.num_layers;
    model.exits = health.exit_layers || [];
    const layers = model.numLayers === null ? "" : `${model.numLayers} layers, `;
    $("model-info").textContent = `model ${health.model}: ${layers}exits at ${model.exits.join(", ") || "none"}`;
    const select = $("draft-exit");
    select.replaceChildren();
    for (const layer of model.exits.filter((l) => l !== model.numLayers)) {
      const option = document.createElement("option");
      option.value = String(layer);
      option.textContent = `exit ${layer}`;
      select.append(option);
    }
    showLegend();
  } catch (err) {
    $("model-info").textContent = `cannot reach the server: ${err}`;
  }
}

function updateOptions() {
  const mode = $("mode").value;
  $("threshold").disabled = mode !== "early_exit";
  $("speculative-options").hidden = mode !== "speculative";
}

function requestBody() {
  const mode = $("mode").value;
  const body = {
    prompt: $("prompt").value,
    max_tokens: parseInt($("tokens").value, 10),
    temperature: parseFloat($("temperature").value),
    decoding: mode,
    logprobs: 0, // one text piece per token, for the colouring
    stream: true,
  };
  if (mode === "early_exit") body.early_exit_thres = parseFloat($("threshold").value);
  if (mode === "speculative") {
    if ($("draft-exit").value) body.draft_exit_layer = parseInt($("draft-exit").value, 10);
    body.num_speculative_tokens = parseInt($("spec-tokens").value, 10);
  }
  return body;
}

function startOutput(prompt) {
  const out = $("output");
  out.replaceChildren();
  const shownPrompt = document.createElement("span");
  shownPrompt.className = "prompt";
  shownPrompt.textContent = prompt;
  out.append(shownPrompt);
  $("stats").replaceChildren();
}

function appendToken(piece, layer, index) {
  const span = document.createElement("span");
  const colour = exitColour(layer);
  span.className = "tok" + (layer === model.numLayers || !colour ? " full" : "");
  span.dataset.exit = String(layer);
  span.title = `token ${index + 1}: ${layerLabel(layer)}`;
  if (colour && layer !== model.numLayers) span.style.background = colour;
  // a token that adds no text of its own (an unfinished character, a stop token) stays visible
  span.textContent = piece ? piece : "\u00b7";
  $("output").append(span);
}

function showStats(summary, count) {
  const stats = $("stats");
  stats.replaceChildren();
  const line = (text, id) => {
    const div = document.createElement("div");
    if (id) div.id = id;
    div.textContent = text;
    stats.append(div);
  };
  line(`${count} tokens, ${summary.tokens_per_s.toFixed(1)} tokens/s`, "speed");
  const share = Object.entries(summary.exit_share || {})
    .map(([layer, s]) => `${layerLabel(Number(layer))}: ${(100 * s).toFixed(0)}%`);
  line(`share of tokens per exit: ${share.join(", ") || "-"}`, "share");
  const spec = summary.speculative;
  if (spec) {
    line(`self-speculative: drafts from exit ${spec.draft_exit_layer}, ${spec.accepted} of ${spec.drafted} ` +
         `accepted (acceptance rate ${(100 * spec.acceptance_rate).toFixed(0)}%), ${spec.rounds} verify passes; ` +
         "coloured tokens are drafts the full model accepted, grey ones it chose itself",
         "acceptance");
  }
}

// Reads the server-sent events of a streamed completion; calls onChunk for each JSON chunk.
async function readEvents(response, onChunk) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice("data: ".length);
      if (data === "[DONE]") return;
      onChunk(JSON.parse(data));
    }
  }
}

async function generate(event) {
  event.preventDefault();
  const button = $("generate");
  $("error").textContent = "";
  button.disabled = true;
  $("status").textContent = "generating\u2026";
  try {
    const body = requestBody();
    const response = await fetch("/v1/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (!response.ok) {
      const answer = await response.json();
      const field = answer.field ? ` (field ${answer.field})` : "";
      throw new Error(`${answer.error || response.statusText}${field}`);
    }
    startOutput(body.prompt);
    let count = 0;
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error);
      if (!chunk.choices.length) {
        showStats(chunk, count); // the summary: the stream's last chunk
        return;
      }
      const choice = chunk.choices[0];
      const pieces = choice.logprobs ? choice.logprobs.tokens : [];
      (choice.exit_layers || []).forEach((layer, i) => appendToken(pieces[i], layer, count++));
      $("status").textContent = `generating\u2026 ${count} tokens`;
    });
    $("status").textContent = "done";
  } catch (err) {
    $("error").textContent = String(err.message || err);
    $("status").textContent = "";
  } finally {
    button.disabled = false;
  }
}

$("controls").addEventListener("submit", generate);
$("mode").addEventListener("change", updateOptions);
updateOptions();
loadModel();
