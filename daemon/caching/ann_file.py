"""The near-duplicate index on disk: which graph files make it, and which store rows they hold.

The index (daemon/caching/ann_index.py) is a cache of the embedding store, never its truth: it is
saved beside the store so a restart reopens it instead of re-inserting every row, and whatever is
wrong with it (missing, truncated, garbage, written for another store, capacity, embedding
definition, scoping or graph shape) costs a rebuild from the store, never a wrong answer.

A directory ``<store file>.index/`` holds one usearch graph file per scope (a uid, or every row
when ``embeddings.shared``), named ``scope-<uid or all>-<generation>.usearch``, and one ``meta``
file that names them. An IVF index (``embeddings.index_kind = "ivf"``, daemon/caching/ann_ivf.py:
the files' layouts) holds ``scope-<uid or all>-<generation>.ivf`` lists instead, and the
centroids they share, ``centroids-<generation>.ivf``, named in the scope table too. A save
writes new graph files under a new generation, then ``meta`` through
a temporary file renamed into place, then removes the files of older generations: a daemon killed
at any point leaves either the old ``meta`` with its intact files or the new one with its own.

``meta`` layout (all integers little-endian; written by the daemon alone)::

    offset  size  field
    0       8     magic            b"INFDANNX"
    8       4     format version   u32, currently 2 (1 had no key versions; read as all zero)
    12      4     dim              u32, floats per vector (the store's)
    16      8     capacity         u64, rows (the store's)
    24      16    embedding id     the store header's (daemon/caching/embedding_store.py): vectors of
                                   another embedding definition are never searched
    40      1     shared           u8: 1 = one scope of every row, 0 = one scope per uid
    41      1     scalar           u8, the graph's stored vectors: 1 = float16, 2 = int8, 3 = bfloat16;
                                   4 = IVF lists of int8 codes (the index is an IVF one)
    42      2     connectivity     u16, HNSW M (IVF: 0)
    44      4     expansion_add    u32, HNSW ef_construction (IVF: the lists, nlist)
    48      8     generation       u64, the save that wrote this file
    56      4     scopes           u32, S
    60      4     body check       zlib.crc32 of bytes 128..end
    64      4     header check     zlib.crc32 of bytes 0..64
    68      60    reserved         zero
    128     S*32  scope table, one entry per graph file:
                    0  u32 uid (0xFFFFFFFF: every row;    4  u32 reserved
                           0xFFFFFFFE: IVF centroids)
                    8  u64 file size                     16  u64 rows in the graph
                    24 u32 zlib.crc32 of the whole file  28  u32 reserved
    ...     capacity * 24   rows, what the graphs hold under each store row (the graph key):
                    0  u64 stamp of the store row when it was inserted (0: not in any graph)
                    8  u32 uid of the row                12 u32 key version: the row's graph
                    16 8 bytes: the first 8 bytes of       key is row | version << 32 (NOTE
                       its content hash                    [ deferred removals ] in ann_index.py)

At open, a graph key counts only while the store row still has that stamp, uid and content hash
(the vector of a row is its content's, under the embedding id above): a row the store took for
another image since the save, or lost, is searched as changed until it is inserted again. So a
daemon killed after adds it never saved reopens an older index that is right for every row it
still describes, and inserts the rest (NOTE [ index rows ] in ann_index.py).
"""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np

MAGIC = b"INFDANNX"
FORMAT_VERSION = 2               # 1: no key versions (every row's key was its row number)
READS = (1, 2)                   # a version 1 file's versions are zero: the same keys
HEAD_SIZE = 128
ALL = 0xFFFFFFFF                  # the scope of every row (embeddings.shared)
CENTROIDS = 0xFFFFFFFE            # the scope table's entry of an IVF index's centroids file
SCALARS = {"f16": 1, "i8": 2, "bf16": 3, "ivf-i8": 4}  # the graph's stored vectors: meta's scalar byte
SCALAR_BYTES = {"f16": 2, "i8": 1, "bf16": 2}
EXTENSIONS = {"hnsw": "usearch", "ivf": "ivf"}

_HEAD = struct.Struct("<8sIIQ16sBBHIQII")        # bytes 0..64; the header check follows
_U32 = struct.Struct("<I")
_SCOPE = struct.Struct("<IIQQII")
ROW = np.dtype({"names": ["stamp", "uid", "ver", "hash"], "formats": ["<u8", "<u4", "<u4", "<u8"],
                "offsets": [0, 8, 12, 16], "itemsize": 24})


class IndexFileError(Exception):
    """What is wrong with a saved index: the reason it is rebuilt (one log line)."""


def meta_path(directory: str) -> str:
    return os.path.join(directory, "meta")


