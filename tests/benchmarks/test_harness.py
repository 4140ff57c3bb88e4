"""The harness end to end on a tiny model: JSON rows that validate, a Markdown table, a PNG
chart, a skipped peer reported as skipped, and quality against the reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from edgediff.benchmarks import peers
from edgediff.benchmarks.harness import run_scenario
from edgediff.benchmarks.report import aggregate, chart, markdown, validate_row
from edgediff.benchmarks.scenario import Scenario, load_scenario
from edgediff.errors import UsageError


@pytest.fixture
def fake_peer(monkeypatch):
    missing = peers.Peer("ghost-tool", "diffusers_torch", "fp32", ("no_such_module_edgediff",),
                         "pip install ghost-tool", True, "diffusers")
    monkeypatch.setitem(peers.PEERS, "ghost-tool", missing)
    return missing


def test_scenario_runs_end_to_end(tiny_source, tmp_path, monkeypatch, fake_peer):
    monkeypatch.setenv("EDGEDIFF_CACHE", str(tmp_path / "cache"))
    scenario = Scenario(name="t", model=str(tiny_source("sd1")), precisions=("fp32", "int8"), sizes=(64,),
                        steps=3, repeats=2, threads=1, prompts=("a red circle",),
                        peers=("diffusers-fp32", "ghost-tool"))
    out = tmp_path / "out"
    rows = run_scenario(scenario, out, progress=lambda msg: None)
    for row in rows:
        assert validate_row(row) == [], row
    by_label = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    assert set(by_label) == {"edgediff-fp32", "edgediff-int8", "diffusers-fp32", "ghost-tool"}
    assert by_label["ghost-tool"][0]["status"] == "skipped"
    assert "pip install ghost-tool" in by_label["ghost-tool"][0]["reason"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 6 and [r["label"] for r in ok[:3]] == ["edgediff-fp32", "edgediff-int8", "diffusers-fp32"]
    assert all(len(r["steps_s"]) == 3 and r["peak_rss_mb"] > 10 for r in ok)
    assert by_label["edgediff-fp32"][0]["quality"]["psnr_db"] == float("inf")
    assert by_label["diffusers-fp32"][0]["quality"]["psnr_db"] > 45  # same weights, same noise
    assert by_label["edgediff-fp32"][0]["load_warm_s"] > 0 and by_label["diffusers-fp32"][0]["load_warm_s"] is None
    saved = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert len(saved) == len(rows)

    first, second = by_label["edgediff-fp32"]
    assert not first["cold_load_cached"] and second["cold_load_cached"]  # the first run wrote the graph cache

    text = markdown(rows, "t")
    assert "| edgediff-int8 | 64 |" in text and "ghost-tool: skipped" in text
    assert "* cold load from the optimized-graph cache" not in text  # only where every run's was
    assert "from the optimized-graph cache" in markdown([r for r in rows if r.get("repeat") != 0], "t")
    path = chart(rows, out / "chart.png")
    with Image.open(path) as img:
        assert img.size[0] == 900 and img.size[1] > 100


def test_aggregate_pairs_rounds():
    base = {"status": "ok", "size": 64, "prompt_index": 0, "seed": 0, "text_encode_s": 0.1, "vae_decode_s": 0.1,
            "load_cold_s": 1.0, "peak_rss_mb": 100.0, "rss_peak_sampled_mb": 90.0, "provider": "x"}
    rows = []
    for repeat, (a, b) in enumerate([(2.0, 1.0), (4.0, 2.0)]):  # machine drift doubles round 2
        rows.append({**base, "label": "A", "repeat": repeat, "total_s": a, "steps_s": [a]})
        rows.append({**base, "label": "B", "repeat": repeat, "total_s": b, "steps_s": [b]})
    lines = {ln["label"]: ln for ln in aggregate(rows)}
    assert lines["B"]["speedup_vs_baseline"] == 2.0  # pairwise ratios cancel the drift
    assert lines["A"]["step_median_s"] == 3.0 and lines["A"]["step_min_s"] == 2.0
    assert math.isnan(lines["A"]["load_warm_s"])  # not measured is not zero


def test_schema_flags_problems():
    assert "missing 'cpu'" in validate_row({"status": "ok"})
    assert any("reason" in p for p in validate_row({"status": "skipped"}))


def test_scenario_files(tmp_path):
    good = load_scenario("sd15-512")
    assert good.model == "synthetic:sd15" and good.sizes == (512,) and "sdcpp-q4_0" in good.peers
    assert "diffusers-bf16" in load_scenario("sd15-256").peers
    bad = tmp_path / "bad.toml"
    for body, message in (('speed = 3', "unknown key 'speed'"), ('steps = "4"', "'steps' must be an integer"),
                          ('sampler = "warp"', "unknown sampler 'warp'"), ('sizes = [500]', "multiples of 8"),
                          ('threads = 0', "'threads' must be at least 1"), ('guidance = nan', "finite number"),
                          ('seeds = [0.5]', r"'seeds\[0\]' must be an integer")):
        bad.write_text(f'name = "x"\nmodel = "m"\n{body}\n')
        with pytest.raises(UsageError, match=message):
            load_scenario(bad)
    bad.write_text('name = "x"\nmodel = "m"\npeers = ["tensorrt"]\n')
    with pytest.raises(UsageError, match="unknown peer 'tensorrt'"):
        load_scenario(bad)
    bad.write_text('name = "x"\nmodel = "m"\nbatch = 4\n')
    with pytest.raises(UsageError, match="batch = 1"):
        load_scenario(bad)
    with pytest.raises(UsageError, match="no such scenario"):
        load_scenario(tmp_path / "missing.toml")


def test_gguf_configurations(tmp_path):
    """gguf-TYPE[:convs][@expanded|@int8]: checked when the scenario is read; stable-diffusion.cpp
    runs the very file of its gguf-* precision, or is skipped saying why."""
    from edgediff.benchmarks.harness import configurations, parse_configuration

    assert parse_configuration("gguf-q4_0:convs@expanded") == ("gguf", "q4_0", {"convs", "expanded"})
    assert parse_configuration("int4") == ("onnx", "int4", set())
    with pytest.raises(UsageError, match=r"unknown options \['fast'\]"):
        parse_configuration("gguf-q4_0@fast")
    with pytest.raises(UsageError, match="int8 apply to gguf-"):
        parse_configuration("int4@int8")
    assert parse_configuration("fp32:deepcache@cache3") == ("onnx", "fp32", {"deepcache", "cache3"})
    assert parse_configuration("int8-static@openvino") == ("onnx", "int8-static", {"openvino"})
    assert parse_configuration("int8-static:deepcache:taesd@cache3@openvino") == (
        "onnx", "int8-static", {"deepcache", "taesd", "cache3", "openvino"})
    with pytest.raises(UsageError, match="needs a package converted with :deepcache"):
        parse_configuration("fp32@cache3")
    with pytest.raises(UsageError, match="deepcache apply to ONNX"):
        parse_configuration("gguf-q8_0:deepcache")
    with pytest.raises(UsageError, match="unknown options"):
        parse_configuration("fp32@taesd")
    assert parse_configuration("fp32@tile512") == ("onnx", "fp32", {"tile512"})
    assert "sdcpp-gguf-q4_0" in load_scenario("gguf-512").peers
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nmodel = "m"\nprecisions = ["gguf-q4_0@quick"]\n')
    with pytest.raises(UsageError, match="unknown options"):
        load_scenario(bad)
    scenario = Scenario(name="t", model="m", precisions=("fp32", "gguf-q4_0@int8"), peers=("sdcpp-gguf-q4_0", "sdcpp-gguf-q8_0"))
    packages = {"fp32": tmp_path / "package-fp32", "gguf-q4_0": tmp_path / "q4.gguf",
                "gguf-q4_0@int8": tmp_path / "q4.gguf"}
    configs = {label: (cfg, reason) for label, cfg, reason in configurations(scenario, packages, tmp_path)}
    assert configs["edgediff-gguf-q4_0@int8"][0]["accuracy_level"] == 4
    assert configs["edgediff-gguf-q4_0@int8"][0]["cache_interval"] == 1
    assert configs["sdcpp-gguf-q4_0"][0]["gguf"] == str(tmp_path / "q4.gguf")
    assert "the scenario's precisions lack" in configs["sdcpp-gguf-q8_0"][1]


def test_full_size_dits_are_drawn_as_gguf_only(tmp_path, monkeypatch):
    """Full-size DiT scenarios name GGUF precisions (a 12B Flux at fp32 does not fit): anything
    else is refused before a file is drawn."""
    from edgediff.benchmarks.harness import prepare

    monkeypatch.setenv("EDGEDIFF_CACHE", str(tmp_path))
    for name in ("flux-schnell-512", "sd35-medium-512"):
        assert load_scenario(name).reference == "gguf-q4_0"
    scenario = Scenario(name="t", model="synthetic:flux-schnell", precisions=("gguf-q4_0",))  # reference fp32
    with pytest.raises(UsageError, match="GGUF files only.*got 'fp32'"):
        prepare(scenario, lambda _: None)
    assert not any(tmp_path.rglob("*.gguf"))


def test_a_run_past_the_timeout_is_stopped_and_reported(tmp_path):
    from edgediff.benchmarks.harness import run_worker

    slow = tmp_path / "slow-python"
    slow.write_text("#!/bin/sh\nsleep 30\n")
    slow.chmod(0o755)
    result = run_worker({"tool": "edgediff"}, str(slow), timeout=0.5)
    assert result["status"] == "failed" and "timed out" in result["error"]


def test_a_configuration_that_timed_out_is_not_run_again(tmp_path, monkeypatch):
    from edgediff.benchmarks import harness

    calls = []

    def worker(config, python=None, timeout=None):
        calls.append(config["tool"])
        return {"status": "failed", "timed_out": True, "error": "timed out after 1 s"}

    monkeypatch.setattr(harness, "run_worker", worker)
    monkeypatch.setattr(harness, "prepare", lambda scenario, progress, reconvert=False: (None, {"fp32": tmp_path}))
    scenario = Scenario(name="t", model="x", precisions=("fp32",), repeats=3)
    rows = harness.run_scenario(scenario, tmp_path / "out", progress=lambda msg: None)
    assert calls == ["edgediff"]
    assert [r["status"] for r in rows] == ["failed", "skipped", "skipped"]
    assert all(validate_row(r) == [] for r in rows)
    assert "timed out" in markdown(rows, "t")


def test_peers_keep_their_conversions_in_the_cache_not_in_the_source(tmp_path):
    from edgediff.benchmarks.harness import configurations

    source, cache = tmp_path / "model", tmp_path / "cache" / "bench" / "model-1234"
    scenario = Scenario(name="t", model=str(source), peers=("sdcpp-q8_0",))
    (cfg,) = [c for label, c, _ in configurations(scenario, {"fp32": cache / "package-fp32"}, source)
              if label == "sdcpp-q8_0"]
    assert cfg["work_dir"] == str(cache)


def test_packages_are_cached_until_reconvert_is_asked(tiny_source, tmp_path, monkeypatch):
    import edgediff.convert
    from edgediff.benchmarks.harness import prepare

    monkeypatch.setenv("EDGEDIFF_CACHE", str(tmp_path / "cache"))
    converted = []

    def convert(source, package, precision, overwrite, **options):
        assert not any(options.values())  # no :deepcache, :taesd or :convs asked
        converted.append(precision)
        package.mkdir(parents=True, exist_ok=True)
        (package / "edgediff.json").write_text("{}")

    monkeypatch.setattr(edgediff.convert, "convert", convert)
    scenario = Scenario(name="t", model=str(tiny_source("sd1")), precisions=("fp32", "int4"))
    prepare(scenario, progress=lambda msg: None)
    prepare(scenario, progress=lambda msg: None)
    assert converted == ["fp32", "int4"]
    prepare(scenario, progress=lambda msg: None, reconvert=True)
    assert converted == ["fp32", "int4", "fp32", "int4"]


def test_a_failed_bench_leaves_no_folder(tmp_path, capsys):
    from edgediff.cli import main

    scenario = tmp_path / "s.toml"
    scenario.write_text(f'name = "x"\nmodel = "{tmp_path / "no-such-model"}"\nrepeats = 1\n')
    out = tmp_path / "results"
    assert main(["bench", str(scenario), "--output", str(out)]) != 0
    assert "no-such-model" in capsys.readouterr().err and not out.exists()


def test_fewer_flops_configurations(tiny_source, tmp_path, monkeypatch):
    """':deepcache' converts the U-Net's shallow branch and '@cacheN' runs it; ':taesd' puts an
    AutoencoderTiny of TAESD's architecture (random weights) in the VAE's place."""
    from edgediff.benchmarks.harness import configurations, prepare
    from edgediff.manifest import Manifest

    monkeypatch.setenv("EDGEDIFF_CACHE", str(tmp_path / "cache"))
    scenario = Scenario(name="t", model=str(tiny_source("sd1")), precisions=("fp32", "fp32:deepcache@cache2", "fp32:taesd"))
    source, packages = prepare(scenario, progress=lambda msg: None)
    assert packages["fp32:deepcache@cache2"].name == "package-fp32-deepcache"
    assert "unet_shallow" in Manifest.read(packages["fp32:deepcache@cache2"]).components
    assert "unet_shallow" not in Manifest.read(packages["fp32"]).components
    taesd = json.loads((packages["fp32:taesd"].parent / "taesd" / "config.json").read_text())
    assert taesd["_class_name"] == "AutoencoderTiny" and taesd["decoder_block_out_channels"] == [64, 64, 64, 64]
    sizes = {p: (packages[p] / "vae_decoder" / "model.onnx").stat().st_size for p in ("fp32", "fp32:taesd")}
    assert sizes["fp32:taesd"] != sizes["fp32"]
    configs = {label: cfg for label, cfg, _ in configurations(scenario, packages, source)}
    assert configs["edgediff-fp32:deepcache@cache2"]["cache_interval"] == 2
    assert configs["edgediff-fp32:taesd"]["cache_interval"] == 1 and configs["edgediff-fp32:taesd"]["vae_tile"] == 0


def test_openvino_runs_beside_onnxruntime(tiny_source, tmp_path, monkeypatch):
    """'@openvino' runs the same package on OpenVINO in the same scenario, its row naming it."""
    pytest.importorskip("openvino")
    monkeypatch.setenv("EDGEDIFF_CACHE", str(tmp_path / "cache"))
    scenario = Scenario(name="t", model=str(tiny_source("sd1")), precisions=("fp32", "fp32@openvino"), sizes=(64,),
                        steps=2, threads=1, peers=())
    rows = {r["label"]: r for r in run_scenario(scenario, tmp_path / "out", progress=lambda msg: None)}
    assert rows["edgediff-fp32"]["provider"].startswith("onnxruntime ")
    assert rows["edgediff-fp32@openvino"]["provider"].startswith("openvino ")
    assert validate_row(rows["edgediff-fp32@openvino"]) == []
    assert rows["edgediff-fp32@openvino"]["quality"]["psnr_db"] > 60  # f32 on every CPU: measured 89 dB on the tiny sd1


def test_the_same_rows_on_ray(tiny_source, tmp_path, monkeypatch):
    """`bench --ray` on a local cluster: every run once, in its own process, the same images and
    rows as without Ray (timings aside), each row naming the CPU of the node that ran it."""
    pytest.importorskip("ray")
    monkeypatch.setenv("EDGEDIFF_CACHE", str(tmp_path / "cache"))
    scenario = Scenario(name="t", model=str(tiny_source("sd1")), precisions=("fp32", "int8-weights"), sizes=(64,),
                        steps=2, threads=1, prompts=("a red circle",), peers=())
    here = run_scenario(scenario, tmp_path / "here", progress=lambda msg: None)
    there = run_scenario(scenario, tmp_path / "ray", progress=lambda msg: None, ray=True)
    key = lambda r: (r["label"], r["status"], r["size"], r["seed"], r["repeat"])  # noqa: E731
    assert [key(r) for r in there] == [key(r) for r in here] and all(r["status"] == "ok" for r in there)
    for a, b in zip(here, there, strict=True):
        assert validate_row(b) == [] and b["cpu"] == a["cpu"]  # one node here: this machine
        assert (tmp_path / "ray" / "images" / Path(b["image"]).name).read_bytes() == Path(a["image"]).read_bytes()
