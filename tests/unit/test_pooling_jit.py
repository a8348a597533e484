"""The fused CPU pooling (daemon/models/pooling_jit.py) computes the embedding the torch ops define."""
import pytest
import torch

from inferd.daemon.models import embedding_pooling, pooling_jit
from inferd.daemon.models.embedding_pooling import BLANK, Pool

pytestmark = pytest.mark.skipif(not pooling_jit.available(), reason="numba is not installed")


def torch_ops(pool: Pool, features, frames):
    """The definition, with the fused pass turned off."""
    covers = pooling_jit.covers
    pooling_jit.covers = lambda *a: False
    try:
        return pool(features, frames)
    finally:
        pooling_jit.covers = covers


@pytest.mark.parametrize("text", ["grid:4+thumbnail:4", "grid:4", "grid:3+thumbnail:5", "grid:1"])
@pytest.mark.parametrize("shape", [(1, 16, 64, 64), (5, 8, 30, 17)])
def test_fused_equals_the_torch_ops(text, shape):
    gen = torch.Generator().manual_seed(sum(shape) + len(text))
    features = torch.relu(torch.randn(shape, generator=gen))
    frames = torch.randint(0, 256, (shape[0] + 2, 48, 40, 3), dtype=torch.uint8, generator=gen)   # padded rows
    pool = Pool.parse(text)
    assert pooling_jit.covers(features, frames, pool.grid, pool.thumbnail)
    with torch.inference_mode():
        fused, ops = pool(features, frames), torch_ops(pool, features, frames)
    assert fused.shape == ops.shape == (shape[0], pool.width(shape[1] * pool.grid ** 2))
    assert torch.allclose(fused, ops, atol=1e-5, rtol=0), (fused - ops).abs().max()


def test_flat_frames_and_zero_features_stay_unit_rows():
    features, frames = torch.zeros(2, 4, 8, 8), torch.full((2, 16, 16, 3), 77, dtype=torch.uint8)
    pool = Pool.parse("grid:4+thumbnail:4")
    fused = pool(features, frames)
    assert torch.allclose(fused, torch_ops(pool, features, frames), atol=1e-6)
    assert torch.allclose(fused.norm(dim=1), torch.ones(2)) and fused[0, -1] == pytest.approx(1.0)
    assert BLANK > 0


def test_what_it_does_not_cover_takes_the_torch_ops():
    pool = Pool.parse("grid:4")
    assert not pooling_jit.covers(torch.randn(2, 4, 8, 8).to(torch.float64), None, 4, 0)
    assert not pooling_jit.covers(torch.randn(2, 8, 8, 4).permute(0, 3, 1, 2), None, 4, 0)   # not contiguous
    assert not pooling_jit.covers(torch.randn(2, 4, 8, 8), None, 0, 0)                       # mean
    mean = Pool.parse("mean")(torch.randn(2, 4, 8, 8), None)
    assert mean.shape == (2, 4)
    double = torch.relu(torch.randn(2, 4, 8, 8)).to(torch.float64)
    assert torch.equal(pool(double, None), torch_ops(pool, double, None))
    assert embedding_pooling.pooling_jit is pooling_jit
