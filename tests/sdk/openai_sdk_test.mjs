// keel's OpenAI compatibility, checked with the official OpenAI SDK for Node: a client
// that only changes baseURL must see valid answers, valid streams and valid errors.
// Usage: node openai_sdk_test.mjs http://127.0.0.1:PORT http://127.0.0.1:MOCK_PORT
// (keel serve on the default config, and a keel mock-llm)
import assert from "node:assert/strict";
import OpenAI from "openai";

const client = new OpenAI({ baseURL: `${process.argv[2]}/v1`, apiKey: "not-needed", maxRetries: 0 });
const mockUrl = process.argv[3];  // a `keel mock-llm`, called directly
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

await check("embeddings.create decodes exactly the vectors the mock computes", async () => {
  // The SDK asks for encoding_format: base64 and decodes the float32s itself; the mock,
  // called directly for floats, must give the same numbers, element by element.
  const input = ["alpha", "beta gamma"];
  const r = await client.embeddings.create({ model: "default", input });
  assert.equal(r.data.length, 2);
  const direct = await fetch(`${mockUrl}/v1/embeddings`, {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ model: "mock-1", input, encoding_format: "float" }),
  }).then((res) => res.json());
  for (let i = 0; i < input.length; i++) {
    const got = r.data[i].embedding;
    const want = direct.data[i].embedding;
    assert.equal(got.length, want.length, `input ${i}: dimensions`);
    assert.ok(want.length > 0);
    for (let j = 0; j < want.length; j++) assert.equal(got[j], want[j], `input ${i}, element ${j}`);
  }
  // Floats asked through keel are the same numbers too, within a unit in the last place:
  // keel re-reads the provider's JSON with Boost.JSON 1.81, whose number parsing is not
  // exact to the last bit (base64, a string, passes through untouched).
  const floats = await client.embeddings.create({ model: "default", input, encoding_format: "float" });
  for (let i = 0; i < input.length; i++) {
    const want = direct.data[i].embedding;
    floats.data[i].embedding.forEach((x, j) => assert.ok(Math.abs(x - want[j]) <= 1e-15 * Math.abs(want[j]), `float ${i}.${j}`));
  }
});

const tools = [{
  type: "function",
  function: {
    name: "get_weather",
    parameters: { type: "object", required: ["city"], properties: { city: { type: "string" } } },
  },
}];

await check("a tool call round trip: content null and tool_calls, then the answer after the result", async () => {
  const messages = [{ role: "user", content: "weather in Paris?" }];
  const r = await client.chat.completions.create({ model: "default", messages, tools, tool_choice: "required" });
  const msg = r.choices[0].message;
  assert.equal(r.choices[0].finish_reason, "tool_calls");
  assert.equal(msg.content, null);
  assert.equal(msg.tool_calls.length, 1);
  assert.equal(msg.tool_calls[0].type, "function");
  assert.equal(msg.tool_calls[0].function.name, "get_weather");
  assert.equal(typeof JSON.parse(msg.tool_calls[0].function.arguments).city, "string");
  const after = await client.chat.completions.create({
    model: "default", tools,
    messages: [...messages, msg, { role: "tool", tool_call_id: msg.tool_calls[0].id, content: "sunny, 21 C" }],
  });
  assert.equal(after.choices[0].finish_reason, "stop");
  assert.equal(typeof after.choices[0].message.content, "string");
});

await check("a streamed tool call: deltas that add up to the non-streamed call", async () => {
  const messages = [{ role: "user", content: "weather and more\n#mock tool=get_weather,get_weather" }];
  const whole = await client.chat.completions.create({ model: "default", messages, tools });
  const stream = await client.chat.completions.create({ model: "default", messages, tools, stream: true });
  const calls = [];
  let finish = null;
  for await (const chunk of stream) {
    const choice = chunk.choices[0];
    if (!choice) continue;
    for (const d of choice.delta.tool_calls ?? []) {
      calls[d.index] ??= { id: "", name: "", arguments: "" };
      if (d.id) calls[d.index].id = d.id;
      if (d.function?.name) calls[d.index].name += d.function.name;
      if (d.function?.arguments) calls[d.index].arguments += d.function.arguments;
    }
    if (choice.finish_reason) finish = choice.finish_reason;
  }
  assert.equal(finish, "tool_calls");
  const want = whole.choices[0].message.tool_calls;
  assert.equal(calls.length, 2);
  assert.deepEqual(calls.map((c) => [c.name, c.arguments]), want.map((c) => [c.function.name, c.function.arguments]));
  assert.ok(calls[0].id && calls[1].id && calls[0].id !== calls[1].id, "each call has its own id");
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
