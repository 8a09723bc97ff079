-- wrk script for bench/proxy/run.sh: POST a small chat-completions body on
-- keep-alive connections. The request stays wrk's static, pre-built request
-- (no request() hook); the Authorization header comes from -H flags.
--
--   wrk ... -s post.lua URL                 # closed loop, as fast as possible
--   wrk ... -s post.lua URL -- DELAY_MS      # each connection waits DELAY_MS
--                                           # between requests (moderate load)
--
-- Prints one machine-readable line after wrk's own report (same fields as
-- bench/resolve/report.lua). Latencies and duration are in microseconds.
wrk.method = "POST"
wrk.body = '{"model":"gpt-x","messages":[{"role":"user","content":"hi"}]}'
wrk.headers["Content-Type"] = "application/json"

init = function(args)
  local d = tonumber(args[1] or "0") or 0
  if d > 0 then
    delay = function() return d end
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKRESULT requests=%d duration_us=%d bytes=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d " ..
    "err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d\n",
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
