"""The gRPC door of the OIP front: OIP's ``inference.GRPCInferenceService`` on grpc.aio.

    ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer

The service is registered by hand under OIP's name with the messages of daemon/oip/oip.proto
(field for field OIP's own), so tritonclient[grpc] and stubs generated from KServe's or Triton's
.proto talk to it unmodified. ModelInfer takes its input from ``raw_input_contents`` (what
tritonclient sends) or from the typed ``contents``, and answers in ``raw_output_contents`` (what
Triton does). Its deadline is the call's gRPC deadline, else the ``timeout`` parameter
(microseconds), else ``oip.request_timeout_ms``. Errors are status codes with the message as
details (daemon/oip/errors.py); an overloaded answer carries ``retry-after-ms`` in the trailers.
Every caller is named by its bearer token (``authorization`` metadata): grpcio does not tell a
server its Unix peer's uid, so a Unix-socket caller without a token is the tenant "anonymous".
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time

import grpc
import numpy as np

from ..errors import ConfigError
from ..front.listener import ListenerError, check_path_length, remove_if_stale
from . import oip_pb2 as pb
from . import tensors
from .errors import OipError
from .http_front import EXTENSIONS, SERVER_NAME

log = logging.getLogger("inferd.oip.grpc")
SERVICE = "inference.GRPCInferenceService"


class GrpcDoor:
    def __init__(self, backend, auth, address, oip, *, version: str):
        self.backend = backend
        self.auth = auth
        self.address = address
        self.oip = oip
        self.version = version
        self.timings = None                     # a Timings (daemon/oip/timings.py) when measured
        self._server: grpc.aio.Server | None = None
        self._inode: int | None = None

    async def start(self) -> None:
        limit = self.oip.max_request_bytes
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                          ("grpc.max_send_message_length", limit),
                                          ("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, self._handlers()),))
        a = self.address
        if a.unix:
            check_path_length(a.path, "oip.grpc")
            _remove_stale(a.path)
            server.add_insecure_port(f"unix:{a.path}")
        else:
            target = f"[{a.host}]:{a.port}" if ":" in a.host else f"{a.host}:{a.port}"
            if self.oip.tls_cert:
                with open(self.oip.tls_key, "rb") as k, open(self.oip.tls_cert, "rb") as c:
                    credentials = grpc.ssl_server_credentials([(k.read(), c.read())])
                port = server.add_secure_port(target, credentials)
            else:
                port = server.add_insecure_port(target)
            self.address = dataclasses.replace(a, port=port)      # port 0: the one chosen
        await server.start()
        if a.unix:
            os.chmod(a.path, self.oip.socket_mode)
            self._inode = os.stat(a.path).st_ino
        self._server = server

    async def stop(self, grace: float) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._inode is not None:
            try:
                if os.stat(self.address.path).st_ino == self._inode:
                    os.unlink(self.address.path)
            except FileNotFoundError:
                pass
            self._inode = None

    def _handlers(self) -> dict:
        def unary(fn, request, response):
            return grpc.unary_unary_rpc_method_handler(_guard(fn), request_deserializer=request.FromString,
                                                       response_serializer=response.SerializeToString)
        return {
            "ServerLive": unary(self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": unary(self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": unary(self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": unary(self.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
            "ModelMetadata": unary(self.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
            # the reply is encoded by hand (``response``): no message object built and serialized per call
            "ModelInfer": grpc.unary_unary_rpc_method_handler(_guard(self.model_infer),
                                                              request_deserializer=pb.ModelInferRequest.FromString),
        }

    # health and metadata ----------------------------------------------------------------------
    async def server_live(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request, context):
        ok, _ = await self.backend.ready()
        return pb.ServerReadyResponse(ready=ok)

    async def _model(self, name: str, version: str):
        """The model the request names (daemon/oip/backend.py Target), or OipError not_found."""
        return await self.backend.target(name, version)

    async def model_ready(self, request, context):
        await self._model(request.name, request.version)
        ok, _ = await self.backend.ready()
        return pb.ModelReadyResponse(ready=ok)

    async def server_metadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=EXTENSIONS)

    async def model_metadata(self, request, context):
        t = await self._model(request.name, request.version)
        md = tensors.metadata(t.name, t.classes, self.backend.versions(t.name))
        t = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=md["name"], versions=md["versions"], platform=md["platform"],
            inputs=[t(name=i["name"], datatype=i["datatype"], shape=i["shape"]) for i in md["inputs"]],
            outputs=[t(name=o["name"], datatype=o["datatype"], shape=o["shape"]) for o in md["outputs"]])

    # inference --------------------------------------------------------------------------------
    async def model_infer(self, request, context):
        began = time.perf_counter()
        metadata = dict(context.invocation_metadata() or ())
        principal = self.auth.bearer(metadata.get("authorization"), network=not self.address.unix)
        target = await self._model(request.model_name, request.model_version)
        parsed = parse_request(request, self.oip.max_batch)
        left = context.time_remaining()
        if left is not None and (parsed.timeout_s is None or left < parsed.timeout_s):
            if left <= 0:
                raise OipError("deadline", "the call's deadline passed before it was read")
            parsed.timeout_s = left
        backend = self.backend
        classes = target.classes
        asked = time.perf_counter()
        results = await backend.classify(principal, parsed.images, parsed.top_k(classes), parsed.timeout_s,
                                         parsed.logits(), target)
        waited = time.perf_counter() - asked
        labels = await backend.labels_of(target)
        reply = response(target.name, parsed, tensors.outputs(parsed, results, classes, labels), target.version)
        if self.timings is not None:
            self.timings.add(began, waited)
        return reply


def _guard(fn):
    """An OipError becomes its status; any other exception is logged and INTERNAL, never the door."""
    async def handler(request, context):
        try:
            return await fn(request, context)
        except OipError as exc:
            trailers = exc.grpc_trailers()
            if trailers:
                context.set_trailing_metadata(trailers)
            await context.abort(exc.grpc_code, exc.message)
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("gRPC %s failed", getattr(fn, "__name__", "call"))
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in the OIP front; its log says more")
    return handler


def _param(params, key: str):
    if key not in params:
        return None
    p = params[key]
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def parse_request(request, max_batch: int) -> tensors.Inference:
    if len(request.inputs) != 1:
        raise OipError("invalid", f"a request carries exactly one input: {tensors.IMAGE} (UINT8 [N, H, W, 3]) "
                       f"or {tensors.IMAGE_BYTES} (BYTES [N] of encoded images)")
    tensor = request.inputs[0]
    shape = list(tensor.shape)
    n = tensors.check_input(tensor.name, tensor.datatype, shape, max_batch)
    raw = request.raw_input_contents
    if len(raw) > 1:
        raise OipError("invalid", f"{len(raw)} raw_input_contents for one input")
    if tensor.datatype == "UINT8":
        if raw:
            images = tensors.uint8_images(tensor.name, shape, raw[0])
        else:
            images = tensors.uint8_images(tensor.name, shape, np.asarray(tensor.contents.uint_contents, np.int64))
    else:
        data = raw[0] if raw else list(tensor.contents.bytes_contents)
        images = tensors.bytes_elements(tensor.name, n, data)
    wanted = [tensors.wanted(o.name, _param(o.parameters, "classification"), False) for o in request.outputs]
    return tensors.Inference(images, wanted, tensors.timeout_s(_param(request.parameters, "timeout")), request.id)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field (string, bytes, a message, a packed repeated)."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


#: ModelInferResponse's outputs entry (InferOutputTensor: name, datatype, shape) for each shape of
#: answer, encoded once
_ENTRIES: dict = {}
_MAX_ENTRIES = 256
_VERSION_1 = _field(2, b"1")


def response(name: str, request: tensors.Inference, outputs: list, version: str = "1") -> bytes:
    """The ModelInferResponse, encoded: model_name, model_version, id, an outputs entry and a
    raw_output_contents for each output (what ``pb.ModelInferResponse(...).SerializeToString()``
    gives, field for field, without building the message)."""
    parts = [_field(1, name.encode()), _VERSION_1 if version == "1" else _field(2, version.encode())]
    if request.id:
        parts.append(_field(3, request.id.encode()))
    raw = []
    for w, datatype, array in outputs:
        key = (w.name, datatype, array.shape)
        entry = _ENTRIES.get(key)
        if entry is None:
            shape = b"".join(_varint(d) for d in array.shape)
            entry = _field(5, _field(1, w.name.encode()) + _field(2, datatype.encode()) + _field(3, shape))
            if len(_ENTRIES) < _MAX_ENTRIES:
                _ENTRIES[key] = entry
        parts.append(entry)
        blob = tensors.bytes_binary(array) if datatype == "BYTES" else array.astype("<f4").tobytes()
        raw += (b"\x32", _varint(len(blob)), blob)          # field 6, length-delimited
    return b"".join(parts + raw)


def _remove_stale(path: str) -> None:
    """A socket file nobody listens on (a killed predecessor's) goes; a live one, or anything
    that is not a socket, is a ConfigError (the front exits 78 saying so)."""
    try:
        remove_if_stale(path, who="front")
    except ListenerError as exc:
        raise ConfigError(f"oip.grpc: {exc}") from None
