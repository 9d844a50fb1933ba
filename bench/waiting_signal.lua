-- wrk script for bench/run_waiting.sh: one POST /v1/runs/ID/signals/go per run id in
-- IDS_FILE (one per line), spread over wrk's threads.
--
--   WAITING_OUT=DIR WAITING_IDS=IDS_FILE wrk -t T -c C -d LIMIT -s waiting_signal.lua URL -- T
--
-- When a thread has all its signals answered it writes DIR/signalled.TID
-- ("FIRST_US LAST_US ACCEPTED REFUSED") and stops; the driver then sends wrk SIGINT (wrk
-- 4.1 cannot end early by itself) and done() prints
--   WRK_RESULT accepted=N refused=N first_us=N last_us=N errors=N p50_us=N p99_us=N
-- (accepted: 202 answers; refused: any other answer; errors: socket errors).
-- Until its thread is done, a connection with nothing left to send polls /healthz once
-- a second; those answers are not counted.

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
local nthreads, out = 1, "."
local mine = {}
local sent, answered = 0, 0
local verifying = false
local headers = { ["Content-Type"] = "application/json" }
local body = '{"decision":"approve"}'
local health
-- Globals, read by done() through thread:get.
accepted, refused, first_us, last_us = 0, 0, 0, 0

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  nthreads = tonumber(args[1]) or 1
  out = os.getenv("WAITING_OUT") or "."
  local path = assert(os.getenv("WAITING_IDS"), "WAITING_IDS is not set")
  local i = 0
  for line in io.lines(path) do
    if line ~= "" then
      if i % nthreads == tid - 1 then mine[#mine + 1] = line end
      i = i + 1
    end
  end
  health = wrk.format("GET", "/healthz")
  verifying = (tid == 1)  -- wrk's check of request() on its first thread sends nothing
end

function delay()
  if sent >= #mine and #mine > 0 then return 1000 end  -- a thread with no share stops at once
  return 0
end

local function finish()
  local f = assert(io.open(out .. "/signalled." .. tid, "w"))
  f:write(string.format("%d %d %d %d\n", first_us, last_us, accepted, refused))
  f:close()
  wrk.thread:stop()
end

function request()
  if verifying then
    verifying = false
    return health
  end
  if sent >= #mine then return health end
  if sent == 0 then first_us = now_us() end
  sent = sent + 1
  return wrk.format("POST", "/v1/runs/" .. mine[sent] .. "/signals/go", headers, body)
end

function response(status, hdrs, resp)
  if status == 200 then  -- /healthz (a signal is answered 202)
    if #mine == 0 then finish() end
    return
  end
  answered = answered + 1
  if status == 202 then accepted = accepted + 1 else refused = refused + 1 end
  if answered >= #mine then
    last_us = now_us()
    finish()
  end
end

function done(summary, latency, requests)
  local a, r, first, last = 0, 0, nil, 0
  for _, t in ipairs(threads) do
    a = a + t:get("accepted")
    r = r + t:get("refused")
    local f, l = t:get("first_us"), t:get("last_us")
    if f > 0 and (first == nil or f < first) then first = f end
    if l > last then last = l end
  end
  local e = summary.errors
  io.write(string.format("WRK_RESULT accepted=%d refused=%d first_us=%d last_us=%d errors=%d p50_us=%d p99_us=%d\n",
    a, r, first or 0, last, e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(99)))
end
