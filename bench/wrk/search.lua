-- POST one JSON body, read from the file named after wrk's "--", to the URL: bench.queries sends
-- the read store's own Elasticsearch query straight to _search with it (the reference beside the
-- API: what the API adds on top of the store).
-- wrk -t2 -c32 -d10s -s search.lua http://127.0.0.1:9200/INDEX/_search -- /tmp/body.json
function init(args)
  local file = assert(io.open(args[1], "rb"))
  wrk.method = "POST"
  wrk.body = file:read("*a")
  file:close()
  wrk.headers["Content-Type"] = "application/json"
end
