"""Peers: the tools users would use instead, each run on the same weights and scenario.

A peer is a row here (what it needs installed, how to install it) plus a `run(config)` in its
module that returns stage timings in the worker's format. A peer that is not installed is
skipped with its install line.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Peer:
    name: str
    module: str  # edgediff.benchmarks.peers.<module> holds run(config)
    variant: str
    needs: tuple[str, ...]  # importable modules
    install: str
    same_noise: bool  # draws its starting noise as torch's CPU generator does (images comparable)
    source: str  # what it loads: 'diffusers' folder, or 'gguf': the file edgediff wrote for its variant
    venv: tuple[str, ...] = ()  # packages of an interpreter of its own, when they clash with ours


PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer("diffusers-fp32", "diffusers_torch", "fp32", ("torch", "diffusers"),
             "pip install 'edgediff[convert]'", True, "diffusers"),
        Peer("diffusers-bf16", "diffusers_torch", "bf16", ("torch", "diffusers"),
             "pip install 'edgediff[convert]'", True, "diffusers"),
        Peer("optimum-fp32", "optimum_ort", "fp32", ("optimum.onnxruntime",),
             "edgediff bench --install-peer optimum-fp32", True, "diffusers",
             venv=("torch==2.13.0", "optimum-onnx==0.1.0", "diffusers==0.39.0", "transformers==4.57.6",
                   "onnxruntime", "pillow")),
        *(Peer(f"sdcpp-{w}", "sdcpp", w, ("stable_diffusion_cpp",),
               "edgediff bench --install-peer sdcpp-" + w, True, "diffusers",
               venv=("stable-diffusion-cpp-python==0.4.7", "safetensors", "torch==2.13.0", "pillow", "numpy"))
          for w in ("f16", "q8_0", "q4_0")),
        # stable-diffusion.cpp on the very .gguf files edgediff wrote (the scenario's gguf-* precisions)
        *(Peer(f"sdcpp-gguf-{w}", "sdcpp", f"gguf-{w}", ("stable_diffusion_cpp",),
               "edgediff bench --install-peer sdcpp-gguf-" + w, True, "gguf",
               venv=("stable-diffusion-cpp-python==0.4.7", "safetensors", "torch==2.13.0", "pillow", "numpy"))
          for w in ("f16", "q8_0", "q5_1", "q4_0")),
    )
}


def missing(peer: Peer, python_has=importlib.util.find_spec) -> str | None:
    """None when the peer can run here, else the line that says how to install it."""
    absent = [m for m in peer.needs if python_has(m) is None]
    if absent:
        return f"{peer.name}: skipped, {', '.join(absent)} not installed ({peer.install})"
    return None
