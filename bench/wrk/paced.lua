-- place.lua's orders at a fixed total rate (open loop): request k of a thread is due at
-- start + k / (rate / threads); delay() waits until then, so a slow answer on one connection does
-- not slow the schedule as long as there are enough connections.
-- wrk -t2 -c32 -d60s -s paced.lua URL -- tag=RUN rate=100 threads=2 (and place.lua's arguments)
local common = require("common")
require("place")

setup = common.setup
done = common.done

local place_init = init

function init(args)
  place_init(args)
  local pacing = common.args(args, { rate = 100, threads = 2 })
  interval = pacing.threads / pacing.rate
  pacing_threads = pacing.threads
  due = nil
end

function delay()
  local now = common.now()
  due = due and due + interval or now + thread_id * interval / pacing_threads
  local wait = (due - now) * 1000
  if wait < 0 then return 0 end
  return math.floor(wait)
end
