// Greedy continuations of token-id prompts by llama.cpp itself (prebuilt, through
// node-llama-cpp), for checking GGUF exports against tunebook's own answers.
//
//   node tests/llamacpp_greedy.mjs --model M.gguf [--lora A.gguf] --prompts P.json --max-tokens N
//
// P.json is a list of prompts, each a list of token ids (tunebook renders and encodes
// them, so the check is about the weights, not a second template engine) or a string
// (already rendered; llama.cpp tokenizes it, special-token texts included, so the check
// covers the exported tokenizer too). Prints one JSON line:
// {"outputs": [[ids...], ...], "texts": ["...", ...], "prompt_ids": [[...]], "eog": [bool, ...]}.
// Generation stops at an end-of-generation token (not included) or after N tokens.
// Threads are pinned to 1: unpinned, llama.cpp is ~100x slower on small shared machines.
// The package is found in $TUNEBOOK_NODE_LLAMA_CPP_DIR or ~/.cache/tunebook/node-llama-cpp
// (bench/llamacpp_setup.sh installs it there).
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { pathToFileURL } from "node:url";

const args = {};
for (let i = 2; i < process.argv.length; i += 2) args[process.argv[i].replace(/^--/, "")] = process.argv[i + 1];
if (!args.model || !args.prompts) throw new Error("usage: --model M.gguf [--lora A.gguf] --prompts P.json [--max-tokens N]");
const maxTokens = Number(args["max-tokens"] ?? 32);
const dir = process.env.TUNEBOOK_NODE_LLAMA_CPP_DIR ?? path.join(os.homedir(), ".cache/tunebook/node-llama-cpp");
const require = createRequire(path.join(dir, "package.json"));
const { getLlama, LlamaLogLevel } = await import(pathToFileURL(require.resolve("node-llama-cpp")).href);

const prompts = JSON.parse(readFileSync(args.prompts, "utf8"));
const llama = await getLlama({ gpu: false, maxThreads: 1, logLevel: LlamaLogLevel.error, build: "never" });
const model = await llama.loadModel({ modelPath: args.model });
const promptIds = prompts.map((p) => (typeof p === "string" ? Array.from(model.tokenize(p, true)) : p));
const longest = Math.max(...promptIds.map((p) => p.length));
const context = await model.createContext({
    contextSize: longest + maxTokens + 8,
    threads: { ideal: 1, min: 1 },
    ...(args.lora ? { lora: { adapters: [{ filePath: args.lora, scale: 1 }] } } : {}),
});
const sequence = context.getSequence();
const outputs = [];
const texts = [];
const eog = [];
for (const p of promptIds) {
    await sequence.clearHistory();
    const out = [];
    let stopped = false;
    for await (const token of sequence.evaluate(p, { temperature: 0, yieldEogToken: true })) {
        if (model.isEogToken(token)) { stopped = true; break; }
        out.push(token);
        if (out.length >= maxTokens) break;
    }
    outputs.push(out);
    texts.push(model.detokenize(out));
    eog.push(stopped);
}
await context.dispose();
await model.dispose();
console.log(JSON.stringify({ outputs, texts, prompt_ids: promptIds, eog }));
