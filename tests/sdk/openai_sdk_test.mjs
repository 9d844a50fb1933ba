// keel's OpenAI compatibility, checked with the official OpenAI SDK for Node: a client
// that only changes baseURL must see valid answers, valid streams and valid errors.
// Usage: node openai_sdk_test.mjs http://127.0.0.1:PORT   (keel serve on the default config)
import assert from "node:assert/strict";
import OpenAI from "openai";

const client = new OpenAI({ baseURL: `${process.argv[2]}/v1`, apiKey: "not-needed", maxRetries: 0 });
let passed = 0;
let failed = 0;
async function check(name, fn) {
  try {
    await fn();
    passed++;
    console.log(`ok   ${name}`);
  } catch (e) {
    failed++;
    console.log(`FAIL ${name}: ${e.stack || e}`);
  }
}

await check("models.list names the routes", async () => {
  const ids = [];
  for await (const m of client.models.list()) ids.push(m.id);
  assert.ok(ids.includes("default"), `routes: ${ids}`);
});

await check("chat.completions.create answers a chat.completion", async () => {
  const r = await client.chat.completions.create({ model: "default", messages: [{ role: "user", content: "hello sdk" }] });
  assert.equal(r.object, "chat.completion");
  assert.equal(typeof r.choices[0].message.content, "string");
  assert.ok(r.choices[0].message.content.includes("hello sdk"));
  assert.equal(r.model, "mock-1");
  assert.ok(r.usage.total_tokens > 0);
});

await check("withResponse exposes keel's headers", async () => {
  const { response } = await client.chat.completions
    .create({ model: "default", messages: [{ role: "user", content: "headers" }] })
    .withResponse();
  assert.equal(response.headers.get("x-keel-provider"), "mock");
  assert.equal(response.headers.get("x-keel-attempts"), "1");
});

await check("a stream yields chunks whose deltas make the whole answer, with usage", async () => {
  const whole = await client.chat.completions.create({ model: "default", messages: [{ role: "user", content: "stream sdk" }] });
  const stream = await client.chat.completions.create({
    model: "default", stream: true, stream_options: { include_usage: true },
    messages: [{ role: "user", content: "stream sdk" }],
  });
  let text = "";
  let usage = null;
  let chunks = 0;
  for await (const chunk of stream) {
    chunks++;
    assert.equal(chunk.object, "chat.completion.chunk");
    if (chunk.choices.length > 0) text += chunk.choices[0].delta.content ?? "";
    if (chunk.usage) usage = chunk.usage;
  }
  assert.ok(chunks >= 3);
  assert.equal(text, whole.choices[0].message.content);
  assert.ok(usage && usage.total_tokens > 0);
});

await check("embeddings.create answers vectors", async () => {
  const r = await client.embeddings.create({ model: "default", input: ["a", "b"] });
  assert.equal(r.data.length, 2);
  assert.ok(r.data[0].embedding.length > 0);
});

await check("an unknown model is a NotFoundError with the error shape", async () => {
  await assert.rejects(
    client.chat.completions.create({ model: "no-such-route", messages: [{ role: "user", content: "x" }] }),
    (e) => e instanceof OpenAI.NotFoundError && e.status === 404 && typeof e.message === "string" && e.param === "model");
});

await check("a bad request is a BadRequestError", async () => {
  await assert.rejects(client.chat.completions.create({ model: "default", messages: [] }),
    (e) => e instanceof OpenAI.BadRequestError && e.param === "messages");
});

await check("a provider failure surfaces as an APIError with its status", async () => {
  await assert.rejects(
    client.chat.completions.create({ model: "default", messages: [{ role: "user", content: "#mock fail=401" }] }),
    (e) => e instanceof OpenAI.AuthenticationError && e.status === 401);
});

console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
