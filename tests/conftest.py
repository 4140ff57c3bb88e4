"""Shared fixtures: tiny seeded models (diffusers folders) and their converted packages, built
once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # the helpers beside this file

from edgediff.runtime.accuracy import AUTO_ENV as AUTO_INT8_ENV  # noqa: E402
from edgediff.runtime.openvino_session import AUTO_ENV  # noqa: E402

from tiny_models import build_tiny  # noqa: E402

# `auto` stays on onnxruntime in every test (and in the processes tests start): it would take
# OpenVINO at f32 where a probe measures it faster, and images would differ by machine. The tests
# of OpenVINO ask for it by name or clear this.
os.environ[AUTO_ENV] = "0"
# transformers and diffusers log through a handler bound to the sys.stderr of the test that first
# imports them (capsys's, closed after it): a later warning there is a 'Logging error' traceback in
# another test's output. The references' warnings (torchvision missing) are not the tests' subject.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# and GGUF weights at accuracy level 0 (auto takes 4 on CPUs with VNNI); tests of level 4 ask for it
os.environ[AUTO_INT8_ENV] = "0"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """The tests' own cache folder (optimized graphs, adopted GGUF graphs), not the user's."""
    os.environ["EDGEDIFF_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory):
    """tiny_source(name) -> diffusers folder of the tiny config `name`."""
    built: dict[str, Path] = {}

    def get(name: str = "sd1") -> Path:
        if name not in built:
            built[name] = build_tiny(tmp_path_factory.mktemp(f"src-{name}") / name, name)
        return built[name]

    return get


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory, tiny_source):
    """tiny_package(name) -> converted edgediff package of the tiny config `name`."""
    from edgediff.convert import convert

    built: dict[str, Path] = {}

    def get(name: str = "sd1") -> Path:
        if name not in built:
            out = tmp_path_factory.mktemp(f"pkg-{name}") / name
            convert(tiny_source(name), out)
            built[name] = out
        return built[name]

    return get


@pytest.fixture(scope="session")
def default_package(tmp_path_factory):
    """The embedded default model, converted into a private cache."""
    from edgediff.convert import builtin_package as convert_default

    os.environ["EDGEDIFF_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return convert_default()
