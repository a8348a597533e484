"""The no-op model of the feed-rate benchmark, saved as a TorchScript file at run time.

It takes the frames as they are (``model.input = "uint8_nhwc"``: uint8, batch x height x width x 3,
no preprocessing on the CPU, as a GPU model that normalises inside would) and returns one row of
10 logits per frame that depends on the frame, ``x[:, 0, 0, :1].float() + arange(10)``: a batch costs
next to nothing, so what the benchmark measures is the daemon's own work per frame.
"""
from __future__ import annotations

import os

#: Logits per frame: the classes the daemon sees.
CLASSES = 10
#: The file's name in the run's work folder; the daemon names the model after it.
FILE_NAME = "feed-noop.pt"


def save(directory: str) -> str:
    """Script the no-op and save it into ``directory``; returns the file's path."""
    import torch

    class NoOp(torch.nn.Module):
        """uint8 NHWC in, ``CLASSES`` logits out, nothing computed that grows with the frame."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, 0, 0, :1].float() + torch.arange(10, dtype=torch.float32, device=x.device)

    path = os.path.join(directory, FILE_NAME)
    torch.jit.script(NoOp()).save(path)
    return path


def daemon_args(path: str, size: int, devices: int, cache: bool, max_batch: int) -> list[str]:
    """The daemon's command line for one case: the no-op file at ``size`` x ``size``, ``devices``
    CPU devices of one thread each, the result cache on or off, the embedding store off (the no-op
    has no embedding)."""
    args = ["--model", path, "--set", "model.input=uint8_nhwc", "--set", f"model.input_height={size}",
            "--set", f"model.input_width={size}", "--set", f"batching.max_batch={max_batch}",
            "--set", f"cache.enabled={'true' if cache else 'false'}", "--set", "embeddings.enabled=false"]
    for _ in range(devices):
        args += ["--device", "cpu:1"]
    return args
