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
    source: str  # what it loads: 'diffusers' folder, 'onnx' (optimum export), 'checkpoint' (LDM file)


PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer("diffusers-fp32", "diffusers_torch", "fp32", ("torch", "diffusers"),
             "pip install 'edgediff[convert]'", True, "diffusers"),
        Peer("diffusers-bf16", "diffusers_torch", "bf16", ("torch", "diffusers"),
             "pip install 'edgediff[convert]'", True, "diffusers"),
    )
}


def missing(peer: Peer, python_has=importlib.util.find_spec) -> str | None:
    """None when the peer can run here, else the line that says how to install it."""
    absent = [m for m in peer.needs if python_has(m) is None]
    if absent:
        return f"{peer.name}: skipped, {', '.join(absent)} not installed ({peer.install})"
    return None
