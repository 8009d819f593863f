-- wrk script of bench/bench_http.py and bench/bench_replicas.py: one request per call, cycling through
-- pre-built bodies read from files once (so wrk does no work per request),
-- and a machine-readable summary line at the end.
--
--   wrk -t1 -c16 -d15s -s bench/wrk_bodies.lua URL -- METHOD PATH CONTENT_TYPE [BODY_FILE ...]
--
-- CONTENT_TYPE "-" sends none; no BODY_FILE sends no body (e.g. GET /health).
-- done() prints one line "WRK_JSON {...}": requests, duration, errors and the
-- latency percentiles in microseconds (wrk's own histogram).

local prepared = {}
local count = 0
local position = 0

function init(args)
  local method = args[1] or "GET"
  local path = args[2] or "/"
  local content_type = args[3]
  -- headers given with -H (e.g. an API key) are kept
  local headers = {}
  for name, value in pairs(wrk.headers) do headers[name] = value end
  if content_type ~= nil and content_type ~= "-" then
    headers["Content-Type"] = content_type
  end
  if #args <= 3 then
    count = 1
    prepared[1] = wrk.format(method, path, headers, nil)
    return
  end
  for k = 4, #args do
    local file = assert(io.open(args[k], "rb"))
    local body = file:read("*a")
    file:close()
    count = count + 1
    prepared[count] = wrk.format(method, path, headers, body)
  end
end

function request()
  position = position % count + 1
  return prepared[position]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "errors_connect": %d, "errors_read": %d, ' ..
    '"errors_write": %d, "errors_status": %d, "errors_timeout": %d, "p50_us": %d, "p90_us": %d, ' ..
    '"p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
