#!/usr/bin/env python3
"""The shop's recommendations: products often bought with a given one.

A service in another language, with nothing but Python's standard library, run
behind `shoal sidecar` (docs/sidecar.md). It knows nothing of shoal: it listens on
127.0.0.1:$PORT, answers /health, and calls the catalog through its sidecar at
$SHOAL_SIDECAR_URL/catalog/... The one thing it does for the platform is copy the
trace and deadline headers of the request it serves onto the calls it makes, so its
calls are part of the caller's trace and stop when the caller gives up.
"""

import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(os.environ.get("PORT", "8000"))
SIDECAR = os.environ.get("SHOAL_SIDECAR_URL", "http://127.0.0.1:8001").rstrip("/")
# Headers copied from the request being served onto the calls it makes.
PASSED_ON = ("traceparent", "x-request-id", "x-shoal-deadline-ms")
# How many products a recommendation holds, and the longest wait for the catalog
# (the sidecar's resilience policy retries within it).
HOW_MANY = 3
CALL_TIMEOUT_S = 5
# The largest catalog answer read.
MAX_ANSWER_BYTES = 1024 * 1024


class Failed(Exception):
    def __init__(self, status, code, message):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def catalog(path, incoming):
    """GET the catalog's `path` through the sidecar, passing the trace on."""
    req = urllib.request.Request(SIDECAR + "/catalog" + path)
    for name in PASSED_ON:
        value = incoming.get(name)
        if value:
            req.add_header(name, value)
    try:
        with urllib.request.urlopen(req, timeout=CALL_TIMEOUT_S) as res:
            return json.loads(res.read(MAX_ANSWER_BYTES))
    except urllib.error.HTTPError as e:
        # The sidecar's own errors (circuit_open, upstream_timeout, ...) and the
        # catalog's, in the platform's shape: passed on with their code.
        try:
            code = json.loads(e.read(MAX_ANSWER_BYTES))["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = "catalog_error"
        status = 503 if e.code >= 500 else 502
        raise Failed(status, code, "the catalog answered %d" % e.code)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise Failed(503, "catalog_unavailable", "the catalog could not be reached: %s" % e)


def recommend(product_id, incoming):
    products = catalog("/api/products", incoming)
    ids = [p["id"] for p in products]
    if product_id not in ids:
        raise Failed(404, "not_found", "no product %s" % product_id)
    # "Often bought with": the products that follow it in the catalog, wrapping round
    # (a stand-in for a model trained on orders).
    i = ids.index(product_id)
    others = [products[(i + k) % len(products)] for k in range(1, len(products))]
    return {"product_id": product_id, "often_bought_with": others[:HOW_MANY]}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/health":
            return self.answer(200, {"status": "ok"})
        if url.path != "/api/recommendations":
            return self.answer(404, {"error": {"code": "not_found", "message": "no route %s" % url.path}})
        product = urllib.parse.parse_qs(url.query).get("product_id", [""])[0]
        if not product:
            return self.answer(400, {"error": {"code": "bad_request", "message": "missing query parameter product_id"}})
        try:
            self.answer(200, recommend(product, self.headers))
        except Failed as e:
            self.answer(e.status, {"error": {"code": e.code, "message": e.message}})

    def log_message(self, fmt, *args):
        # One line per request on stderr, which `shoal up` keeps in the app's log.
        sys.stderr.write("recommendations: %s\n" % (fmt % args))


def main():
    server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
    server.daemon_threads = True
    sys.stderr.write("recommendations: listening on 127.0.0.1:%d, sidecar %s\n" % (PORT, SIDECAR))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
