-- POST /orders only: every request a new order with its own body and Idempotency-Key.
-- Half the orders (hot_share) take one line of the hot SKU, the others 1-3 lines of the other SKUs.
-- wrk ... -s place.lua URL -- tag=RUN hot=BENCH-HOT skus=8 token=tok_approve hot_share=0.5
local common = require("common")

setup = common.setup
done = common.done

function init(args)
  common.init_counters()
  cfg = common.args(args, { tag = "run", hot = "BENCH-HOT", skus = 8, token = "tok_approve", hot_share = 0.5 })
  math.randomseed(thread_id * 7919 + 17)
  n = 0
end

function order_request()
  n = n + 1
  local id = string.format("%s-%d-%d", cfg.tag, thread_id, n)
  local lines
  if math.random() < cfg.hot_share then
    lines = { { cfg.hot, 1 } }
  else
    lines = {}
    local first = math.random(0, cfg.skus - 1)
    for i = 0, math.random(0, 2) do
      lines[#lines + 1] = { string.format("BENCH-%d", (first + i) % cfg.skus), math.random(1, 3) }
    end
  end
  common.count_sent("place")
  local body = common.order_body("c-" .. id, lines, cfg.token, common.city(n))
  return wrk.format("POST", "/orders", common.json_headers("k-" .. id), body)
end

function request()
  return common.verification() or order_request()
end

function response(status, _headers, _body)
  common.count_status(status)
end
