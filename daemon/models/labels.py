"""Class names of the served model: from a labels file, the built-in's own, or numbered.

A model without a labels file names its classes by their index: "0", "1", ... (the same text the
client would print for an index, so a numbered label is never mistaken for a real one). The
number of classes is the width of the model's output (:func:`inferd.daemon.models.loading.output_width`).

Labels never travel in hello or in replies (a 21k-class model's names are hundreds of KB): hello
says ``classes`` (how many) and ``labels_id`` (:func:`labels_id`); a client that wants names
asks once with the ``labels`` request (docs/protocol.md) and keeps them for that ``labels_id``.
``labels_id`` is ``"numbered"`` for numbered classes, so a client names them without asking.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..config import ConfigError

NUMBERED = "numbered"


def read_labels(path: str) -> tuple[str, ...]:
    """The non-empty lines of a UTF-8 file, stripped; ConfigError naming model.labels otherwise."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"model.labels: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"model.labels: {path} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    labels = tuple(line.strip() for line in lines if line.strip())
    if not labels:
        raise ConfigError(f"model.labels: {path} has no labels")
    return labels


def numbered(classes: int) -> tuple[str, ...]:
    """The names of ``classes`` unnamed classes: "0", "1", ..."""
    return tuple(str(i) for i in range(classes))


def labels_id(labels: tuple[str, ...], is_numbered: bool) -> str:
    """What identifies a list of names in hello: ``"numbered"``, else 16 hex digits of BLAKE2b
    over the names (a model reloaded with the same labels keeps its id, so clients keep theirs)."""
    if is_numbered:
        return NUMBERED
    h = hashlib.blake2b(digest_size=8)
    for label in labels:
        h.update(label.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()
