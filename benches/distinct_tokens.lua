-- wrk script for benches/cache_miss.sh: a distinct bearer token on every request, read from the file named by
-- $TOKENS (one per line). If the run outlasts the file the tokens wrap around, and done() reports how many
-- tokens there were, so the caller can tell a pure cache-miss run from one that also hit the cache.
local tokens, n, i = {}, 0, 0
for line in io.lines(os.getenv("TOKENS")) do
  n = n + 1
  tokens[n] = "Bearer " .. line
end

request = function()
  i = i % n + 1
  return wrk.format("GET", "/users/me", { ["Authorization"] = tokens[i] })
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('JSON:{"requests":%d,"non2xx":%d,"sockerr":%d,"p50_us":%d,"p99_us":%d,"tokens":%d}\n',
    summary.requests, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), n))
end
