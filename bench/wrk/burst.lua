-- A fixed number of orders at once: each thread sends `orders` POSTs (one per connection when
-- wrk runs with as many connections), every one a single line of `quantity` units of ONE SKU.
-- The connections then idle; when a thread has all its answers it prints "WRKDONE" and bench.load
-- interrupts wrk (wrk itself always runs for its whole -d). last_created in WRKJSON is the time
-- of the last 201.
-- wrk -t2 -c500 -d300s -s burst.lua URL -- tag=RUN sku=BENCH-HOT orders=250 quantity=1
local common = require("common")

setup = common.setup
done = common.done

local IDLE_MS = 3600 * 1000

function init(args)
  common.init_counters()
  cfg = common.args(args, { tag = "run", sku = "BENCH-HOT", orders = 250, quantity = 1, token = "tok_approve" })
  reserved, n, answered = 0, 0, 0
end

-- wrk calls delay() before every request of a connection: the first `orders` calls reserve a
-- request each, the connections past the quota wait (longer than any run).
function delay()
  reserved = reserved + 1
  if reserved <= cfg.orders then return 0 end
  return IDLE_MS
end

function request()
  local verification = common.verification()
  if verification then return verification end
  n = n + 1
  local id = string.format("%s-%d-%d", cfg.tag, thread_id, n)
  common.count_sent("place")
  local body = common.order_body("c-" .. id, { { cfg.sku, cfg.quantity } }, cfg.token, common.city(n))
  return wrk.format("POST", "/orders", common.json_headers("k-" .. id), body)
end

function response(status, _headers, _body)
  common.count_status(status)
  answered = answered + 1
  if answered == cfg.orders then
    io.write("WRKDONE\n")
    io.flush()
  end
end
