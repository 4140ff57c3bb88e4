"""What converting needs besides the graphs: the tokenizers edgediff ships, the scheduler config
as the source's scheduler class reads it, and whether a VAE file is in LDM's names."""

from __future__ import annotations

from pathlib import Path

BUNDLED_CLIP_TOKENIZER = Path(__file__).parent / "data" / "clip_tokenizer"
BUNDLED_T5_TOKENIZER = Path(__file__).parent / "data" / "t5_tokenizer"
_DIFFUSERS_VAE = ("encoder.down_blocks.", "decoder.up_blocks.", "decoder.mid_block.")


def _prediction_type(value: str | None, default: str) -> str:
    return {"eps": "epsilon", "v": "v_prediction", None: default}.get(value, value)


def _resolve_spacing(config: dict) -> dict:
    """Record the spacing the config's own scheduler class uses when the file leaves it out."""
    if not config.get("timestep_spacing"):
        name = config.get("_class_name", "")
        linspace = ("Euler", "Heun", "DPMSolver", "UniPC", "KDPM2", "LMS")
        config = dict(config, timestep_spacing="linspace" if name.startswith(linspace) else "leading")
    return config


def ldm_vae_file(path: Path) -> bool:
    """A VAE file in LDM's names (or a GGUF), which single-file models take as one more weight
    source; anything else is given apart (convert.build.vae_graphs)."""
    if path.suffix.lower() == ".gguf":
        return True
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return False
    from edgediff.runtime.safetensors_file import SafetensorsFile

    return not any(k.startswith(_DIFFUSERS_VAE) for k in SafetensorsFile(path).header)
