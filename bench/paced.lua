-- wrk script: post.lua's requests, each connection waiting args[3] ms after every answer before
-- it sends the next, so the load stays below saturation and latency percentiles compare the
-- services rather than the queues in front of them.
-- usage: wrk ... -s bench/paced.lua URL -- BODY_FILE CONTENT_TYPE PAUSE_MS
local here = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(here .. "post.lua")
local post_init = init
local pause_ms

function init(args)
  post_init(args)
  pause_ms = tonumber(args[3])
end

function delay()
  return pause_ms
end
