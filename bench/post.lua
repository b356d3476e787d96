-- wrk script: POST the body read from args[1] with Content-Type args[2]; print JSON stats.
-- usage: wrk ... -s bench/post.lua URL -- BODY_FILE CONTENT_TYPE
local req

function init(args)
  local file = assert(io.open(args[1], "rb"))
  local body = file:read("*a")
  file:close()
  req = wrk.format("POST", nil, {["Content-Type"] = args[2]}, body)
end

function request()
  return req
end

function done(summary, latency, requests)
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "non2xx": %d, ' ..
    '"errors": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    summary.errors.status, summary.errors.connect + summary.errors.read +
    summary.errors.write + summary.errors.timeout))
end
