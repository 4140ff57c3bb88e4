import gguf
import numpy as np
import pytest

from edgediff.benchmarks.synthetic_dit import DIT_ARCHITECTURES, write
from edgediff.convert import convert
from edgediff.convert.adopt import adopted_package
from edgediff.runtime import Pipeline

from tiny_models import CONFIGS

_CLIP = dict(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406,
             eos_token_id=49407, pad_token_id=1)


def _tiny(arch: str, name: str) -> dict:
    cfg = CONFIGS[name]
    clips = [dict(_CLIP, **cfg[k]) for k in ("text", "text_2") if k in cfg]
    clips[1:] = [dict(c, hidden_act="gelu") for c in clips[1:]]
    return dict(transformer=cfg["transformer"], text=(*clips, cfg["t5"]), vae={**DIT_ARCHITECTURES[arch]["vae"], **cfg["vae"]})


@pytest.mark.parametrize(("arch", "tiny"), [("flux-schnell", "flux-schnell"), ("sd35-medium", "sd35")])
def test_synthetic_file_is_what_the_converter_writes(tiny_source, tmp_path, arch, tiny):
    """The random full-size file has the names, shapes and types edgediff's GGUF writer gives
    the same architecture (checked at tiny size), and runs as it is."""
    synthetic = write(arch, tmp_path / "synthetic.gguf", "q8_0", tiny=_tiny(arch, tiny))
    converted = tmp_path / "converted.gguf"
    convert(tiny_source(tiny), converted, precision="q8_0")

    def tensors(path):
        return {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape)) for t in gguf.GGUFReader(path).tensors}

    assert tensors(synthetic) == tensors(converted)
    image = Pipeline(adopted_package(synthetic), device="cpu").generate("a red cube", steps=1, width=64, height=64)
    assert np.asarray(image).std() > 0


def test_the_bench_worker_runs_a_dit(tmp_path):
    """The harness's edgediff worker runs a DiT file as it is (it once asked for a 'unet')."""
    from edgediff.benchmarks.worker import run_edgediff

    synthetic = write("flux-schnell", tmp_path / "synthetic.gguf", "q8_0", tiny=_tiny("flux-schnell", "flux-schnell"))
    result = run_edgediff(dict(package=str(synthetic), device="cpu", threads=2, guidance=1.0, sampler="euler",
                               schedule="normal", seed=0, size=64, prompt="a red cube", negative_prompt="",
                               steps=1, image=str(tmp_path / "out.png")))
    assert result["provider"].endswith("CPUExecutionProvider") and len(result["steps_s"]) == 1
