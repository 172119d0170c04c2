// Drives embgate with the official OpenAI Node SDK.
//
// Every vector the SDK gets through the gateway must equal, as float32, the
// vector the vendor returns when asked directly. The embedding calls run
// twice; the second run must be answered from the cache only (checked on
// /metrics).
//
// Environment:
//   GATEWAY_URL  e.g. http://127.0.0.1:8080 (no /v1)
//   VENDOR_URL   e.g. http://127.0.0.1:9000/v1 (as printed by fake-vendor)
//
// Prints one `PASS name` or `FAIL name: detail` line per check and exits 1
// if any check failed.

import OpenAI from 'openai';

const GATEWAY = process.env.GATEWAY_URL.replace(/\/+$/, '');
const VENDOR = process.env.VENDOR_URL.replace(/\/+$/, '');
const API_KEY = 'sk-test';

let failures = 0;

async function report(name, fn) {
  try {
    await fn();
    console.log(`PASS ${name}`);
  } catch (e) {
    failures += 1;
    let detail = `${e?.name ?? 'Error'}: ${e?.message ?? e}`;
    if (e?.status !== undefined && e?.error !== undefined) {
      detail += ` [HTTP ${e.status}: ${JSON.stringify(e.error).slice(0, 500)}]`;
    }
    console.log(`FAIL ${name}: ${detail}`);
    console.error(e?.stack ?? e);
  }
}

function assert(condition, message) {
  if (!condition) throw new Error(message);
}

// ------------------------------------------------------------------ helpers

