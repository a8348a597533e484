"""The HTTP/REST door of the OIP front (KServe v2 as Triton serves it), on the front's own
HTTP/1.1 server (daemon/oip/http_server.py, on httptools; one handler routing by the path's parts).

    GET  /v2/health/live                              200 while the front runs
    GET  /v2/health/ready                             200 when an inference can be served, else 503
    GET  /v2                                          server metadata (name, version, extensions)
    GET  /v2/models/{model}[/versions/{v}]            model metadata (daemon/oip/tensors.py)
    GET  /v2/models/{model}[/versions/{v}]/ready      200 when ready, else 503 (404: unknown model)
    POST /v2/models/{model}[/versions/{v}]/infer      inference: JSON, or the binary tensor data
    POST /v2/repository/index                         the models served (Triton's repository extension)
                                                      extension (Inference-Header-Content-Length:
                                                      the JSON's length; tensors' bytes follow it)

An inference request::

    {"id": "42", "parameters": {"timeout": 2000000, "binary_data_output": true},
     "inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [1, 64, 64, 3],
                 "parameters": {"binary_data_size": 12288}}],
     "outputs": [{"name": "SCORES", "parameters": {"classification": 3, "binary_data": false}}]}

``timeout`` is in microseconds (Triton's parameter); without it, ``oip.request_timeout_ms``.
Errors are ``{"error": "..."}`` with the status daemon/oip/errors.py lists.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

from ..front.listener import peer_credentials, peer_groups
from . import tensors
from .errors import OipError
from .http_server import HttpServer, Request, Response

log = logging.getLogger("inferd.oip.http")
SERVER_NAME = "inferd"
EXTENSIONS = ["classification", "binary_tensor_data", "model_configuration"]
_HEADER_LENGTH = "Inference-Header-Content-Length"
_HEADER_LENGTH_KEY = _HEADER_LENGTH.lower()
#: JSON bodies larger than this are parsed off the loop (a 12 KB frame as a JSON list is ~50 KB)
OFFLOAD_JSON_BYTES = 256 * 1024


def _json(body, status: int = 200, headers: dict | None = None) -> Response:
    return Response(status, json.dumps(body, separators=(",", ":")).encode(), "application/json", headers)


def error_response(exc: OipError) -> Response:
    return _json({"error": exc.message}, exc.http_status, exc.http_headers())


class HttpDoor:
    """The routes above for one backend (daemon/oip/backend.py). ``network``: a TCP door, whose
    callers are tenants; otherwise a Unix socket, whose callers are the peers' uids.

    It runs on the front's own HTTP/1.1 server (daemon/oip/http_server.py): one handler that
    routes by splitting the path; an inference pays for httptools' parsing, its own JSON and the
    client library's ring, little else."""

    def __init__(self, backend, auth, *, network: bool, max_batch: int, version: str):
        self.backend = backend
        self.auth = auth
        self.network = network
        self.max_batch = max_batch
        self.version = version
        self._gets = {"": self.model_metadata, "ready": self.model_ready, "config": self.model_config}

    def server(self, max_request_bytes: int, idle_timeout_s: float) -> HttpServer:
        """The door as an HTTP server: bodies over ``max_request_bytes`` are answered 413, a
        keep-alive connection idle for ``idle_timeout_s`` is closed."""
        return HttpServer(self.handle, max_body=max_request_bytes, idle_timeout_s=idle_timeout_s)

    def route(self, method: str, path: str):
        """(the handler, the model and version the path names); the handler is None for a path
        no route has (404), or the methods the path takes when ``method`` is not one (405)."""
        parts = path.split("/")
        if len(parts) < 3 or parts[0] or parts[1] != "v2":
            return None, "", ""
        model = version = ""
        if parts[2] == "health" and len(parts) == 4 and parts[3] in ("live", "ready"):
            handler, post = (self.live if parts[3] == "live" else self.ready), False
        elif parts[2] == "repository" and len(parts) == 4 and parts[3] == "index":
            handler, post = self.repository_index, True
        elif parts[2] == "models" and len(parts) >= 4 and parts[3]:
            model, rest = parts[3], parts[4:]
            if rest[:1] == ["versions"]:
                if len(rest) < 2 or not rest[1]:
                    return None, "", ""
                version, rest = rest[1], rest[2:]
            if len(rest) > 1:
                return None, "", ""
            what = rest[0] if rest else ""
            if what == "infer":
                handler, post = self.infer, True
            elif what in self._gets:
                handler, post = self._gets[what], False
            else:
                return None, "", ""
        else:
            return None, "", ""
        if (method == "POST") != post or (not post and method not in ("GET", "HEAD")):
            return "POST" if post else "GET, HEAD", model, version
        return handler, model, version

    async def handle(self, request: Request) -> Response:
        """Every request: routed, then its errors as OIP error bodies (a bug answers this request
        500, never the door). ``Expect: 100-continue`` was answered by the server."""
        try:
            path = request.path
            if path == "/v2":
                handler, model, version = (self.server_metadata if request.method in ("GET", "HEAD")
                                           else "GET, HEAD"), "", ""
            else:
                handler, model, version = self.route(request.method, path)
            if handler is None:
                return _json({"error": "Not Found"}, 404)
            if isinstance(handler, str):
                return _json({"error": "Method Not Allowed"}, 405, {"Allow": handler})
            return await handler(request, model, version)
        except OipError as exc:
            return error_response(exc)
        except Exception:                   # a bug: this request only, never the front
            log.exception("%s %s failed", request.method, request.path)
            return _json({"error": "internal error in the OIP front; its log says more"}, 500)

    # health and metadata ----------------------------------------------------------------------
    async def live(self, request, model, version):
        return Response(200)

    async def ready(self, request, model="", version=""):
        ok, why = await self.backend.ready()
        return Response(200) if ok else _json({"error": why}, 503)

    async def server_metadata(self, request, model, version):
        return _json({"name": SERVER_NAME, "version": self.version, "extensions": EXTENSIONS})

    async def _model(self, name: str, version: str):
        """The model the path names (daemon/oip/backend.py Target), or OipError not_found."""
        return await self.backend.target(name, version)

    async def model_metadata(self, request, model, version):
        t = await self._model(model, version)
        return _json(tensors.metadata(t.name, t.classes, self.backend.versions(t.name)))

    async def model_ready(self, request, model, version):
        await self._model(model, version)
        return await self.ready(request)

    async def model_config(self, request, model, version):
        t = await self._model(model, version)
        return _json({"name": t.name, "platform": "inferd", "max_batch_size": 0,
                      "input": [{"name": tensors.IMAGE, "data_type": "TYPE_UINT8", "dims": [-1, -1, -1, 3]},
                                {"name": tensors.IMAGE_BYTES, "data_type": "TYPE_STRING", "dims": [-1]}],
                      "output": [{"name": name, "data_type": "TYPE_FP32", "dims": [-1, t.classes]}
                                 for name in tensors.OUTPUTS]})

    async def repository_index(self, request, model, version):
        """Triton's model repository index: every model served, its version and state (READY, or
        UNAVAILABLE while the daemon is not ready, with the reason); ``{"ready": true}`` lists
        only the ready ones. Loading and unloading are the admin socket's (inferctl), not OIP's."""
        body = request.body
        try:
            only_ready = bool(body) and json.loads(body).get("ready") is True
        except (ValueError, AttributeError):
            raise OipError("invalid", "the repository index request's body must be a JSON object") from None
        ok, why = await self.backend.ready()
        if only_ready and not ok:
            return _json([])
        state = {"state": "READY", "reason": ""} if ok else {"state": "UNAVAILABLE", "reason": why}
        return _json([{"name": name, "version": v, **state} for name, v in await self.backend.index()])

    # inference --------------------------------------------------------------------------------
    def _principal(self, request: Request):
        if self.network:
            return self.auth.bearer(request.headers.get("authorization"), network=True)
        connection = request.connection
        if connection.memo is None:             # the peer's credentials, read once per connection
            sock = connection.transport.get_extra_info("socket") if connection.transport else None
            if sock is None or sock.family != socket.AF_UNIX:
                raise OipError("unavailable", "the connection closed")
            _, uid, gid = peer_credentials(sock)
            connection.memo = self.auth.unix_peer(uid, gid, peer_groups(sock))
        return connection.memo

    async def infer(self, request, model, version):
        principal = self._principal(request)
        target = await self._model(model, version)
        body = request.body
        length = request.headers.get(_HEADER_LENGTH_KEY)
        json_bytes = int(length) if length and length.isdigit() else len(body)
        if min(json_bytes, len(body)) > OFFLOAD_JSON_BYTES:
            # a large JSON body: parsed in a worker thread, not on the loop every caller shares
            parsed, binary_out = await asyncio.get_running_loop().run_in_executor(
                None, lambda: parse_request(*split_body(body, length), self.max_batch))
        else:
            parsed, binary_out = parse_request(*split_body(body, length), self.max_batch)
        backend = self.backend
        classes = target.classes
        asked = time.perf_counter()
        results = await backend.classify(principal, parsed.images, parsed.top_k(classes), parsed.timeout_s,
                                         parsed.logits(), target)
        request.waited = time.perf_counter() - asked
        labels = await backend.labels_of(target)
        return response(target.name, parsed, tensors.outputs(parsed, results, classes, labels), binary_out,
                        target.version)


