-- wrk script of `FEATURES=1 bash bench/gateway.sh`: every request is a POST of a
-- small JSON body (valid against bench/nginx/gateway-hello.schema.json) with a
-- bearer token, so the gateway's route checks the token, counts the caller against
-- its rate limit and validates the body before forwarding. nginx gets the same
-- requests and forwards them plainly.
--
-- The token comes from the environment (GATEWAY_BENCH_TOKEN); bench/gateway.sh
-- makes it (EdDSA, signed with a key in the JWKS file it hands the gateway).

local token = os.getenv("GATEWAY_BENCH_TOKEN")
if token == nil or token == "" then
  error("GATEWAY_BENCH_TOKEN is not set: run this through bench/gateway.sh")
end

wrk.method = "POST"
wrk.path = "/hello"
wrk.body = '{"sku":"p-1001","quantity":3,"note":"benchmark order","tags":["a","b"]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. token
