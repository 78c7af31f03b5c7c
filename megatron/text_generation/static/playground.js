// EE-Megatron playground: reads the model's layers and exits from GET /health, sends the form as a
// PUT /api request (asking for one text piece per token) and shows each generated token coloured by the
// layer it left the model at (full depth in neutral grey), with tokens/s and the share of tokens per exit.
// In self-speculative mode a token coloured by the draft exit is a draft the full model accepted; a grey
// one is a token the full model chose itself. Plain browser JavaScript: no build step, no libraries.
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
    prompts: [$("prompt").value],
    tokens_to_generate: parseInt($("tokens").value, 10),
    temperature: parseFloat($("temperature").value),
    decoding: mode,
    token_pieces: true,
  };
  if (mode === "early_exit") body.early_exit_thres = parseFloat($("threshold").value);
  if (mode === "speculative") {
    if ($("draft-exit").value) body.draft_exit_layer = parseInt($("draft-exit").value, 10);
    body.num_speculative_tokens = parseInt($("spec-tokens").value, 10);
  }
  return body;
}

function showTokens(prompt, pieces, layers) {
  const out = $("output");
  out.replaceChildren();
  const shownPrompt = document.createElement("span");
  shownPrompt.className = "prompt";
  shownPrompt.textContent = prompt;
  out.append(shownPrompt);
  layers.forEach((layer, i) => {
    const span = document.createElement("span");
    const colour = exitColour(layer);
    span.className = "tok" + (layer === model.numLayers || !colour ? " full" : "");
    span.dataset.exit = String(layer);
    span.title = `token ${i + 1}: ${layerLabel(layer)}`;
    if (colour && layer !== model.numLayers) span.style.background = colour;
    // a token that adds no text of its own (an unfinished character, a stop token) stays visible
    span.textContent = pieces[i] ? pieces[i] : "\u00b7";
    out.append(span);
  });
}

function showStats(response, layers) {
  const stats = $("stats");
  stats.replaceChildren();
  const line = (text, id) => {
    const div = document.createElement("div");
    if (id) div.id = id;
    div.textContent = text;
    stats.append(div);
  };
  line(`${layers.length} tokens, ${response.tokens_per_s.toFixed(1)} tokens/s`, "speed");
  const share = Object.entries(response.exit_share || {})
    .map(([layer, s]) => `${layerLabel(Number(layer))}: ${(100 * s).toFixed(0)}%`);
  line(`share of tokens per exit: ${share.join(", ") || "-"}`, "share");
  const spec = response.speculative;
  if (spec) {
    line(`self-speculative: drafts from exit ${spec.draft_exit_layer}, ${spec.accepted} of ${spec.drafted} ` +
         `accepted (acceptance rate ${(100 * spec.acceptance_rate).toFixed(0)}%), ${spec.rounds} verify passes; ` +
         "coloured tokens are drafts the full model accepted, grey ones it chose itself",
         "acceptance");
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
    const response = await fetch("/api", {
      method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    const answer = await response.json();
    if (!response.ok) {
      const field = answer.field ? ` (field ${answer.field})` : "";
      throw new Error(`${answer.error || response.statusText}${field}`);
    }
    const layers = answer.exit_layers[0];
    const pieces = (answer.token_pieces || answer.segments)[0];
    showTokens(body.prompts[0], pieces, layers);
    showStats(answer, layers);
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
