"""SVD's image-encoder pixels in NumPy against diffusers' own path: StableVideoDiffusionPipeline's
`_encode_image` run on a stand-in encoder that keeps what it is fed (pil_to_numpy, the
anti-aliased bicubic resize, the CLIPImageProcessor normalisation), for images larger and smaller
than 224, square and not."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from edgediff.errors import SourceError, UsageError
from edgediff.runtime.clip_image import CLIP_MEAN, CLIP_STD, clip_pixels, read_normalisation

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

SIZES = [(576, 1024), (64, 96), (300, 200), (224, 224), (1024, 576), (5, 7)]  # (height, width)


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    """Noise over a smooth gradient: edges and flat parts for the blur and the cubic to show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    smooth = np.stack([xx / max(width - 1, 1), yy / max(height - 1, 1), (xx + yy) % 37 / 36], -1) * 255
    noisy = 0.6 * smooth + 0.4 * rng.integers(0, 256, (height, width, 3))
    return Image.fromarray(noisy.round().clip(0, 255).astype(np.uint8))


class _Keeper(torch.nn.Module):
    """An image encoder that keeps its input."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.seen = None

    def forward(self, pixels):
        self.seen = pixels
        return SimpleNamespace(image_embeds=torch.zeros(pixels.shape[0], 4))


def _diffusers_pixels(image, feature_extractor) -> np.ndarray:
    from diffusers import StableVideoDiffusionPipeline
    from diffusers.video_processor import VideoProcessor

    keeper = _Keeper()
    stand_in = SimpleNamespace(image_encoder=keeper, feature_extractor=feature_extractor,
                               video_processor=VideoProcessor(do_resize=True, vae_scale_factor=8))
    with torch.no_grad():
        StableVideoDiffusionPipeline._encode_image(stand_in, image, "cpu", 1, False)
    return keeper.seen.numpy()


@pytest.mark.parametrize("height,width", SIZES)
def test_matches_diffusers(height, width):
    image = _image(height, width)
    want = _diffusers_pixels(image, transformers.CLIPImageProcessor())
    got = clip_pixels(image)
    assert got.shape == want.shape == (1, 3, 224, 224) and got.dtype == np.float32
    err = float(np.abs(got - want).max())
    assert err <= 1e-4, err


def test_arrays_and_other_modes():
    image = _image(300, 200, seed=4)
    pixels = clip_pixels(image)
    array = np.asarray(image)
    assert np.array_equal(clip_pixels(array), pixels)
    assert np.abs(clip_pixels(array.astype(np.float64) / 255) - pixels).max() <= 1e-5
    grey = image.convert("L")
    assert np.array_equal(clip_pixels(grey), clip_pixels(grey.convert("RGB")))
    assert clip_pixels(image, size=112).shape == (1, 3, 112, 112)
    with pytest.raises(UsageError):
        clip_pixels(array[..., :2])
    with pytest.raises(UsageError):
        clip_pixels(array.astype(np.int32))


def test_folder_normalisation(tmp_path):
    """A feature extractor with its own mean and std: read from the folder and applied as diffusers does."""
    assert read_normalisation(tmp_path) == (CLIP_MEAN, CLIP_STD)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    processor = transformers.CLIPImageProcessor(image_mean=mean, image_std=std)
    processor.save_pretrained(tmp_path / "feature_extractor")
    got_mean, got_std = read_normalisation(tmp_path)
    assert got_mean == tuple(mean) and got_std == tuple(std)
    image = _image(576, 1024, seed=2)
    want = _diffusers_pixels(image, processor)
    err = float(np.abs(clip_pixels(image, mean=got_mean, std=got_std) - want).max())
    assert err <= 1e-4, err
    (tmp_path / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps({"image_std": [1, 0, 1]}))
    with pytest.raises(SourceError, match="image_std"):
        read_normalisation(tmp_path)
