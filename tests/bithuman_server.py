"""A real HTTP server on 127.0.0.1 speaking bitHuman's documented REST protocol.

Two servers: the API (checks ``api-secret``, answers with bitHuman's error envelope) and a
separate "storage" host serving model files the way object storage does (Range, ETag, HEAD).
Faults are queued per request: ``api_faults`` holds (status, code, headers) answers to give
before the next real ones; ``storage_faults`` holds names from ``STORAGE_FAULTS``.

Run it standalone (``python tests/bithuman_server.py``) to point the CLI or curl at it.
"""

from __future__ import annotations

import hashlib
import json
import re
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

SECRET = "sk-test-0123456789abcdef"
STORAGE_FAULTS = (
    "truncate",  # half the body, then the connection closes
    "truncate_unannounced",  # the same with no Content-Length (a close-delimited body)
    "chunked",  # Transfer-Encoding: chunked, no Content-Length (as CDNs often answer)
    "chunked_truncate",  # chunked, half the body, then the connection closes without the last chunk
    "ignore_range",
    "401",
    "403",  # what object storage answers to a pre-signed link that has expired
    "416",
    "500",
    "503",
    "slow",
    "trickle",  # a few bytes at a time, slower than any sane download
    "mute",  # the connection is accepted, then nothing is said for slow_seconds
    "corrupt",
    "redirect:<url>",  # 302 to <url>
)


@dataclass
class Agent:
    code: str
    model: str = "essence-1"
    supported_models: list[str] = field(default_factory=lambda: ["essence-1"])
    files: dict[str, bytes] = field(default_factory=dict)  # family → model bytes
    status: str = "ready"
    name: str = "Test agent"
    download_error: tuple[int, str] | None = None
    send_sha256: bool = True
    gestures: dict[str, str] = field(default_factory=dict)


def model_bytes(seed: str, size: int) -> bytes:
    from fakes import fake_model_bytes

    return fake_model_bytes(seed.encode(), size)


class _TLSServer(ThreadingHTTPServer):
    """HTTPS: each connection's handshake on its own thread, as a real server's would be."""

    def __init__(self, address: tuple[str, int], handler: Any, context: ssl.SSLContext) -> None:
        super().__init__(address, handler)
        self.context = context
        self.handshakes_refused = 0

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            secured = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            self.handshakes_refused += 1  # the client did not trust our certificate
            return
        try:
            super().finish_request(secured, client_address)
        finally:
            secured.close()


