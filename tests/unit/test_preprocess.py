"""The preprocessing (daemon/pipeline/preprocess.py) computes, bit for bit, what it computed as
three whole-batch torch ops (permute + to(float32), addcmul, contiguous): the model digest and the
cache keys name the preprocessing, not how it runs, so a faster pass must not move a single bit.

The output is a function of (channel, byte value) alone, 768 floats, so one frame holding every
byte value in every channel checks all of them; random frames of several sizes and batch sizes
check the layout (which byte lands where), both memory formats, and the reused output buffer."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from inferd.daemon.pipeline import preprocess_jit
from inferd.daemon.pipeline.preprocess import FLOAT_NCHW, UINT8_NHWC, Preprocess, to_input

pytestmark = pytest.mark.timeout(120)

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
SHAPES = ([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
ODD = ([0.1, 0.9, 0.333], [0.07, 1.3, 0.4999])       # scales and offsets that round differently


def previous(frames: torch.Tensor, mean, std, channels_last: bool = False) -> torch.Tensor:
    """The preprocessing as it was computed before the fused CPU pass, op for op."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32)
    std_t = torch.as_tensor(std, dtype=torch.float32)
    scale = (1.0 / (255.0 * std_t)).view(1, 3, 1, 1)
    bias = (-mean_t / std_t).view(1, 3, 1, 1)
    x = frames.permute(0, 3, 1, 2).to(torch.float32)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.addcmul(bias, x, scale).contiguous(memory_format=fmt)


def every_byte(width: int = 256) -> torch.Tensor:
    """One frame whose rows hold every byte value in every channel, each channel shifted so that
    the three channels of a pixel differ."""
    row = np.arange(256, dtype=np.uint8)
    frame = np.stack([np.roll(row, 85 * c) for c in range(3)], axis=-1)   # (256, 3)
    return torch.from_numpy(np.ascontiguousarray(np.broadcast_to(frame, (3, width, 3))[None]))


def random_frames(seed: int, n: int, h: int, w: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8))


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape
    layout = [(size, a, b) for size, a, b in zip(got.shape, got.stride(), want.stride()) if size > 1]
    assert all(a == b for _, a, b in layout), f"memory layout differs: {got.stride()} against {want.stride()}"
    same = got.view(torch.int32) == want.view(torch.int32)
    assert bool(same.all()), f"{int((~same).sum())} of {same.numel()} values differ in their bits"


@pytest.mark.parametrize("mean, std", [IMAGENET, SHAPES, ODD])
@pytest.mark.parametrize("channels_last", [False, True])
def test_every_byte_value_of_every_channel_matches_the_previous_ops(mean, std, channels_last):
    frames = every_byte()
    got = Preprocess(mean, std, channels_last=channels_last)(frames)
    assert_same_bits(got, previous(frames, mean, std, channels_last))


@pytest.mark.parametrize("channels_last", [False, True])
def test_random_frames_of_several_sizes_and_batch_sizes_match_bit_for_bit(channels_last):
    seed = 20261207
    print(f"seed {seed}")
    pre = Preprocess(*IMAGENET, channels_last=channels_last, reuse=True)
    for i, (n, h, w) in enumerate([(1, 64, 64), (8, 64, 64), (32, 64, 64), (5, 224, 224), (1, 224, 224),
                                   (3, 17, 13), (2, 1, 1), (33, 64, 64), (8, 224, 224)]):
        frames = random_frames(seed + i, n, h, w)
        assert_same_bits(pre(frames), previous(frames, *IMAGENET, channels_last))


def test_rows_of_a_staging_buffer_and_a_fresh_preprocess_agree():
    """The engine hands a prefix of a staging buffer (a view); ``to_input`` builds a new
    Preprocess each call: both give the previous bits."""
    staging = random_frames(3, 16, 64, 64)
    rows = staging[:11]
    assert_same_bits(Preprocess(*SHAPES, reuse=True)(rows), previous(rows, *SHAPES))
    assert_same_bits(to_input(rows, *SHAPES), previous(rows, *SHAPES))


def test_a_reused_buffer_is_rewritten_each_call_and_fresh_outputs_are_not_shared():
    big, small = random_frames(1, 8, 64, 64), random_frames(2, 3, 64, 64)
    # each pass named: the default's (the torch passes until FUSED_LOADER is ready, then the fused
    # pass with buffers of its own) may change between two calls, which is right but not this test
    passes = (False, True) if preprocess_jit.available() else (False,)
    for channels_last, fused in itertools.product((False, True), passes):
        reusing = Preprocess(*IMAGENET, channels_last=channels_last, reuse=True, fused=fused)
        assert_same_bits(reusing(small), previous(small, *IMAGENET, channels_last))
        first = reusing(big)                             # grows the buffer past the small batch
        assert_same_bits(first, previous(big, *IMAGENET, channels_last))
        second = reusing(small)
        assert second.data_ptr() == first.data_ptr(), "reuse=True allocated a second buffer"
        assert_same_bits(second, previous(small, *IMAGENET, channels_last))
        assert_same_bits(reusing(big), previous(big, *IMAGENET, channels_last))
    fresh = Preprocess(*IMAGENET)
    a = fresh(big)
    b = fresh(small)
    assert a.data_ptr() != b.data_ptr()
    assert_same_bits(a, previous(big, *IMAGENET))       # the second call left the first result alone


