// Runs a GGUF in llama.cpp through node-llama-cpp (its prebuilt CPU binaries, never a build) for lora_cli's checks.
// Reads one JSON job on stdin, writes one JSON result on stdout; lora_cli/llamacpp.py is the only caller.
//   job:    {module_dir, model, threads, tokenize: [text], sequences: [[id]], chats: [[{role, content}]], max_tokens,
//            top_k}
//   result: {metadata: {...}, tokens: [[id]], next: [[{top: [[id, logit]]}]], answers: [{text, prompt, tokens}]}
//           or {error, log: [llama.cpp error lines]}
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";

const job = JSON.parse(await readStdin());
// node-llama-cpp lives outside this package (a cache folder); resolve it from there.
const entry = createRequire(job.module_dir + "/").resolve("node-llama-cpp");
const { getLlama, LlamaChatSession, JinjaTemplateChatWrapper, LlamaLogLevel } = await import(pathToFileURL(entry));

const errors = [];
finish(await run().catch((exc) => ({ error: String(exc?.message ?? exc), log: errors })));

async function run() {
    const llama = await getLlama({
        gpu: false, build: "never", progressLogs: false, logLevel: LlamaLogLevel.warn,
        // llama.cpp's own words on why a file is refused ("unknown pre-tokenizer type ...") go back to the caller
        logger: (level, message) => { if (level === "error" || level === "fatal") errors.push(message.trim()); },
    });
    const model = await llama.loadModel({ modelPath: job.model, gpuLayers: 0 });
    const result = { metadata: pickMetadata(model.fileInfo.metadata) };
    result.tokens = (job.tokenize ?? []).map((text) => Array.from(model.tokenize(text, true)));
    result.next = [];
    for (const ids of job.sequences ?? []) result.next.push(await nextTokens(model, ids, job.top_k ?? 5));
    result.answers = [];
    for (const messages of job.chats ?? []) result.answers.push(await answer(model, messages, job.max_tokens ?? 32));
    return result;
}

async function nextTokens(model, ids, topK) {
    // One context per sequence: nothing cached from an earlier one can leak into its logits.
    const context = await model.createContext({ contextSize: Math.max(256, ids.length + 16), sequences: 1, threads: job.threads });
    try {
        const input = ids.map((id) => [id, { generateNext: { logits: { filter: { tokens: [], includeTop: topK } } } }]);
        const outputs = await context.getSequence().controlledEvaluate(input);
        return outputs.map((out) => ({ top: topLogits(out.next.logits, topK) }));
    } finally {
        await context.dispose();
    }
}

function topLogits(logits, k) {
    // logits: Map<token, logit>; keep the k largest, as [id, logit] pairs, largest first
    const pairs = Array.from(logits.entries());
    pairs.sort((a, b) => b[1] - a[1]);
    return pairs.slice(0, k);
}

async function answer(model, messages, maxTokens) {
    // The GGUF's own Jinja chat template, as a user of llama.cpp gets it; greedy, no repeat penalty.
    const template = model.fileInfo.metadata?.tokenizer?.chat_template;
    const context = await model.createContext({ contextSize: 1024, sequences: 1, threads: job.threads });
    try {
        const chatWrapper = template ? new JinjaTemplateChatWrapper({ template, trimLeadingWhitespaceInResponses: false })
            : undefined;
        const session = new LlamaChatSession({ contextSequence: context.getSequence(), chatWrapper, autoDisposeSequence: true });
        const history = messages.slice(0, -1).map((m) => m.role === "system" ? { type: "system", text: m.content }
            : m.role === "user" ? { type: "user", text: m.content } : { type: "model", response: [m.content] });
        session.setChatHistory(history);
        const generated = [];
        const { responseText: text, stopReason } = await session.promptWithMeta(messages.at(-1).content, {
            maxTokens, temperature: 0, repeatPenalty: false, onToken: (tokens) => generated.push(...tokens) });
        // the context holds the rendered prompt, then the answer, but for its last token when maxTokens stopped it
        // (never evaluated); an end-of-generation token that stopped it is in neither
        const evaluated = Array.from(session.sequence.contextTokens);
        const unevaluated = stopReason === "maxTokens" && generated.length > 0 ? 1 : 0;
        const promptLength = evaluated.length - generated.length + unevaluated;
        return { text, prompt: evaluated.slice(0, promptLength), tokens: generated };
    } finally {
        await context.dispose();
    }
}

function pickMetadata(metadata) {
    const tokenizer = metadata?.tokenizer?.ggml ?? {};
    return { architecture: metadata?.general?.architecture, pre: tokenizer.pre, tokenizer_model: tokenizer.model,
        eos_token_id: tokenizer.eos_token_id, eot_token_id: tokenizer.eot_token_id, bos_token_id: tokenizer.bos_token_id };
}

function finish(result) {
    process.stdout.write(JSON.stringify(result) + "\n", () => process.exit(0));
}

async function readStdin() {
    const chunks = [];
    for await (const chunk of process.stdin) chunks.push(chunk);
    return Buffer.concat(chunks).toString("utf8");
}