def split_body(body: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    """(the JSON header, the binary data after it)."""
    if header_length is None:
        length = len(body)
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise OipError("invalid", f"{_HEADER_LENGTH} {header_length!r} must be the length of the JSON "
                           f"part, at most the body's {len(body)} bytes")
        length = int(header_length)
    try:
        header = json.loads(memoryview(body)[:length].tobytes() if length != len(body) else body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise OipError("invalid", f"the request's JSON is not valid: {exc}") from None
    if not isinstance(header, dict):
        raise OipError("invalid", "the request's JSON must be an object")
    return header, memoryview(body)[length:]


def _params(obj: dict, what: str) -> dict:
    p = obj.get("parameters") or {}
    if not isinstance(p, dict):
        raise OipError("invalid", f"{what}: parameters must be an object")
    return p


def parse_request(header: dict, binary: memoryview, max_batch: int) -> tuple[tensors.Inference, bool]:
    """The parsed inference and whether outputs default to binary data."""
    params = _params(header, "request")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise OipError("invalid", f"a request carries exactly one input: {tensors.IMAGE} (UINT8 [N, H, W, 3]) "
                       f"or {tensors.IMAGE_BYTES} (BYTES [N] of encoded images)")
    tensor = inputs[0]
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str) or not isinstance(shape, list):
        raise OipError("invalid", "an input needs a name, a datatype and a shape")
    n = tensors.check_input(name, datatype, shape, max_batch)
    size = _params(tensor, f"input {name!r}").get("binary_data_size")
    if size is not None:
        if type(size) is not int or not 0 <= size <= len(binary):
            raise OipError("invalid", f"input {name!r}: binary_data_size {size!r}, but {len(binary)} bytes of "
                           "binary data follow the JSON")
        data = binary[:size]
    else:
        data = tensor.get("data")
        if data is None:
            raise OipError("invalid", f"input {name!r}: no data and no binary_data_size")
    if datatype == "UINT8":
        images = tensors.uint8_images(name, shape, data)
    else:
        images = tensors.bytes_elements(name, n, data.tobytes() if isinstance(data, memoryview) else data)
    binary_out = params.get("binary_data_output") is True
    wanted = []
    outputs = header.get("outputs") or []
    if not isinstance(outputs, list):
        raise OipError("invalid", "outputs must be a list")
    for out in outputs:
        if not isinstance(out, dict):
            raise OipError("invalid", "each output must be an object")
        p = _params(out, f"output {out.get('name')!r}")
        wanted.append(tensors.wanted(out.get("name"), p.get("classification"), p.get("binary_data", binary_out)))
    if not wanted:
        wanted = [tensors.Wanted(binary=binary_out)]
    request_id = header.get("id", "")
    return tensors.Inference(images, wanted, tensors.timeout_s(params.get("timeout")),
                             request_id if isinstance(request_id, str) else ""), binary_out


#: a binary reply's JSON header (without its id) for each shape of answer: built once, not per request
_HEADS: dict = {}
_MAX_HEADS = 256


def response(name: str, request: tensors.Inference, outputs: list, binary_out: bool,
             version: str = "1") -> Response:
    blobs, described, key = [], [], [name, version]
    for w, datatype, array in outputs:
        if w.binary:
            blob = tensors.bytes_binary(array) if datatype == "BYTES" else array.astype("<f4").tobytes()
            blobs.append(blob)
            if key is not None:
                key.append((w.name, datatype, array.shape, len(blob)))
            described.append({"name": w.name, "datatype": datatype, "shape": list(array.shape),
                              "parameters": {"binary_data_size": len(blob)}})
            continue
        key = None
        entry = {"name": w.name, "datatype": datatype, "shape": list(array.shape)}
        if datatype == "BYTES":
            entry["data"] = [e.decode() for e in array.reshape(-1)]
        else:
            entry["data"] = array.reshape(-1).tolist()
        described.append(entry)
    key = tuple(key) if key is not None else None
    head = _HEADS.get(key) if key is not None else None
    if head is None:
        head = json.dumps({"model_name": name, "model_version": version, "outputs": described},
                          separators=(",", ":")).encode()
        if key is not None and len(_HEADS) < _MAX_HEADS:
            _HEADS[key] = head
    if request.id:
        head = b'{"id":' + json.dumps(request.id).encode() + b"," + head[1:]
    if not blobs:
        return Response(200, head, "application/json")
    return Response(200, b"".join([head, *blobs]), "application/octet-stream", {_HEADER_LENGTH: str(len(head))})
