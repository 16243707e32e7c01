// Reference decode speed of llama.cpp (CPU, prebuilt, through node-llama-cpp) on a GGUF file.
// Prints ONE JSON line on stdout; logs go to stderr.
//
//   bash bench/llamacpp_setup.sh        # installs node-llama-cpp into ~/.cache/tunebook/node-llama-cpp
//   node bench/llamacpp_ref.mjs --model ~/.cache/tunebook/models/SmolLM2-135M-Instruct.Q4_1.gguf \
//        --threads 2 --prompt-tokens 128 --gen-tokens 64 --sequences 8
//
// Measured, all greedy (temperature 0), EOS ignored so every sequence yields exactly --gen-tokens:
//   single: one sequence. The prompt minus its last token is prefilled (prompt_ms), then
//           --gen-tokens decode steps of one token each (the first feeds the last prompt
//           token, so ttft_ms = prompt_ms + first step). decode_tok_s = gen / decode time.
//   multi:  --sequences sequences in one context. All prompts are prefilled concurrently, then
//           all sequences decode concurrently so llama.cpp batches one token per sequence per
//           step. aggregate_decode_tok_s = sequences * gen / decode wall time.
// Threads are pinned: getLlama({maxThreads}) and createContext({threads: {ideal, min}}); the
// addon uses the same count for n_threads and n_threads_batch.
//
// The package is resolved from --pkg-dir, $TUNEBOOK_NODE_LLAMA_CPP_DIR, the NODE_PATH entries,
// or ~/.cache/tunebook/node-llama-cpp (in that order).
import { createRequire } from "node:module";
import { existsSync, readFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { pathToFileURL } from "node:url";

function parseArgs(argv) {
    const opts = {
        model: path.join(os.homedir(), ".cache/tunebook/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        threads: 2,
        promptTokens: 128,
        genTokens: 64,
        sequences: 8,
        runs: 1,
        batchSize: 512,
        flashAttention: "auto",
        prompt: null,
        pkgDir: null,
        skipSingle: false,
    };
    const keys = {
        "--model": ["model", String], "--threads": ["threads", Number],
        "--prompt-tokens": ["promptTokens", Number], "--gen-tokens": ["genTokens", Number],
        "--sequences": ["sequences", Number], "--runs": ["runs", Number],
        "--batch-size": ["batchSize", Number], "--flash-attention": ["flashAttention", String],
        "--prompt": ["prompt", String], "--pkg-dir": ["pkgDir", String],
    };
    for (let i = 0; i < argv.length; i++) {
        const arg = argv[i];
        if (arg === "--skip-single") { opts.skipSingle = true; continue; }
        if (arg === "-h" || arg === "--help") {
            console.error("usage: node bench/llamacpp_ref.mjs [--model PATH] [--threads N] [--prompt-tokens N] " +
                "[--gen-tokens N] [--sequences N] [--runs N] [--batch-size N] [--flash-attention auto|on|off] " +
                "[--prompt TEXT] [--pkg-dir DIR] [--skip-single]");
            process.exit(0);
        }
        const [eq, inlineVal] = arg.includes("=") ? arg.split(/=(.*)/s) : [arg, undefined];
        const spec = keys[eq];
        if (!spec) throw new Error(`unknown argument: ${arg}`);
        const val = inlineVal ?? argv[++i];
        if (val === undefined) throw new Error(`missing value for ${eq}`);
        opts[spec[0]] = spec[1](val);
        if (spec[1] === Number && !Number.isFinite(opts[spec[0]])) throw new Error(`bad number for ${eq}: ${val}`);
    }
    if (!(opts.threads >= 1)) throw new Error("--threads must be >= 1 (always pin threads)");
    if (!(opts.promptTokens >= 2 && opts.genTokens >= 1 && opts.sequences >= 1 && opts.runs >= 1))
        throw new Error("need --prompt-tokens >= 2, --gen-tokens >= 1, --sequences >= 1, --runs >= 1");
    if (!["auto", "on", "off"].includes(opts.flashAttention)) throw new Error("--flash-attention: auto|on|off");
    return opts;
}

function findPackageDir(opts) {
    const candidates = [];
    if (opts.pkgDir) candidates.push(opts.pkgDir);
    if (process.env.TUNEBOOK_NODE_LLAMA_CPP_DIR) candidates.push(process.env.TUNEBOOK_NODE_LLAMA_CPP_DIR);
    for (const p of (process.env.NODE_PATH ?? "").split(path.delimiter).filter(Boolean))
        candidates.push(path.basename(p) === "node_modules" ? path.dirname(p) : p);
    candidates.push(path.join(os.homedir(), ".cache/tunebook/node-llama-cpp"));
    for (const dir of candidates)
        if (existsSync(path.join(dir, "node_modules/node-llama-cpp/package.json"))) return path.resolve(dir);
    throw new Error(`node-llama-cpp not found (looked in: ${candidates.join(", ")}); run bench/llamacpp_setup.sh`);
}

async function loadPackage(dir) {
    const require = createRequire(path.join(dir, "package.json"));
    const entry = require.resolve("node-llama-cpp");
    // package.json is not in the packages' "exports", so read it from node_modules directly
    const version = (pkg) => {
        try { return JSON.parse(readFileSync(path.join(dir, "node_modules", pkg, "package.json"), "utf8")).version; }
        catch { return null; }
    };
    return {
        lib: await import(pathToFileURL(entry).href),
        versions: { "node-llama-cpp": version("node-llama-cpp"), "@node-llama-cpp/linux-x64": version("@node-llama-cpp/linux-x64") },
    };
}

const now = () => Number(process.hrtime.bigint()) / 1e6; // ms
const median = (xs) => { const s = [...xs].sort((a, b) => a - b); const m = s.length >> 1; return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2; };
const round = (x, d = 2) => Math.round(x * 10 ** d) / 10 ** d;

// Exactly n prompt tokens: the text repeated until long enough, then cut.
function buildPromptTokens(model, text, n) {
    const unit = model.tokenize(text);
    if (unit.length === 0) throw new Error("prompt tokenizes to nothing");
    const out = [];
    while (out.length < n) out.push(...unit);
    return out.slice(0, n);
}

// Prefill prompt[0..n-1) on every sequence concurrently, then decode genTokens per sequence
// concurrently (one token per sequence per llama.cpp batch). Returns timings and tokens.
// Counts llama_decode calls and tokens per call via the addon context (internal field; the
// counters stay null if it is missing), to check that concurrent sequences share batches.
function countDecodes(context) {
    const ctx = context._ctx;
    const stats = { calls: 0, tokens: 0, current: 0 };
    if (!ctx || typeof ctx.decodeBatch !== "function" || typeof ctx.addToBatch !== "function") return null;
    // The addon object's methods are read-only, so swap in a proxy that forwards to it.
    context._ctx = new Proxy(ctx, {
        get(target, prop) {
            const v = Reflect.get(target, prop, target);
            if (prop === "addToBatch")
                return (...a) => { stats.current += a[2]?.length ?? 0; return v.apply(target, a); };
            if (prop === "decodeBatch")
                return (...a) => { stats.calls++; stats.tokens += stats.current; stats.current = 0; return v.apply(target, a); };
            return typeof v === "function" ? v.bind(target) : v;
        },
    });
    return stats;
}

async function runBatch(context, sequences, promptTokens, genTokens, threadSamples, stats = null) {
    const prefix = promptTokens.slice(0, -1);
    const last = promptTokens[promptTokens.length - 1];
    await Promise.all(sequences.map((s) => s.clearHistory()));

    const t0 = now();
    await Promise.all(sequences.map((s) => s.evaluateWithoutGeneratingNewTokens(prefix)));
    const t1 = now();
    const cpu1 = process.cpuUsage();
    if (stats) { stats.calls = 0; stats.tokens = 0; }

    // Lock-step decode: every step resumes all generators together, so all sequences queue their
    // next token in the same tick and the context dispatches them as one llama_decode batch
    // (independent per-sequence loops drift apart and split batches).
    const gens = sequences.map((seq) => seq.evaluate([last], { temperature: 0, yieldEogToken: true }));
    const outputs = sequences.map(() => []);
    let tFirst = null;
    try {
        for (let step = 0; step < genTokens; step++) {
            const res = await Promise.all(gens.map((g) => g.next()));
            if (step === 0) tFirst = now();
            for (const [i, r] of res.entries()) {
                if (r.done) throw new Error(`sequence ${i} stopped after ${outputs[i].length} tokens`);
                outputs[i].push(r.value);
            }
            if (threadSamples) threadSamples.add(context.currentThreads);
        }
    } finally {
        // return() ends each generator without feeding its last token back
        await Promise.all(gens.map((g) => g.return()));
    }
    const t2 = now();
    const cpu = process.cpuUsage(cpu1);
    return {
        prompt_ms: t1 - t0,
        ttft_ms: tFirst - t0,
        decode_ms: t2 - t1,
        decode_cpu_util: (cpu.user + cpu.system) / 1000 / (t2 - t1), // process CPU time / wall: ~threads when pinned
        decode_calls: stats ? stats.calls : null,
        decode_call_tokens: stats ? stats.tokens : null,
        tokens: outputs,
    };
}

async function measure(llama, model, opts, promptTokens, nSeq, threadSamples) {
    const context = await model.createContext({
        sequences: nSeq,
        contextSize: promptTokens.length + opts.genTokens + 16, // per sequence
        batchSize: Math.max(opts.batchSize, nSeq),
        threads: { ideal: opts.threads, min: opts.threads },
        flashAttention: opts.flashAttention === "auto" ? undefined : opts.flashAttention === "on",
    });
    try {
        const seqs = Array.from({ length: nSeq }, () => context.getSequence());
        const stats = countDecodes(context);
        // Warm-up (weights paged in, buffers allocated); not timed.
        await runBatch(context, seqs, promptTokens.slice(0, 16), Math.min(4, opts.genTokens), null);
        const runs = [];
        let tokens = null;
        for (let r = 0; r < opts.runs; r++) {
            const res = await runBatch(context, seqs, promptTokens, opts.genTokens, threadSamples, stats);
            tokens = res.tokens;
            runs.push({
                prompt_ms: res.prompt_ms,
                ttft_ms: res.ttft_ms,
                decode_ms: res.decode_ms,
                decode_tok_s: (nSeq * opts.genTokens) / (res.decode_ms / 1000),
                decode_cpu_util: res.decode_cpu_util,
                decode_calls: res.decode_calls,
                tokens_per_decode_call: res.decode_calls ? res.decode_call_tokens / res.decode_calls : null,
            });
        }
        const med = (k) => median(runs.map((x) => x[k]));
        return {
            context_threads: context.idealThreads,
            context_size_per_seq: seqs[0].contextSize,
            batch_size: context.batchSize,
            flash_attention: context.flashAttention,
            runs,
            med,
            sameOutputs: tokens.every((t) => t.join(",") === tokens[0].join(",")),
            firstTokens: tokens[0],
        };
    } finally {
        await context.dispose();
    }
}

async function main() {
    const opts = parseArgs(process.argv.slice(2));
    const loadStart = os.loadavg()[0];
    if (!existsSync(opts.model)) throw new Error(`model not found: ${opts.model}`);
    const pkgDir = findPackageDir(opts);
    const { lib, versions } = await loadPackage(pkgDir);

    // CPU only, prebuilt binary only: never download or compile llama.cpp.
    const llama = await lib.getLlama({
        gpu: false,
        build: "never",
        usePrebuiltBinaries: true,
        skipDownload: true,
        maxThreads: opts.threads,
        logLevel: "error",
        logger: (level, message) => process.stderr.write(`[llama.cpp ${level}] ${message}\n`),
        progressLogs: false,
    });
    if (llama.maxThreads !== opts.threads) throw new Error(`maxThreads did not take: ${llama.maxThreads}`);

    const tLoad = now();
    const model = await llama.loadModel({ modelPath: opts.model, gpuLayers: 0 });
    const loadMs = now() - tLoad;

    const text = opts.prompt ??
        "The history of computing is a story of people finding ways to make machines do arithmetic, " +
        "store information, and communicate. Early mechanical calculators gave way to electronic " +
        "computers, which grew smaller, faster and cheaper every decade. ";
    const promptTokens = buildPromptTokens(model, text, opts.promptTokens);

    const threadSamples = new Set();
    const result = {
        engine: "llama.cpp",
        via: "node-llama-cpp",
        versions: {
            ...versions,
            "llama.cpp": llama.llamaCppRelease?.release ?? null,
            "llama.cpp_repo": llama.llamaCppRelease?.repo ?? null,
            build_type: llama.buildType,
            node: process.version,
        },
        model: path.basename(opts.model),
        model_load_ms: round(loadMs),
        gpu: llama.gpu,
        threads: opts.threads,
        prompt_tokens: promptTokens.length,
        gen_tokens: opts.genTokens,
        runs: opts.runs,
        sampling: "greedy (temperature 0), EOS ignored",
    };

    if (!opts.skipSingle) {
        const s = await measure(llama, model, opts, promptTokens, 1, threadSamples);
        result.single = {
            decode_tok_s: round(s.med("decode_tok_s")),
            prompt_ms: round(s.med("prompt_ms")),
            prompt_tok_s: round((promptTokens.length - 1) / (s.med("prompt_ms") / 1000)),
            ttft_ms: round(s.med("ttft_ms")),
            decode_ms: round(s.med("decode_ms")),
            ms_per_token: round(s.med("decode_ms") / opts.genTokens, 3),
            decode_cpu_util: round(s.med("decode_cpu_util")),
            decode_calls: s.runs.at(-1).decode_calls,
            runs_decode_tok_s: s.runs.map((x) => round(x.decode_tok_s)),
            context_threads: s.context_threads,
            flash_attention: s.flash_attention,
            text: model.detokenize(s.firstTokens),
        };
    }
    if (opts.sequences > 1 || opts.skipSingle) {
        const m = await measure(llama, model, opts, promptTokens, opts.sequences, threadSamples);
        result.multi = {
            sequences: opts.sequences,
            aggregate_decode_tok_s: round(m.med("decode_tok_s")),
            per_sequence_decode_tok_s: round(m.med("decode_tok_s") / opts.sequences),
            prompt_ms: round(m.med("prompt_ms")),
            prompt_tok_s: round((opts.sequences * (promptTokens.length - 1)) / (m.med("prompt_ms") / 1000)),
            ttft_ms: round(m.med("ttft_ms")),
            decode_ms: round(m.med("decode_ms")),
            ms_per_step: round(m.med("decode_ms") / opts.genTokens, 3),
            decode_cpu_util: round(m.med("decode_cpu_util")),
            decode_calls: m.runs.at(-1).decode_calls, // == gen_tokens when every step batches all sequences
            tokens_per_decode_call: round(m.runs.at(-1).tokens_per_decode_call ?? NaN),
            runs_decode_tok_s: m.runs.map((x) => round(x.decode_tok_s)),
            batch_size: m.batch_size,
            context_threads: m.context_threads,
            flash_attention: m.flash_attention,
            identical_outputs: m.sameOutputs,
        };
    }
    result.threads_observed = [...threadSamples].sort((a, b) => a - b); // llama_n_threads() sampled while decoding
    result.loadavg_1m_start = round(loadStart);
    result.loadavg_1m = round(os.loadavg()[0]); // includes this run; > threads means other load ran too
    result.cpus = os.availableParallelism?.() ?? os.cpus().length;

    await model.dispose();
    await llama.dispose();
    process.stdout.write(JSON.stringify(result) + "\n");
}

main().catch((err) => {
    console.error(err?.stack ?? String(err));
    process.exit(1);
});
