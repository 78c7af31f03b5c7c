// Runs the playground's own script (megatron/text_generation/static/playground.js) under Node against a live
// server, with the few DOM calls it makes stubbed: fills the form, submits it, prints "FIRST" the moment the
// first token span is shown, and finally one JSON line with the shown spans, stats, status and error.
// usage: node playground_harness.js SCRIPT URL MODE TOKENS [element-id=value ...]
"use strict";
const fs = require("fs");
const vm = require("vm");

const [script, url, mode, tokens, ...fields] = process.argv.slice(2);

class Element {
  constructor(id) {
    Object.assign(this, { id, children: [], dataset: {}, style: {}, className: "", textContent: "", value: "",
                          disabled: false, hidden: false, title: "", listeners: {} });
  }
  append(...nodes) {
    this.children.push(...nodes);
    if (this.id === "output" && nodes.some((n) => n.className.startsWith("tok")) && !this.reported) {
      this.reported = true;
      process.stdout.write("FIRST\n");
    }
  }
  replaceChildren(...nodes) { this.children = nodes; }
  addEventListener(type, fn) { this.listeners[type] = fn; }
}

const elements = {};
const byId = (id) => (elements[id] = elements[id] || new Element(id));
global.document = { getElementById: byId, createElement: () => new Element(null) };
const realFetch = global.fetch;
global.fetch = (path, options) => realFetch(url + path, options);

vm.runInThisContext(fs.readFileSync(script, "utf8"), { filename: script });

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
(async () => {
  while (!byId("model-info").textContent.startsWith("model ")) await sleep(20); // GET /health answered
  byId("prompt").value = "3 14 15 9 26";
  byId("mode").value = mode;
  byId("tokens").value = tokens;
  byId("temperature").value = "0";
  for (const field of fields) {
    const [id, value] = field.split("=");
    byId(id).value = value;
  }
  await byId("controls").listeners.submit({ preventDefault() {} });
  const spans = byId("output").children.filter((n) => n.className.startsWith("tok"))
    .map((n) => ({ exit: Number(n.dataset.exit), text: n.textContent, colour: n.style.background || null }));
  const stats = byId("stats").children.map((n) => ({ id: n.id, text: n.textContent }));
  process.stdout.write(JSON.stringify({ spans, stats, status: byId("status").textContent,
                                        error: byId("error").textContent }) + "\n");
})();
