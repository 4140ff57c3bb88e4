"""A benchmark scenario: what to run, read from a small TOML file.

    name = "sd15-512"
    model = "synthetic:sd15"      # a package, a diffusers folder, synthetic:<arch>, builtin:<name>
    precisions = ["fp32", "int8", "gguf-q4_0", "gguf-q4_0:convs@expanded"]
    sizes = [512]
    steps = 4
    sampler = "euler"
    schedule = "normal"
    guidance = 7.5
    batch = 1
    device = "cpu"
    threads = 2
    repeats = 2
    seeds = [0]
    prompts = ["a photograph of a lighthouse at dusk"]
    peers = ["diffusers-fp32", "diffusers-bf16", "optimum-fp32", "sdcpp-q8_0"]
    timeout = 900                 # seconds per run, then it is stopped and reported failed
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from edgediff.errors import UsageError

SCENARIOS = Path(__file__).parent / "scenarios"


@dataclass(frozen=True)
class Scenario:
    name: str
    model: str
    precisions: tuple[str, ...] = ("fp32",)
    sizes: tuple[int, ...] = (512,)
    steps: int = 4
    sampler: str = "euler"
    schedule: str = "normal"
    guidance: float = 7.5
    batch: int = 1
    device: str = "cpu"
    threads: int | None = None
    repeats: int = 2
    seeds: tuple[int, ...] = (0,)
    prompts: tuple[str, ...] = ("a photograph of a lighthouse on a rocky coast at dusk",)
    negative_prompt: str = "blurry, low quality"
    peers: tuple[str, ...] = ()
    reference: str = "fp32"  # the precision images are compared with
    timeout: float | None = None  # seconds a run may take before it is stopped and reported failed
    peer_python: dict[str, str] = field(default_factory=dict)  # peer -> interpreter that has it


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file (a name in benchmarks/scenarios/ works too)."""
    path = Path(path)
    if not path.is_file() and (SCENARIOS / f"{path.name}.toml").is_file():
        path = SCENARIOS / f"{path.name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SCENARIOS.glob("*.toml")))
        raise UsageError(f"{path}: no such scenario file (built-in scenarios: {known})")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid TOML ({exc})") from exc
    for key in ("name", "model"):
        if key not in raw:
            raise UsageError(f"{path}: missing '{key}'")
    from edgediff.typed import read

    scenario = read(Scenario, raw, str(path), UsageError)
    if scenario.batch != 1:
        raise UsageError(f"{path}: batch {scenario.batch}: this version generates one image per run (batch = 1)")
    for key in ("repeats", "steps", "threads"):
        if getattr(scenario, key) is not None and getattr(scenario, key) < 1:
            raise UsageError(f"{path}: '{key}' must be at least 1 (got {getattr(scenario, key)})")
    if not scenario.sizes or any(s < 8 or s % 8 for s in scenario.sizes):
        raise UsageError(f"{path}: 'sizes' must be positive multiples of 8 (got {list(scenario.sizes)})")
    if scenario.guidance < 0 or scenario.timeout is not None and scenario.timeout <= 0:
        raise UsageError(f"{path}: 'guidance' must be >= 0 and 'timeout' above 0")
    from edgediff.runtime.samplers import SAMPLERS
    from edgediff.runtime.schedules import SCHEDULES
    from edgediff.runtime.sessions import DEVICES

    for key, value, known_names in (("sampler", scenario.sampler, SAMPLERS), ("schedule", scenario.schedule, SCHEDULES),
                                    ("device", scenario.device, DEVICES)):
        if value not in known_names:
            raise UsageError(f"{path}: unknown {key} '{value}' (known: {', '.join(known_names)})")
    from edgediff.benchmarks.harness import parse_configuration
    from edgediff.benchmarks.peers import PEERS

    for precision in scenario.precisions:
        parse_configuration(precision)
    for peer in scenario.peers:
        if peer not in PEERS:
            raise UsageError(f"{path}: unknown peer '{peer}' (known: {', '.join(PEERS)})")
    return scenario
