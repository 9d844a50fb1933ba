-- wrk script for bench/run_concurrency.sh: POSTs the JSON body in the file named by env
-- BODY_FILE (a chat completion, streamed or not) to the URL's path, and checks that every
-- 2xx answer is whole: with env STREAM=1 its body must hold "data: [DONE]" (the end of an
-- OpenAI stream), otherwise "choices" (a chat.completion object). wrk reads whole
-- responses (chunked streams included) before calling response(), so its latency is the
-- time to the end of the answer.
--
-- At the end it prints one machine-readable line for the driver script:
--   WRK_RESULT requests=N duration_us=N non2xx=N incomplete=N sock=N timeouts=N
--              p50_us=N p99_us=N max_us=N
-- requests: answers received (any status); non2xx: answers outside 200..299;
-- incomplete: 2xx answers whose body is not whole; sock: connect/read/write errors and
-- timeouts (wrk --timeout); timeouts: of which timeouts.

local f = assert(io.open(assert(os.getenv("BODY_FILE"), "BODY_FILE not set"), "rb"))
wrk.body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local want = (os.getenv("STREAM") == "1") and "data: [DONE]" or '"choices"'
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

-- Per-thread counters (globals of each thread's Lua state, read back in done()).
non2xx = 0
incomplete = 0

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  elseif body == nil or not string.find(body, want, 1, true) then
    incomplete = incomplete + 1
  end
end

function done(summary, latency, requests)
  local n, inc = 0, 0
  for _, t in ipairs(threads) do
    n = n + (t:get("non2xx") or 0)
    inc = inc + (t:get("incomplete") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    "WRK_RESULT requests=%d duration_us=%d non2xx=%d incomplete=%d sock=%d timeouts=%d p50_us=%d p99_us=%d max_us=%d\n",
    summary.requests, summary.duration, n, inc, e.connect + e.read + e.write + e.timeout, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
