#!/usr/bin/env python3
"""A tiny webhook receiver that verifies Standard Webhooks signatures (standard library only).

    receiver.py --port N (--secret whsec_... | --secret-file PATH) [--count K]
    receiver.py --self-test

Listens on 127.0.0.1 only. For every POST it prints the method, path, the three webhook-*
headers, the user-agent, the JSON body (pretty-printed) and "signature: VALID" or
"signature: INVALID", then answers 200 "ok" (valid) or 401 (invalid). The signature is
HMAC-SHA256 over "{webhook-id}.{webhook-timestamp}.{body}", keyed with the base64-decoded
part of the secret after "whsec_"; timestamps more than 5 minutes off are refused.
With --count K it exits (status 0) after K valid requests. Once it is listening it prints
"listening on http://127.0.0.1:PORT" (--port 0 picks a free port).
"""

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

TOLERANCE_SECONDS = 5 * 60
SECRET_PREFIX = "whsec_"


def decode_secret(secret):
    """The HMAC key of a `whsec_<base64>` secret (a bare base64 key is accepted too)."""
    b64 = secret.strip()
    if b64.startswith(SECRET_PREFIX):
        b64 = b64[len(SECRET_PREFIX):]
    return base64.b64decode(b64, validate=True)


def sign(key, msg_id, timestamp, body):
    """One `v1,<base64>` signature over `msg_id.timestamp.body` (body is bytes)."""
    content = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()


def verify(key, msg_id, timestamp, body, signature_header, now=None):
    """(ok, reason). Any one matching `v1,` signature in the space-separated header will do."""
    if not msg_id or not timestamp or not signature_header:
        return False, "missing webhook-id, webhook-timestamp or webhook-signature header"
    try:
        ts = int(timestamp)
    except ValueError:
        return False, f"webhook-timestamp is not an integer: {timestamp!r}"
    if now is not None and abs(now - ts) > TOLERANCE_SECONDS:
        return False, f"timestamp is {now - ts:+d} s off (more than {TOLERANCE_SECONDS} s)"
    expected = sign(key, msg_id, timestamp, body).encode()
    for candidate in signature_header.split():
        if candidate.startswith("v1,") and hmac.compare_digest(candidate.encode(), expected):
            return True, "matches"
    return False, "no v1 signature matches"


def self_test():
    """Checks the test vector published by Standard Webhooks; exit status 0 when it matches."""
    key = decode_secret("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD")
    msg_id, ts = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk", "1649367553"
    body = b'{"email":"test@example.com","username":"test_user"}'
    want = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
    got = sign(key, msg_id, ts, body)
    checks = [
        ("signature matches the test vector", got == want),
        ("verify accepts it among other signatures", verify(key, msg_id, ts, body, f"v1,bm9wZQ== {want}")[0]),
        ("verify rejects a changed body", not verify(key, msg_id, ts, body + b" ", want)[0]),
        ("verify rejects an old timestamp", not verify(key, msg_id, ts, body, want, now=int(ts) + 301)[0]),
    ]
    for name, ok in checks:
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    if got != want:
        print(f"     got  {got}\n     want {want}")
    return 0 if all(ok for _, ok in checks) else 1


class Handler(BaseHTTPRequestHandler):
    server_version = "webhook-demo-receiver"
    key = b""
    valid_seen = 0

    def do_POST(self):
        body = self._read_body()
        h = self.headers
        ok, reason = verify(self.key, h.get("webhook-id"), h.get("webhook-timestamp"),
                            body, h.get("webhook-signature"), now=int(time.time()))
        try:
            shown = json.dumps(json.loads(body), indent=2, ensure_ascii=False)
        except ValueError:
            shown = body.decode("utf-8", "replace")
        print(f"--- {self.command} {self.path}")
        for name in ("webhook-id", "webhook-timestamp", "webhook-signature", "user-agent"):
            print(f"{name}: {h.get(name, '(missing)')}")
        print(shown)
        print("signature: VALID" if ok else f"signature: INVALID ({reason})", flush=True)
        if ok:
            Handler.valid_seen += 1
            self._answer(200, b"ok")
        else:
            self._answer(401, b"invalid signature")

    def do_GET(self):
        self._answer(405, b"POST only")

    do_PUT = do_DELETE = do_PATCH = do_GET

    def _read_body(self):
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def _answer(self, code, body):
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass  # the request is printed by do_POST


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, help="port on 127.0.0.1 (0 picks a free one)")
    p.add_argument("--secret", help="the endpoint secret, whsec_...")
    p.add_argument("--secret-file", help="read the secret from this file instead")
    p.add_argument("--count", type=int, help="exit after this many valid requests")
    p.add_argument("--self-test", action="store_true", help="check the Standard Webhooks test vector and exit")
    args = p.parse_args()
    if args.self_test:
        return self_test()
    if args.port is None or (args.secret is None) == (args.secret_file is None):
        p.error("--port and exactly one of --secret / --secret-file are required")

    secret = args.secret
    if args.secret_file:
        with open(args.secret_file, encoding="utf-8") as f:
            secret = f.read()
    try:
        Handler.key = decode_secret(secret)
    except (binascii.Error, ValueError):
        p.error("the secret is not whsec_ followed by base64")

    server = HTTPServer(("127.0.0.1", args.port), Handler)
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        while args.count is None or Handler.valid_seen < args.count:
            server.handle_request()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
