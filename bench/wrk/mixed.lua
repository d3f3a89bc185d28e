-- The mixed scenario: place, GET by id, search, PATCH (new address), DELETE (cancel), on orders this
-- thread placed earlier in the run. Places follow place.lua (half on the hot SKU).
-- Weights out of 100 (args): place=40 get=30 search=10 change=10 cancel=10.
local common = require("common")
require("place")

setup = common.setup
done = common.done

local place_init = init

function init(args)
  place_init(args)
  weights = common.args(args, { place = 40, get = 30, search = 10, change = 10, cancel = 10 })
  pool = {} -- ids of orders placed by this thread and not cancelled
end

local function pick()
  local i = math.random(1, #pool)
  return i, pool[i]
end

local function address_body(k)
  return string.format(
    '{"shipping_address":{"name":"Bench","line1":"%d Changed Street","city":"%s",'
      .. '"postal_code":"127","country":"NL"}}', k, common.city(k))
end

function request()
  local verification = common.verification()
  if verification then return verification end
  local roll = math.random(1, weights.place + weights.get + weights.search + weights.change + weights.cancel)
  if #pool == 0 or roll <= weights.place then
    return order_request()
  end
  roll = roll - weights.place
  if roll <= weights.get then
    common.count_sent("get")
    local _, id = pick()
    return wrk.format("GET", "/orders/" .. id)
  end
  roll = roll - weights.get
  if roll <= weights.search then
    common.count_sent("search")
    return wrk.format("GET", "/orders?limit=20&q=" .. common.city(math.random(0, 7)))
  end
  roll = roll - weights.search
  if roll <= weights.change then
    common.count_sent("change")
    local _, id = pick()
    return wrk.format("PATCH", "/orders/" .. id, common.json_headers(nil), address_body(math.random(1, 999)))
  end
  common.count_sent("cancel")
  local i, id = pick()
  pool[i] = pool[#pool]
  pool[#pool] = nil
  return wrk.format("DELETE", "/orders/" .. id .. "?reason=bench")
end

function response(status, _headers, body)
  common.count_status(status)
  if status == 201 then
    local id = body:match('"id":"([^"]+)"')
    if id then pool[#pool + 1] = id end
  end
end
