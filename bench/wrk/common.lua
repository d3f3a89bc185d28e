-- Shared by the wrk scripts of bench.load (loaded with require "common"; bench.load sets LUA_PATH).
--
-- Arguments come after wrk's "--" as key=value pairs (see M.args). Every script counts the answers
-- per HTTP status in each thread; done() prints one line "WRKJSON {...}" with the figures that
-- bench.load parses: requests, seconds, req/s, latency percentiles (ms), statuses, requests sent
-- per kind, and the monotonic clock time of the last 201 (for the saga scenarios).
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock_id, bench_timespec *tp);
]]

local M = {}
local CLOCK_MONOTONIC = 1 -- the clock of Python's time.monotonic(), so bench.load can compare
local timespec = ffi.new("bench_timespec")

function M.now()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, timespec)
  return tonumber(timespec.tv_sec) + tonumber(timespec.tv_nsec) * 1e-9
end

-- "key=value" strings -> table, with defaults for what is not given.
function M.args(list, defaults)
  local out = {}
  for k, v in pairs(defaults) do out[k] = v end
  for _, item in ipairs(list or {}) do
    local k, v = item:match("^([%w_]+)=(.*)$")
    if k then out[k] = tonumber(v) or v end
  end
  return out
end

local threads = {}

-- wrk calls setup(thread) in its main Lua state once per thread, before init(args) in the thread.
function M.setup(thread)
  thread:set("thread_id", #threads)
  table.insert(threads, thread)
end

-- Per-thread state: the counters done() collects.
function M.init_counters()
  verifying = thread_id == 0
  statuses = {}
  sent = {}
  last_created = 0
  M.created = 0
end

-- wrk calls request() once in thread 0 before the run, only to check that it returns a request
-- (script_verify_request); that request is never sent. Scripts answer it with this one, so that
-- it costs no order number and no count.
function M.verification()
  if verifying then
    verifying = false
    return wrk.format("GET", "/health")
  end
  return nil
end

function M.count_sent(kind)
  sent[kind] = (sent[kind] or 0) + 1
end

function M.count_status(status)
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
  if status == 201 then
    last_created = M.now()
    M.created = M.created + 1
  end
end

-- The service's "Authorization: Bearer <token>" (bench.load puts it in WRK_AUTHORIZATION, see
-- bench/auth.py): on every request, those built with wrk's default headers and with json_headers.
local authorization = os.getenv("WRK_AUTHORIZATION")
if authorization == "" then authorization = nil end
if authorization then wrk.headers["Authorization"] = authorization end

-- wrk's headers table is a Lua table; the Idempotency-Key makes a retried POST safe.
function M.json_headers(key)
  local headers = { ["Content-Type"] = "application/json" }
  if key then headers["Idempotency-Key"] = key end
  if authorization then headers["Authorization"] = authorization end
  return headers
end

local CITIES = { "London", "Paris", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Lisbon" }

function M.city(n)
  return CITIES[(n % #CITIES) + 1]
end

-- One PlaceOrder body; lines is a list of {sku, quantity}.
function M.order_body(customer, lines, token, city)
  local parts = {}
  for i, line in ipairs(lines) do
    parts[i] = string.format('{"sku":"%s","quantity":%d}', line[1], line[2])
  end
  return string.format(
    '{"customer_id":"%s","lines":[%s],"shipping_address":{"name":"Bench %s","line1":"1 Loop Road",'
      .. '"city":"%s","postal_code":"127","country":"NL"},"payment_method":{"token":"%s"}}',
    customer, table.concat(parts, ","), customer, city, token)
end

local function encode(value)
  if type(value) == "table" then
    local parts = {}
    for k, v in pairs(value) do
      table.insert(parts, string.format('"%s":%s', tostring(k), encode(v)))
    end
    return "{" .. table.concat(parts, ",") .. "}"
  end
  return tostring(value)
end

local function add_into(total, part)
  for k, v in pairs(part or {}) do total[k] = (total[k] or 0) + v end
end

-- wrk calls done() in its main state after every thread stopped.
function M.done(summary, latency, _requests)
  local statuses_all, sent_all, last = {}, {}, 0
  for _, thread in ipairs(threads) do
    add_into(statuses_all, thread:get("statuses"))
    add_into(sent_all, thread:get("sent"))
    last = math.max(last, thread:get("last_created") or 0)
  end
  local seconds = summary.duration / 1e6
  local figures = {
    requests = summary.requests,
    seconds = seconds,
    rps = summary.requests / seconds,
    p50_ms = latency:percentile(50) / 1000,
    p90_ms = latency:percentile(90) / 1000,
    p99_ms = latency:percentile(99) / 1000,
    max_ms = latency.max / 1000,
    socket_errors = summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.timeout,
    statuses = statuses_all,
    sent = sent_all,
    last_created = last,
  }
  io.write("WRKJSON " .. encode(figures) .. "\n")
end

return M
