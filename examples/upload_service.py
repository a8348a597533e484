"""An image upload endpoint: classify each uploaded file and flag near-duplicates of earlier uploads.

    python examples/upload_service.py --socket /run/inferd/inferd.sock --port 8080
    curl --data-binary @cat.jpg -H 'Content-Type: image/jpeg' http://127.0.0.1:8080/uploads
    curl -F image=@cat.jpg http://127.0.0.1:8080/uploads           # a browser form works too

    201 {"id": "3f1c...", "labels": [{"label": "star", "score": 0.98}, ...],
         "duplicate_of": [{"id": "a9e0...", "similarity": 0.97}]}
    400 {"error": "..."}     not a JPEG, PNG or WebP file, or too large (the message says which limit)
    503 {"error": "..."}     no inferd daemon answered in time

One AsyncClient serves every request of the event loop: many uploads are in flight at once over
its one connection and ring. The uploaded bytes go to the client as they are (inferd.client.decode
decodes them in this process; a repeated upload is answered from the daemon's cache before it is
decoded). The upload is checked against earlier ones (``near_duplicates``), then classified with
its own id as the tag, which stores its embedding so later uploads find it. Needs aiohttp (``pip install 'inferd[examples]'``).
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys

from aiohttp import web

from inferd.client import AsyncClient, DaemonUnavailable, InferdError, InvalidInput

#: Largest upload taken, in bytes (aiohttp refuses more with 413 before reading it all).
MAX_UPLOAD_BYTES = 16 * 2**20
CLIENT = web.AppKey("client", AsyncClient)


async def read_upload(request: web.Request) -> bytes:
    """The file's bytes: a multipart form's ``image`` field, or the raw body."""
    if request.content_type.startswith("multipart/"):
        form = await request.post()
        field = form.get("image")
        if field is None or not hasattr(field, "file"):
            raise web.HTTPBadRequest(text=json.dumps({"error": "no file in form field 'image'"}),
                                     content_type="application/json")
        return field.file.read()
    return await request.read()


async def upload(request: web.Request) -> web.Response:
    client = request.app[CLIENT]
    data = await read_upload(request)
    upload_id = hashlib.blake2b(data, digest_size=8).hexdigest()
    try:
        # Ask first, then store: classify with a tag keeps the upload's embedding under its id,
        # so later uploads find this one (a concurrent classify could find itself).
        similar = await client.near_duplicates(data, k=3)
        top = await client.classify(data, top_k=3, tag=upload_id)
    except InvalidInput as exc:
        return web.json_response({"error": str(exc)}, status=400)
    except DaemonUnavailable as exc:
        return web.json_response({"error": str(exc)}, status=503)
    except InferdError as exc:
        return web.json_response({"error": str(exc)}, status=500)
    return web.json_response({
        "id": upload_id,
        "labels": [{"label": p.label, "score": round(p.score, 4)} for p in top],
        "duplicate_of": [{"id": m.tag, "similarity": round(m.similarity, 4)}
                         for m in similar if m.tag not in (None, upload_id)],
    }, status=201)


def make_app(socket_path: str | None = None) -> web.Application:
    """The application; its AsyncClient opens at start-up (no daemon: the app does not start)."""
    app = web.Application(client_max_size=MAX_UPLOAD_BYTES)

    async def client_ctx(app: web.Application):
        async with AsyncClient(socket_path, timeout=10.0) as client:
            app[CLIENT] = client
            yield

    app.cleanup_ctx.append(client_ctx)
    app.router.add_post("/uploads", upload)
    return app


async def serve(socket_path: str | None, host: str, port: int) -> None:
    runner = web.AppRunner(make_app(socket_path))
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()       # the port chosen when asked for port 0
    print(f"listening on http://{bound[0]}:{bound[1]}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", help="the daemon's socket (default: $INFERD_SOCKET or inferd's default)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0: any free port (printed)")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.socket, args.host, args.port))
    except KeyboardInterrupt:
        pass
    except DaemonUnavailable as exc:
        sys.exit(f"upload_service: {exc}")


if __name__ == "__main__":
    main()
