-- wrk script for bench/run_throughput.sh: POST /v1/runs of the 3-step "bench3" pipeline
-- (llm -> llm -> transform), each request with a distinct input (thread number + counter),
-- so that no two runs send the same prompt to the mock.
--
-- At the end it prints one machine-readable line for the driver script:
--   WRK_RESULT requests=N duration_us=N non2xx=N errors=N p50_us=N p90_us=N p99_us=N p999_us=N max_us=N

local threads = {}
local counter = 0
local tid = 0

local tickets = {
  "The export button does nothing when I click it in Firefox on Linux.",
  "I was charged twice for the March invoice; please refund one of them.",
  "How do I rotate the API key of a service account without downtime?",
  "The dashboard shows yesterday's numbers until I reload the page twice.",
}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  -- tid was set in setup(); fall back to 0 if wrk ran without it.
  tid = tid or 0
end

local headers = { ["Content-Type"] = "application/json" }

function request()
  counter = counter + 1
  local body = string.format(
    '{"pipeline":"bench3","input":{"n":%d,"worker":%d,"customer":"acme-%d","ticket":"%s"}}',
    counter, tid, counter % 997, tickets[counter % #tickets + 1])
  return wrk.format("POST", "/v1/runs", headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK_RESULT requests=%d duration_us=%d non2xx=%d errors=%d p50_us=%d p90_us=%d p99_us=%d p999_us=%d max_us=%d\n",
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max))
end
