-- wrk script for bench/run_waiting.sh: exactly N POST /v1/runs of the "approve" pipeline
-- (wait_for_signal -> transform), each with a distinct input, spread over wrk's threads.
--
--   WAITING_OUT=DIR wrk -t T -c C -d LIMIT -s waiting_submit.lua URL -- N T
--
-- When a thread has all its submits answered it writes DIR/ids.TID (the ids of the runs
-- it created, one per line) and then DIR/done.TID ("FIRST_US LAST_US CREATED REFUSED":
-- the wall-clock times of its first request and last answer, and its counts), and stops.
-- wrk itself runs until LIMIT (wrk 4.1 has no way to end early): the driver sends it
-- SIGINT once every thread is done, and done() prints
--   WRK_RESULT created=N refused=N first_us=N last_us=N errors=N p50_us=N p99_us=N
-- (refused: answers other than 201; errors: socket errors, whose submits are lost).
-- Until its thread is done, a connection with nothing left to send polls /healthz once
-- a second (wrk keeps every connection busy); those answers are not counted.

local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_usec; } keel_timeval;
  int gettimeofday(keel_timeval* tv, void* tz);
]]
local tv = ffi.new("keel_timeval")
local function now_us()
  ffi.C.gettimeofday(tv, nil)
  return tonumber(tv.tv_sec) * 1000000 + tonumber(tv.tv_usec)
end

local threads = {}
tid = 1  -- a global: setup() sets it to the thread's number (1-based) through thread:set
local total, nthreads, out = 0, 1, "."
local mine, sent, answered = 0, 0, 0
local verifying = false
local ids = {}
local headers = { ["Content-Type"] = "application/json" }
local health
-- Globals, read by done() through thread:get.
created, refused, first_us, last_us = 0, 0, 0, 0

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  total = tonumber(args[1]) or 10000
  nthreads = tonumber(args[2]) or 1
  out = os.getenv("WAITING_OUT") or "."
  -- This thread's share: the submits numbered tid, tid + T, tid + 2T, ... (1-based).
  mine = math.floor(total / nthreads) + ((tid <= total % nthreads) and 1 or 0)
  health = wrk.format("GET", "/healthz")
  -- wrk calls request() once on its first thread to check it, before any connection:
  -- that call must not use up a submit.
  verifying = (tid == 1)
end

function delay()
  if sent >= mine and mine > 0 then return 1000 end  -- a thread with no share stops at once
  return 0
end

local function finish()
  local f = assert(io.open(out .. "/ids." .. tid, "w"))
  if #ids > 0 then f:write(table.concat(ids, "\n"), "\n") end
  f:close()
  f = assert(io.open(out .. "/done." .. tid, "w"))
  f:write(string.format("%d %d %d %d\n", first_us, last_us, created, refused))
  f:close()
  wrk.thread:stop()
end

function request()
  if verifying then
    verifying = false
    return health
  end
  if sent >= mine then return health end
  if sent == 0 then first_us = now_us() end
  sent = sent + 1
  local n = tid + (sent - 1) * nthreads
  return wrk.format("POST", "/v1/runs", headers, string.format('{"pipeline":"approve","input":{"n":%d}}', n))
end

function response(status, hdrs, body)
  if status < 400 and not string.find(body, '"object":"run"', 1, true) then  -- /healthz
    if answered >= mine and mine == 0 then finish() end
    return
  end
  answered = answered + 1
  if status == 201 then
    created = created + 1
    ids[#ids + 1] = string.match(body, '"id":"(run_[^"]+)"')
  else
    refused = refused + 1
  end
  if answered >= mine then
    last_us = now_us()
    finish()
  end
end

function done(summary, latency, requests)
  local c, r, first, last = 0, 0, nil, 0
  for _, t in ipairs(threads) do
    c = c + t:get("created")
    r = r + t:get("refused")
    local f, l = t:get("first_us"), t:get("last_us")
    if f > 0 and (first == nil or f < first) then first = f end
    if l > last then last = l end
  end
  local e = summary.errors
  io.write(string.format("WRK_RESULT created=%d refused=%d first_us=%d last_us=%d errors=%d p50_us=%d p99_us=%d\n",
    c, r, first or 0, last, e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(99)))
end