async function http(method, url, body) {
  const resp = await fetch(url, {
    method,
    headers: {
      Authorization: `Bearer ${API_KEY}`,
      ...(body === undefined ? {} : { 'Content-Type': 'application/json' }),
    },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await resp.text();
  if (!resp.ok) throw new Error(`${method} ${url}: HTTP ${resp.status}: ${text.slice(0, 500)}`);
  return text;
}

/** float32 values of a vector: an array of numbers (rounded to float32) or a
 * base64 string of little-endian float32 values. */
function f32(values) {
  if (typeof values === 'string') {
    const bytes = Buffer.from(values, 'base64');
    assert(bytes.length % 4 === 0, `base64 vector of ${bytes.length} bytes`);
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const out = new Float32Array(bytes.length / 4);
    for (let i = 0; i < out.length; i++) out[i] = view.getFloat32(i * 4, true);
    return out;
  }
  assert(
    Array.isArray(values) || values instanceof Float32Array,
    `vector is ${typeof values}`,
  );
  return Float32Array.from(values);
}

function sameF32(a, b) {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

const directCache = new Map();

/** The vectors the vendor itself returns, asked directly in both encodings;
 * the two must agree. */
async function vendorDirect(model, input, dimensions) {
  const key = JSON.stringify([model, input, dimensions ?? null]);
  if (directCache.has(key)) return directCache.get(key);
  const answers = {};
  for (const encoding of ['base64', 'float']) {
    const body = { model, input, encoding_format: encoding };
    if (dimensions !== undefined) body.dimensions = dimensions;
    const doc = JSON.parse(await http('POST', `${VENDOR}/embeddings`, body));
    answers[encoding] = [...doc.data].sort((x, y) => x.index - y.index).map((d) => f32(d.embedding));
  }
  assert(
    answers.base64.length === answers.float.length &&
      answers.base64.every((v, i) => sameF32(v, answers.float[i])),
    `vendor disagrees with itself between base64 and float for ${key}`,
  );
  directCache.set(key, answers.base64);
  return answers.base64;
}

function compare(what, got, expected) {
  assert(got.length === expected.length, `${what}: ${got.length} vectors, expected ${expected.length}`);
  got.forEach((g, i) => {
    const g32 = f32(g);
    const e = expected[i];
    assert(g32.length === e.length, `${what}: vector ${i} has ${g32.length} values, expected ${e.length}`);
    const diffs = [];
    for (let j = 0; j < e.length; j++) if (g32[j] !== e[j]) diffs.push(j);
    if (diffs.length) {
      const j = diffs[0];
      throw new Error(
        `${what}: vector ${i} differs from the vendor's in ${diffs.length} of ${e.length} values; ` +
          `first at [${j}]: got ${g32[j]}, vendor ${e[j]}`,
      );
    }
  });
}

async function lookups() {
  const text = await http('GET', `${GATEWAY}/metrics`);
  const totals = { hit: 0, miss: 0 };
  for (const line of text.split('\n')) {
    if (!line.startsWith('embgate_cache_lookups_total{')) continue;
    const cut = line.lastIndexOf(' ');
    const m = /result="([^"]*)"/.exec(line.slice(0, cut));
    if (m) totals[m[1]] = (totals[m[1]] ?? 0) + Number(line.slice(cut + 1));
  }
  return totals;
}

const client = new OpenAI({ baseURL: `${GATEWAY}/v1`, apiKey: API_KEY, maxRetries: 0, timeout: 60_000 });

const SINGLE = 'The quick brown fox jumps over the lazy dog.';
const TEXTS = [
  'hello world',
  'naïve café ☕ — ünïcödé, 日本語のテキスト',
  'line one\nline two\ttabbed  and  spaced',
  '<|endoftext|> is ordinary text when embedded',
  'hello world',
];
const TOKENS = [[9906, 1917], [1, 2, 3, 4, 5], [100255]];

// ------------------------------------------------------------------- checks

const EMBEDDING_CHECKS = [
  [
    'openai sdk: one string, default base64',
    async () => {
      const resp = await client.embeddings.create({ model: 'text-embedding-3-small', input: SINGLE });
      assert(resp.model === 'text-embedding-3-small', `model ${resp.model}`);
      compare(
        'single string, base64',
        resp.data.map((d) => d.embedding),
        await vendorDirect('text-embedding-3-small', SINGLE),
      );
    },
  ],
  [
    'openai sdk: list with a duplicate, default base64',
    async () => {
      const resp = await client.embeddings.create({ model: 'text-embedding-3-small', input: TEXTS });
      const indices = resp.data.map((d) => d.index);
      assert(JSON.stringify(indices) === JSON.stringify(TEXTS.map((_, i) => i)), `indices ${indices}`);
      compare('list, base64', resp.data.map((d) => d.embedding), await vendorDirect('text-embedding-3-small', TEXTS));
    },
  ],
  [
    'openai sdk: list, encoding_format=float',
    async () => {
      const resp = await client.embeddings.create({
        model: 'text-embedding-ada-002',
        input: TEXTS,
        encoding_format: 'float',
      });
      assert(resp.data.every((d) => Array.isArray(d.embedding)), 'float answer is not arrays of numbers');
      compare('list, float', resp.data.map((d) => d.embedding), await vendorDirect('text-embedding-ada-002', TEXTS));
    },
  ],
  [
    'openai sdk: explicit base64 with dimensions=256',
    async () => {
      const input = TEXTS.slice(0, 3);
      const resp = await client.embeddings.create({
        model: 'text-embedding-3-large',
        input,
        dimensions: 256,
        encoding_format: 'base64',
      });
      assert(resp.data.every((d) => typeof d.embedding === 'string'), 'base64 answer is not strings');
      assert(resp.data.every((d) => f32(d.embedding).length === 256), 'not 256 values');
      compare(
        'dimensions=256, base64',
        resp.data.map((d) => d.embedding),
        await vendorDirect('text-embedding-3-large', input, 256),
      );
    },
  ],
  [
    'openai sdk: token arrays',
    async () => {
      const resp = await client.embeddings.create({ model: 'text-embedding-3-small', input: TOKENS });
      compare('token arrays', resp.data.map((d) => d.embedding), await vendorDirect('text-embedding-3-small', TOKENS));
    },
  ],
  [
    'openai sdk: acme-embed-v1',
    async () => {
      const resp = await client.embeddings.create({ model: 'acme-embed-v1', input: TEXTS });
      compare('acme-embed-v1', resp.data.map((d) => d.embedding), await vendorDirect('acme-embed-v1', TEXTS));
    },
  ],
];

async function modelsList() {
  const ids = new Set();
  for await (const m of client.models.list()) ids.add(m.id);
  for (const want of ['text-embedding-3-small', 'gpt-4o-mini']) {
    assert(ids.has(want), `${want} missing from ${[...ids].sort()}`);
  }
}

async function chatStream() {
  const message = 'please stream these words back to me one at a time';
  const started = performance.now();
  const stream = await client.chat.completions.create({
    model: 'gpt-4o-mini',
    messages: [{ role: 'user', content: message }],
    stream: true,
  });
  let chunks = 0;
  const pieces = [];
  const times = [];
  for await (const chunk of stream) {
    chunks += 1;
    for (const choice of chunk.choices) {
      if (choice.delta?.content) {
        pieces.push(choice.delta.content);
        times.push(performance.now() - started);
      }
    }
  }
  assert(chunks > 2, `only ${chunks} chunks`);
  assert(pieces.length > 2, `only ${pieces.length} chunks with content`);
  assert(pieces.join('') === message, `content ${JSON.stringify(pieces.join(''))}, expected ${JSON.stringify(message)}`);
  // The vendor spaces its chunks 30 ms apart: a gateway that forwards them as
  // they come delivers them spread out, one that buffers all at once.
  const spread = times[times.length - 1] - times[0];
  assert(spread >= 100, `${pieces.length} content chunks arrived within ${spread.toFixed(0)} ms`);
}

await report('node openai sdk: models.list', modelsList);
await report('node openai sdk: streamed chat completion', chatStream);

const before = await lookups();
for (const [name, fn] of EMBEDDING_CHECKS) await report(`node ${name} (run 1)`, fn);
const afterFirst = await lookups();
for (const [name, fn] of EMBEDDING_CHECKS) await report(`node ${name} (run 2)`, fn);
const afterSecond = await lookups();

await report('node metrics: first run looked inputs up and missed', async () => {
  assert(afterFirst.miss > before.miss, `misses ${JSON.stringify(before)} -> ${JSON.stringify(afterFirst)}`);
});
await report('node metrics: second run answered from the cache only', async () => {
  const seen = `lookups ${JSON.stringify(afterFirst)} -> ${JSON.stringify(afterSecond)}`;
  assert(afterSecond.miss === afterFirst.miss, `second run had ${afterSecond.miss - afterFirst.miss} misses (${seen})`);
  assert(afterSecond.hit > afterFirst.hit, `second run had no hits (${seen})`);
});

process.exit(failures ? 1 : 0);