def test_a_strided_view_of_frames_is_read_as_its_values():
    frames = random_frames(5, 4, 64, 64)[:, :, ::2]      # every other column: not NHWC-dense
    assert not frames.is_contiguous()
    for channels_last in (False, True):
        got = Preprocess(*IMAGENET, channels_last=channels_last, reuse=True)(frames)
        assert_same_bits(got, previous(frames, *IMAGENET, channels_last))


def test_uint8_nhwc_passes_the_frames_themselves_and_bad_input_is_refused():
    frames = random_frames(6, 2, 8, 8)
    assert Preprocess(*IMAGENET, form=UINT8_NHWC, reuse=True)(frames) is frames
    with pytest.raises(ValueError, match="uint8 NHWC"):
        Preprocess(*IMAGENET)(frames.float())
    with pytest.raises(ValueError, match="uint8 NHWC"):
        Preprocess(*IMAGENET)(frames[..., :2])
    with pytest.raises(ValueError, match="input form"):
        Preprocess(*IMAGENET, form="float_nhwc")
    assert FLOAT_NCHW == "float_nchw"


# The fused pass (daemon/pipeline/preprocess_jit.py, NOTE [ fused preprocessing ]) where numba is
# installed, its table arithmetic (the fallback where the compiled fma differs from torch's), and
# the torch passes (no numba): all three give the previous bits.

needs_numba = pytest.mark.skipif(not preprocess_jit.available(), reason="numba is not installed")


@needs_numba
def test_the_fused_pass_is_what_a_cpu_preprocess_runs_and_its_fma_matches_torch_here():
    pre = Preprocess(*IMAGENET, reuse=True, fused=True)
    frames = random_frames(7, 2, 16, 16)
    assert_same_bits(pre(frames), previous(frames, *IMAGENET))
    assert pre._cpu.fused is not None
    # on this machine torch's addcmul is a fused multiply-add, so the check picked the fma loop
    assert pre._cpu.fused.arithmetic == "fma"


@needs_numba
def test_a_daemons_preprocess_loads_the_fused_pass_in_the_background_with_the_same_bits():
    """The default (a daemon's): the torch passes until FUSED_LOADER's thread has loaded numba's
    kernels, then the fused pass, in the same buffers' place; the bits never change."""
    from inferd.daemon.pipeline.preprocess import BACKGROUND, FUSED_LOADER

    pre = Preprocess(*IMAGENET, reuse=True)
    assert pre.fused == BACKGROUND
    frames = random_frames(11, 3, 24, 20)
    first = pre(frames).clone()
    assert_same_bits(first, previous(frames, *IMAGENET))
    assert FUSED_LOADER.ready.wait(60), FUSED_LOADER.failed
    again = pre(frames)
    assert pre._cpu.fused is not None and pre._cpu._waiting is None
    assert_same_bits(again, first)
    assert_same_bits(pre(random_frames(12, 5, 24, 20)), previous(random_frames(12, 5, 24, 20), *IMAGENET))


@needs_numba
@pytest.mark.parametrize("arithmetic", ["fma", "table"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_both_arithmetics_of_the_fused_pass_give_the_previous_bits(arithmetic, channels_last):
    for mean, std in (IMAGENET, ODD):
        pre = Preprocess(mean, std, channels_last=channels_last, reuse=True, fused=True)
        frames = every_byte()
        pre(frames)                                      # makes the pass of this frame size
        pre._cpu.fused = preprocess_jit.Fused(pre.scale.numpy(), pre.bias.numpy(), channels_last, arithmetic)
        assert pre._cpu.fused.arithmetic == arithmetic
        assert_same_bits(pre(frames), previous(frames, mean, std, channels_last))
        for i, (n, h, w) in enumerate([(1, 224, 224), (8, 64, 64), (3, 17, 13), (32, 64, 64)]):
            frames = random_frames(100 + i, n, h, w)
            if (h, w) != (pre._cpu.h, pre._cpu.w):
                pre(frames)
                pre._cpu.fused = preprocess_jit.Fused(pre.scale.numpy(), pre.bias.numpy(), channels_last,
                                                      arithmetic)
            assert_same_bits(pre(frames), previous(frames, mean, std, channels_last))


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_torch_passes_without_numba_give_the_previous_bits(channels_last):
    pre = Preprocess(*ODD, channels_last=channels_last, reuse=True, fused=False)
    assert_same_bits(pre(every_byte()), previous(every_byte(), *ODD, channels_last))
    assert pre._cpu.fused is None
    for i, (n, h, w) in enumerate([(1, 224, 224), (8, 64, 64), (3, 17, 13)]):
        frames = random_frames(200 + i, n, h, w)
        assert_same_bits(pre(frames), previous(frames, *ODD, channels_last))
