-- wrk script for the throughput scenario (bench/run.sh): POSTs bench/request.json (~1 KB) with
-- the header set the OpenAI Python SDK sends, and prints one machine-readable summary line.
--   BENCH_BODY=bench/request.json [BENCH_AUTH="Bearer <key>"] wrk -t2 -c64 -d5s -s bench/wrk-post.lua URL
-- BENCH_AUTH, when set and not empty, replaces the placeholder Authorization (a client key or a
-- signed key, for the client-authentication rows).

local path = os.getenv("BENCH_BODY") or "bench/request.json"
local f = assert(io.open(path, "rb"))
local body = f:read("*a")
f:close()

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json"
wrk.headers["Accept-Encoding"] = "gzip, deflate"
wrk.headers["User-Agent"] = "OpenAI/Python 1.54.0"
local auth = os.getenv("BENCH_AUTH")
if auth == nil or auth == "" then auth = "Bearer sk-placeholder-the-sidecar-replaces-this" end
wrk.headers["Authorization"] = auth
wrk.headers["X-Stainless-Lang"] = "python"
wrk.headers["X-Stainless-Package-Version"] = "1.54.0"
wrk.headers["X-Stainless-OS"] = "Linux"
wrk.headers["X-Stainless-Arch"] = "x64"
wrk.headers["X-Stainless-Runtime"] = "CPython"
wrk.headers["X-Stainless-Runtime-Version"] = "3.12.7"
wrk.headers["X-Stainless-Async"] = "false"
wrk.headers["X-Stainless-Retry-Count"] = "0"

function done(summary, latency, requests)
  local e = summary.errors
  local secs = summary.duration / 1e6
  io.write(string.format(
    'JSON {"requests":%d,"duration_s":%.3f,"rps":%.1f,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency":{"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,"p999_us":%.1f,"max_us":%.1f}}\n',
    summary.requests, secs, summary.requests / secs, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max))
end