class FakeBithumanService:
    """Owns both servers and the scripted state; start() / stop(), or use as a context manager.

    With ``tls`` (a server context), the servers named in ``tls_on`` speak HTTPS."""

    def __init__(
        self, tls: ssl.SSLContext | None = None, tls_on: tuple[str, ...] = ("api", "storage")
    ) -> None:
        self.agents: dict[str, Agent] = {}
        self.api_faults: list[tuple[int, str | None, dict[str, str]]] = []
        self.storage_faults: list[str] = []
        self.api_requests: list[tuple[str, str, dict[str, str]]] = []
        self.storage_requests: list[tuple[str, str, dict[str, str]]] = []
        self.generated: list[dict[str, Any]] = []
        self.idempotency_keys: list[str | None] = []
        self.status_script: dict[str, list[dict[str, Any]]] = {}
        self.slow_seconds = 0.5
        self.expires_in: int | None = 3600
        self.refuse_head = False  # like storage URLs pre-signed for GET only
        self.api_delay = 0.0  # seconds the API waits before answering
        self.huge_answer = 0  # bytes of padding in the next download-info answer
        self.lock = threading.Lock()
        self._api = self._server("api", tls if "api" in tls_on else None)
        self._storage = self._server("storage", tls if "storage" in tls_on else None)
        self._api.daemon_threads = self._storage.daemon_threads = True
        self._threads: list[threading.Thread] = []

    def _server(self, role: str, tls: ssl.SSLContext | None) -> ThreadingHTTPServer:
        if tls is None:
            return ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, role))
        return _TLSServer(("127.0.0.1", 0), _handler(self, role), tls)

    @staticmethod
    def _base(server: ThreadingHTTPServer) -> str:
        scheme = "https" if isinstance(server, _TLSServer) else "http"
        return f"{scheme}://127.0.0.1:{server.server_address[1]}"

    @property
    def api_base(self) -> str:
        return self._base(self._api)

    @property
    def storage_base(self) -> str:
        return self._base(self._storage)

    @property
    def handshakes_refused(self) -> int:
        """TLS handshakes a client broke off (it did not trust the certificate)."""
        return sum(getattr(s, "handshakes_refused", 0) for s in (self._api, self._storage))

    def add_agent(self, code: str, size: int = 64 * 1024, **kwargs: Any) -> Agent:
        agent = Agent(code, **kwargs)
        if not agent.files:
            for family in agent.supported_models:
                agent.files[family] = model_bytes(f"{code}:{family}", size)
        self.agents[code] = agent
        return agent

    def downloads(self) -> int:
        """Full-body GETs of model files (not probes)."""
        return sum(
            1
            for m, p, h in self.storage_requests
            if m == "GET" and h.get("range", "") != "bytes=0-0"
        )

    def start(self) -> FakeBithumanService:
        for server in (self._api, self._storage):
            thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in (self._api, self._storage):
            server.shutdown()
            server.server_close()

    def __enter__(self) -> FakeBithumanService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _handler(service: FakeBithumanService, role: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up reading (an oversized answer, a timeout): its choice

        def _error(
            self,
            status: int,
            code: str | None,
            message: str = "error",
            headers: dict[str, str] | None = None,
        ) -> None:
            error: dict[str, Any] = {"message": message, "httpStatus": status}
            if code:
                error["code"] = code
            self._send_json(
                status, {"error": error, "status": "error", "status_code": status}, headers
            )

        def _record(self) -> None:
            entry = (self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
            with service.lock:
                (service.api_requests if role == "api" else service.storage_requests).append(entry)

        def do_GET(self) -> None:
            self._record()
            if role == "api":
                self._api("GET")
            else:
                self._storage(head=False)

        def do_HEAD(self) -> None:
            self._record()
            self._storage(head=True)

        def do_POST(self) -> None:
            self._record()
            self._api("POST")

        # -- API ----------------------------------------------------------------------------

        def _api(self, method: str) -> None:
            with service.lock:
                fault = service.api_faults.pop(0) if service.api_faults else None
            length = int(self.headers.get("content-length") or 0)
            body = json.loads(self.rfile.read(length) or b"null") if length else None
            if service.api_delay:
                time.sleep(service.api_delay)
            if fault is not None:
                status, code, headers = fault
                self._error(status, code, "injected", headers)
                return
            if self.headers.get("api-secret") != SECRET:
                self._error(401, "UNAUTHORIZED", "invalid api secret")
                return
            url = urlparse(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            path = url.path
            if method == "POST" and path == "/v1/agent/generate":
                return self._generate(body)
            if method == "POST" and path == "/v1/dynamics/generate":
                return self._send_json(
                    200,
                    {
                        "success": True,
                        "status": "processing",
                        "agent_id": (body or {}).get("agent_id"),
                    },
                )
            if m := re.fullmatch(r"/v1/agent/([^/]+)/model/download", path):
                return self._download_info(m.group(1), query)
            if m := re.fullmatch(r"/v1/agent/status/([^/]+)", path):
                return self._status(m.group(1))
            if m := re.fullmatch(r"/v1/dynamics/([^/]+)", path):
                agent = service.agents.get(m.group(1))
                if agent is None:
                    return self._error(404, "NOT_FOUND", "agent not found")
                return self._send_json(
                    200,
                    {
                        "success": True,
                        "data": {
                            "agent_id": agent.code,
                            "status": "ready",
                            "url": None,
                            "gestures": agent.gestures,
                        },
                    },
                )
            if m := re.fullmatch(r"/v1/agent/([^/]+)", path):
                agent = service.agents.get(m.group(1))
                if agent is None:
                    return self._error(404, "NOT_FOUND", "agent not found")
                return self._send_json(200, {"success": True, "data": _agent_json(agent)})
            if path == "/v1/agents":
                return self._list(query)
            self._error(404, "NOT_FOUND", f"no route {path}")

        def _download_info(self, code: str, query: dict[str, str]) -> None:
            if query.get("redirect") != "false":
                self.send_response(302)
                self.send_header("location", f"{service.storage_base}/files/{code}.imx")
                self.send_header("content-length", "0")
                self.end_headers()
                return
            agent = service.agents.get(code)
            if agent is None:
                return self._error(404, "NOT_FOUND", "agent not found")
            if agent.download_error:
                status, err = agent.download_error
                return self._error(status, err, "scripted")
            family = query.get("model") or agent.model
            if family in ("expression", "expression-1", "essence-2-max"):
                return self._error(400, "MODEL_NOT_DOWNLOADABLE", f"{family} is cloud only")
            if family not in agent.files:
                return self._error(409, "MODEL_NOT_GENERATED", f"no {family} model")
            data = agent.files[family]
            filename = f"{code}.lebundle.imx" if family == "essence-2" else f"{code}.imx"
            payload = {
                "code": code,
                "model": family,
                "filename": filename,
                "url": f"{service.storage_base}/files/{code}/{family}?X-Signature=s3cr3tsig",
                "expires_in": service.expires_in,
            }
            if agent.send_sha256:
                payload["sha256"] = _digest(data, "sha256")
            if service.huge_answer:
                payload["padding"] = "x" * service.huge_answer
                service.huge_answer = 0
            self._send_json(200, {"success": True, "data": payload})

        def _generate(self, body: Any) -> None:
            with service.lock:
                key = self.headers.get("idempotency-key")
                service.idempotency_keys.append(key)
                for previous in service.generated:
                    if key and previous["key"] == key:
                        return self._send_json(200, previous["answer"])
                agent_id = f"A{len(service.generated):09d}"
                answer = {
                    "success": True,
                    "message": "started",
                    "agent_id": agent_id,
                    "status": "processing",
                }
                service.generated.append({"key": key, "body": body, "answer": answer})
            self._send_json(200, answer)

        def _status(self, agent_id: str) -> None:
            with service.lock:
                script = service.status_script.get(agent_id)
                if not script:
                    return self._error(404, "NOT_FOUND", "unknown agent")
                step = script.pop(0) if len(script) > 1 else script[0]
            self._send_json(200, {"success": True, "data": {"agent_id": agent_id, **step}})

        def _list(self, query: dict[str, str]) -> None:
            limit = int(query.get("limit", 20))
            offset = int(query.get("offset", 0))
            if not 1 <= limit <= 100:
                return self._error(400, "VALIDATION_ERROR", "limit must be 1..100")
            agents = [
                a
                for a in service.agents.values()
                if not query.get("status") or a.status == query["status"]
            ]
            page = agents[offset : offset + limit]
            self._send_json(
                200,
                {
                    "success": True,
                    "data": [_agent_json(a) for a in page],
                    "pagination": {
                        "limit": limit,
                        "offset": offset,
                        "total": len(agents),
                        "has_more": offset + limit < len(agents),
                    },
                },
            )

        # -- storage ------------------------------------------------------------------------

        def _storage(self, head: bool) -> None:
            m = re.fullmatch(r"/files/([^/]+)/([^/?]+)(\?.*)?", self.path)
            agent = service.agents.get(m.group(1)) if m else None
            data = agent.files.get(m.group(2)) if agent and m else None
            if data is None:
                self.send_response(404)
                self.send_header("content-length", "0")
                self.end_headers()
                return
            etag = '"' + _digest(data, "md5") + '"'
            with service.lock:
                fault = (
                    service.storage_faults.pop(0) if service.storage_faults and not head else None
                )
            if fault == "mute":
                time.sleep(service.slow_seconds)
                self.close_connection = True
                return
            if head and service.refuse_head:
                self.send_response(403)
                self.send_header("content-length", "0")
                self.end_headers()
                return
            if fault and fault.startswith("redirect:"):
                self.send_response(302)
                self.send_header("location", fault.split(":", 1)[1])
                self.send_header("content-length", "0")
                self.end_headers()
                return
            if fault in ("500", "503", "416", "401", "403"):
                self.send_response(int(fault))
                self.send_header("content-length", "0")
                self.end_headers()
                return
            if fault == "corrupt":
                data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
            start, status = 0, 200
            rng = self.headers.get("range")
            if rng and fault != "ignore_range":
                rm = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
                if rm:
                    start = int(rm.group(1))
                    end = int(rm.group(2)) if rm.group(2) else len(data) - 1
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("content-range", f"bytes */{len(data)}")
                        self.send_header("content-length", "0")
                        self.end_headers()
                        return
                    status = 206
                    body = data[start : end + 1]
            if status == 200:
                body = data
            self.send_response(status)
            if fault == "truncate_unannounced":
                self.send_header("connection", "close")
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            if fault in ("chunked", "chunked_truncate"):
                self.send_header("transfer-encoding", "chunked")
                self.send_header("etag", etag)
                self.end_headers()
                sent = body if fault == "chunked" else body[: len(body) // 2]
                for i in range(0, len(sent), 48 * 1024):
                    piece = sent[i : i + 48 * 1024]
                    self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                if fault == "chunked":
                    self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
                self.close_connection = fault != "chunked"
                return
            self.send_header("content-length", str(len(body)))
            self.send_header("etag", etag)
            self.send_header("accept-ranges", "bytes")
            if status == 206:
                self.send_header(
                    "content-range", f"bytes {start}-{start + len(body) - 1}/{len(data)}"
                )
            self.end_headers()
            if head:
                return
            if fault == "truncate":
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            if fault == "trickle":
                for i in range(0, min(len(body), 400), 10):
                    try:
                        self.wfile.write(body[i : i + 10])
                        self.wfile.flush()
                    except (BrokenPipeError, ConnectionResetError):
                        return
                    time.sleep(0.1)
                self.close_connection = True
                return
            step = 64 * 1024
            for i in range(0, len(body), step):
                if fault == "slow":
                    time.sleep(service.slow_seconds / max(1, len(body) // step))
                try:
                    self.wfile.write(body[i : i + step])
                except (BrokenPipeError, ConnectionResetError):
                    return

    return Handler


_DIGESTS: dict[tuple[int, str], tuple[bytes, str]] = {}


def _digest(data: bytes, algorithm: str) -> str:
    """Hashes of served files, computed once per file (model files can be hundreds of MB).

    The entry keeps the bytes alive, so their id cannot be reused by another object.
    """
    key = (id(data), algorithm)
    entry = _DIGESTS.get(key)
    if entry is None or entry[0] is not data:
        entry = _DIGESTS[key] = (data, hashlib.new(algorithm, data).hexdigest())
    return entry[1]


def _agent_json(agent: Agent) -> dict[str, Any]:
    return {
        "code": agent.code,
        "agent_id": agent.code,
        "name": agent.name,
        "model": agent.model,
        "supported_models": agent.supported_models,
        "status": agent.status,
        "model_url": None,
        "image_url": None,
        "video_url": None,
        "dynamics": bool(agent.gestures),
    }


if __name__ == "__main__":  # pragma: no cover - manual use
    import sys

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    with FakeBithumanService() as svc:
        svc.add_agent("A91XMB7113", size=int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 20)
        print(f"BITHUMAN_API_BASE={svc.api_base} BITHUMAN_API_SECRET={SECRET}", flush=True)
        threading.Event().wait()
