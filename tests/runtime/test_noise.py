"""TorchGenerator reproduces torch.randn on a CPU generator bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgediff.runtime.noise import TorchGenerator

SHAPES = [(1, 4, 64, 64), (2, 4, 9, 7), (1, 16, 32, 32), (17,), (100,), (5,), (3, 3), (1,)]


@pytest.mark.parametrize("seed", [0, 1, 42, 123456789, 2**32 + 5, 2**63 - 1])
def test_stream_matches_torch_bit_for_bit(seed):
    theirs = torch.Generator().manual_seed(seed)
    ours = TorchGenerator(seed)
    for shape in SHAPES:  # successive calls continue one stream, sizes above and below 16
        expected = torch.randn(shape, generator=theirs).numpy()
        got = ours.randn(shape)
        assert got.dtype == np.float32 and got.shape == shape
        np.testing.assert_array_equal(got.view(np.int32), expected.view(np.int32))


def test_large_latent_matches():
    expected = torch.randn((1, 4, 128, 128), generator=torch.Generator().manual_seed(2024)).numpy()
    np.testing.assert_array_equal(TorchGenerator(2024).randn((1, 4, 128, 128)), expected)


def test_normal_statistics():
    x = TorchGenerator(7).randn((1_000_000,))
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1) < 0.01