def graph_name(uid: int, generation: int, kind: str = "hnsw") -> str:
    if uid == CENTROIDS:
        return centroids_name(generation)
    return f"scope-{'all' if uid == ALL else uid}-{generation}.{EXTENSIONS[kind]}"


def centroids_name(generation: int) -> str:
    return f"centroids-{generation}.ivf"


def file_crc(path: str) -> int:
    crc = 0
    with open(path, "rb", buffering=0) as fh:
        while chunk := fh.read(8 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_meta(directory: str, ident: dict, generation: int, scopes: list[tuple[int, str, int]],
               rows: np.ndarray) -> None:
    """Write ``meta`` for graph files ``scopes`` ((uid, path, rows in it) each) and the ``rows``
    array (dtype ROW): to a temporary file, fsync'ed, renamed over the old one, directory fsync'ed."""
    table = b""
    for uid, path, count in scopes:
        table += _SCOPE.pack(uid, 0, os.path.getsize(path), count, file_crc(path), 0)
    body = table + np.ascontiguousarray(rows, ROW).tobytes()
    head = _HEAD.pack(MAGIC, FORMAT_VERSION, ident["dim"], ident["capacity"], ident["embedding"],
                      int(ident["shared"]), SCALARS[ident["scalar"]], ident["connectivity"], ident["expansion_add"],
                      generation, len(scopes), zlib.crc32(body))
    head += _U32.pack(zlib.crc32(head))
    tmp = meta_path(directory) + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, head.ljust(HEAD_SIZE, b"\0"))
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, meta_path(directory))
    fsync_dir(directory)


def read_meta(directory: str, ident: dict) -> tuple[int, list[tuple[int, str, int, int]], np.ndarray]:
    """(generation, [(uid, graph path, rows, checksum)], rows array) of the saved index, checked
    against ``ident`` (dim, capacity, embedding, shared, connectivity, expansion_add) and against
    each graph file's size. The graph files' checksums are not read here (a second per GB):
    :func:`check_graph` does that on the inserter thread, and the index answers nothing from a
    graph before it passed (NOTE [ verified before searched ] in ann_index.py). Raises
    IndexFileError saying what does not match."""
    try:
        with open(meta_path(directory), "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise IndexFileError("no saved index") from None
    if len(data) < HEAD_SIZE:
        raise IndexFileError(f"meta truncated to {len(data)} bytes")
    fields = _HEAD.unpack_from(data)
    magic, version, dim, capacity, embedding, shared, scalar, conn, ef_add, generation, count, body_crc = fields
    if magic != MAGIC or version not in READS:
        raise IndexFileError(f"magic {magic!r} version {version}, expected {MAGIC!r} version {FORMAT_VERSION}")
    if _U32.unpack_from(data, _HEAD.size)[0] != zlib.crc32(data[:_HEAD.size]):
        raise IndexFileError("meta header check does not match")
    found = {"dim": dim, "capacity": capacity, "embedding": embedding, "shared": bool(shared),
             "scalar": {v: k for k, v in SCALARS.items()}.get(scalar, scalar), "connectivity": conn,
             "expansion_add": ef_add}
    if found != {k: ident[k] for k in found}:
        diff = ", ".join(f"{k} {found[k]!r} (now {ident[k]!r})" for k in found if found[k] != ident[k])
        raise IndexFileError(f"made for another store or index shape: {diff}")
    body = data[HEAD_SIZE:]
    if len(body) != count * _SCOPE.size + capacity * ROW.itemsize or zlib.crc32(body) != body_crc:
        raise IndexFileError("meta body truncated or its check does not match")
    scopes = []
    for i in range(count):
        uid, _, size, n, crc, _ = _SCOPE.unpack_from(body, i * _SCOPE.size)
        path = os.path.join(directory, graph_name(uid, generation, "ivf" if scalar == SCALARS["ivf-i8"] else "hnsw"))
        try:
            real = os.path.getsize(path)
        except FileNotFoundError:
            raise IndexFileError(f"graph file {os.path.basename(path)} is missing") from None
        if real != size:
            raise IndexFileError(f"graph file {os.path.basename(path)} has {real} bytes (meta: {size})")
        scopes.append((uid, path, n, crc))
    rows = np.frombuffer(body, ROW, capacity, count * _SCOPE.size).copy()
    return generation, scopes, rows


def check_graph(path: str, crc: int) -> None:
    """Raise IndexFileError unless the graph file at ``path`` has the checksum ``meta`` gave it."""
    if file_crc(path) != crc:
        raise IndexFileError(f"graph file {os.path.basename(path)}: its check does not match")


def remove_others(directory: str, keep: set[str]) -> None:
    """Remove graph files (and temporaries) of the directory that ``keep`` does not name."""
    for name in os.listdir(directory):
        if name not in keep and (name.startswith(("scope-", "centroids-")) or name.endswith(".tmp")):
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:
                pass


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
