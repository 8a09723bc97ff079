-- wrk script for bench/resolve/run.sh: only a done() hook, so the request
-- path stays wrk's static, pre-built request (headers come from -H flags).
-- Prints one machine-readable line after wrk's own human-readable report.
-- Latencies are in microseconds; duration is in microseconds.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKRESULT requests=%d duration_us=%d bytes=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d " ..
    "err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d\n",
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
