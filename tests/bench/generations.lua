-- wrk script for the benchmarks (tests/bench): POST /v1/images/generations.
--
-- The JSON body and the Authorization value come from the environment (BENCH_BODY,
-- BENCH_AUTH), so one script serves every case. Each thread counts the requests it sent;
-- `done` adds them up across threads and prints one line, "BENCH_RESULT {json}", with the
-- counts of 200 and other answers and the latency percentiles, that the harness reads.
--
-- How 200s are counted. By default from wrk's own tally: every completed response whose
-- status is not > 399 (summary.errors.status) is counted as a 200; the routes measured
-- answer only 200 or 4xx/5xx, and the harness checks the exact per-status counts against
-- the gateway's access log. A `response` hook would count them one by one, but defining
-- one makes wrk copy every body into a Lua string, growing its buffer 1 KiB at a time,
-- which halves the client's throughput on 80 KB-8 MB bodies and would skew the floor.
-- BENCH_STATUS_HOOK=1 turns the hook on (exact per-status counts, slower client).

local body = os.getenv("BENCH_BODY") or error("BENCH_BODY is not set")
local auth = os.getenv("BENCH_AUTH") or ""
local status_hook = os.getenv("BENCH_STATUS_HOOK") == "1"

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   sent = 0
   ok = 0
   other = 0
   -- "status=count;..." for the answers that were not 200, rebuilt on each such answer
   -- (rare) so that the main thread can read it with thread:get.
   statuses = ""
   counts = {}
   local headers = { ["Content-Type"] = "application/json" }
   if auth ~= "" then
      headers["Authorization"] = auth
   end
   req = wrk.format("POST", "/v1/images/generations", headers, body)
end

function request()
   sent = sent + 1
   return req
end

if status_hook then
   function response(status, hdrs, resp_body)
      if status == 200 then
         ok = ok + 1
      else
         other = other + 1
         counts[status] = (counts[status] or 0) + 1
         local parts = {}
         for s, c in pairs(counts) do
            table.insert(parts, s .. "=" .. c)
         end
         statuses = table.concat(parts, ";")
      end
   end
end

function done(summary, latency, requests)
   local total_sent, total_ok, total_other, statuses_all = 0, 0, 0, {}
   for _, t in ipairs(threads) do
      total_sent = total_sent + t:get("sent")
      total_ok = total_ok + t:get("ok")
      total_other = total_other + t:get("other")
      local s = t:get("statuses")
      if s ~= "" then
         table.insert(statuses_all, s)
      end
   end
   local e = summary.errors
   if not status_hook then
      total_other = e.status
      total_ok = summary.requests - e.status
   end
   io.write(string.format(
      'BENCH_RESULT {"duration_us": %d, "requests": %d, "bytes": %d, "sent": %d, ' ..
      '"ok": %d, "non200": %d, "statuses": "%s", "status_hook": %s, ' ..
      '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
      '"latency_us": {"min": %d, "mean": %.1f, "max": %d, "p50": %d, "p90": %d, ' ..
      '"p99": %d, "p999": %d}}\n',
      summary.duration, summary.requests, summary.bytes, total_sent,
      total_ok, total_other, table.concat(statuses_all, ";"), tostring(status_hook),
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.min, latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9)))
end
