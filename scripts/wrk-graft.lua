-- A graft to one of 1,000 runs per request (WRK_RUNS=N: one of N runs).
math.randomseed(os.time())
local count = tonumber(os.getenv("WRK_RUNS") or "1000")
local runs = {}
for i = 1, count do
  runs[i] = string.format("%08x-0000-4000-8000-%012x", i, i)
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"agent":"Agent","afterStep":"Step1","user":"bench"}'
request = function()
  local run = runs[math.random(1, count)]
  return wrk.format(nil, "/api/crdt/runs/" .. run .. "/grafts")
end
