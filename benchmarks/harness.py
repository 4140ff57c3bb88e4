"""Run a scenario: prepare the model once per precision, then every configuration in its own
worker process, alternating configurations run by run (A B A B) so machine drift cancels."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from edgediff import __version__
from edgediff.benchmarks import stats
from edgediff.benchmarks.peers import PEERS, missing
from edgediff.benchmarks.scenario import Scenario
from edgediff.errors import EdgediffError, UsageError
from edgediff.runtime.paths import cache_root

Progress = Callable[[str], None]


def system_info(threads: int | None) -> dict[str, object]:
    """What every row carries, so a figure can be traced to the machine and versions."""
    import onnxruntime

    cpu, flags = platform.processor() or platform.machine(), []
    try:
        text = Path("/proc/cpuinfo").read_text()
        field = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.split("\n\n")[0].splitlines())}
        # a virtual machine's model name can be just "AMD EPYC": the family and model say which generation
        cpu = f"{field['model name']} (family {field.get('cpu family')}, model {field.get('model')})"
        present = set(next(line for line in text.splitlines() if line.startswith("flags")).split())
        flags = [f for f in ("avx2", "fma", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
                 if f in present]
    except (OSError, StopIteration, KeyError):
        pass
    return {"edgediff": __version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
            "cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(), "threads": threads}


def peer_python(name: str, scenario: Scenario | None = None) -> Path:
    """The interpreter a peer runs in: the scenario's choice, its own environment under the
    cache (for peers whose packages clash with ours), or this one."""
    if scenario and name in scenario.peer_python:
        return Path(scenario.peer_python[name])
    if PEERS[name].venv:  # one environment per adapter module (sdcpp-f16/q8_0/q4_0 share one)
        return cache_root() / "peers" / PEERS[name].module / "bin" / "python"
    return Path(sys.executable)


def install_peer(name: str, progress: Progress) -> Path:
    """Create the peer's own environment: its packages, and this edgediff without dependencies."""
    if name not in PEERS:
        raise UsageError(f"unknown peer '{name}' (known: {', '.join(PEERS)})")
    peer = PEERS[name]
    if not peer.venv:
        raise UsageError(f"{name} runs in edgediff's own environment: {peer.install}")
    venv = cache_root() / "peers" / peer.module
    progress(f"creating {venv} with {' '.join(peer.venv)}")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, *peer.venv], check=True)
    subprocess.run([*pip, "--no-deps", "-e", str(Path(__file__).resolve().parents[1])], check=True)
    return venv / "bin" / "python"


def prepare(scenario: Scenario, progress: Progress, reconvert: bool = False) -> tuple[Path | None, dict[str, Path]]:
    """The diffusers folder peers load (if any) and one edgediff package per precision, converted
    once and cached (`reconvert` converts again, e.g. after the converter changed)."""
    from edgediff.convert import convert, resolve_source

    model = scenario.model
    if model.startswith("synthetic:"):
        from edgediff.benchmarks.synthetic import ARCHITECTURES, build
        from edgediff.benchmarks.synthetic_dit import DIT_ARCHITECTURES

        arch = model.split(":", 1)[1]
        if arch in DIT_ARCHITECTURES:
            return None, _synthetic_dit(scenario, arch, progress)
        if arch not in ARCHITECTURES:
            known = [*ARCHITECTURES, *DIT_ARCHITECTURES]
            raise UsageError(f"unknown synthetic model '{arch}' (known: {', '.join(known)})")
        base = cache_root() / "synthetic" / arch
        source = base / "diffusers"
        if not (source / "unet").is_dir():
            progress(f"building {model} (random weights, real architecture) in {source}")
            build(arch, source)
    else:
        source = resolve_source(model)
        if (source / "edgediff.json").is_file():  # an existing package: benchmark it as it is
            from edgediff.manifest import Manifest

            kinds = {c.precision for c in Manifest.read(source).components.values()}
            return None, {"/".join(sorted(kinds)): source}
        digest = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:12]
        base = cache_root() / "bench" / f"{source.name}-{digest}"
    packages = {}
    for precision in dict.fromkeys((scenario.reference, *scenario.precisions)):
        fmt, kind, options = parse_configuration(precision)
        stem = f"package-{precision.split('@')[0].replace(':', '-')}"
        package = base / (f"{stem}.gguf" if fmt == "gguf" else stem)
        if reconvert or not (package.is_file() or (package / "edgediff.json").is_file()):
            progress(f"converting {model} to {precision.split('@')[0]}")
            convert(source, package, precision=kind, overwrite=True, quantize_convolutions="convs" in options,
                    deep_cache="deepcache" in options, vae=synthetic_taesd(base) if "taesd" in options else None)
        packages[precision] = package
    return source, packages


def _synthetic_dit(scenario: Scenario, arch: str, progress: Progress) -> dict[str, Path]:
    """Full-size DiTs are drawn straight as the GGUF files edgediff writes (a 12B Flux would be
    48 GB at fp32), and their graphs built once, so runs time loading, not graph building."""
    from edgediff.benchmarks.synthetic_dit import write
    from edgediff.convert.adopt import adopted_package

    base = cache_root() / "synthetic" / arch
    packages = {}
    for precision in dict.fromkeys((scenario.reference, *scenario.precisions)):
        fmt, kind, _ = parse_configuration(precision)
        if fmt != "gguf":
            raise UsageError(f"synthetic:{arch} comes as GGUF files only; name gguf-q4_0 or gguf-q8_0 in "
                             f"precisions and reference (got '{precision}')")
        path = base / f"package-{precision}.gguf"
        if not path.is_file():
            progress(f"drawing synthetic:{arch} as {kind} into {path}")
            base.mkdir(parents=True, exist_ok=True)
            write(arch, path.with_suffix(".partial"), kind).rename(path)
        adopted_package(path, progress=progress)
        packages[precision] = path
    return packages


# options after the precision: at conversion (':name') and when running ('@name'), each for one format
CONVERT_OPTIONS = {"convs": "gguf", "deepcache": "onnx", "taesd": "onnx"}
RUN_OPTIONS = {"expanded": "gguf", "int8": "gguf", "cache": "onnx", "tile": "onnx",  # N: --cache-interval/--vae-tile
               "openvino": "onnx", "bf16": "onnx"}


def parse_configuration(name: str) -> tuple[str, str, set[str]]:
    """A scenario precision -> (format, precision, options). 'int4' is an ONNX package;
    'gguf-q4_0' a GGUF one. Conversion options: ':convs' (a GGUF's convolutions quantized too),
    ':deepcache' (the U-Net's shallow branch), ':taesd' (a tiny autoencoder, random weights, in
    the VAE's place); run options: '@expanded' (--weights expanded), '@int8' (--accuracy-level 4),
    '@cacheN' (--cache-interval N, with :deepcache), '@tileN' (--vae-tile N), '@openvino' (--device
    openvino, beside the scenario's device), '@bf16' (--precision bf16: OpenVINO's bf16); run options
    combine ('@cache3@openvino')."""
    base, *run = name.split("@")
    base, *convert_options = base.split(":")
    fmt = "gguf" if base.startswith("gguf-") else "onnx"
    unknown = sorted([o for o in convert_options if o not in CONVERT_OPTIONS]
                     + [r for r in run if _kind(r) not in RUN_OPTIONS])
    if unknown:
        raise UsageError(f"precision '{name}': unknown options {unknown} (known: :convs, :deepcache, :taesd, "
                         "@expanded, @int8, @cacheN, @tileN, @openvino, @bf16)")
    options = set(convert_options) | set(run)
    wrong = sorted(o for o in options if {**CONVERT_OPTIONS, **RUN_OPTIONS}[_kind(o)] != fmt)
    if wrong:
        raise UsageError(f"precision '{name}': {', '.join(wrong)} apply to "
                         f"{'gguf-*' if fmt == 'onnx' else 'ONNX'} precisions")
    if any(_kind(r) == "cache" for r in run) and "deepcache" not in options:
        raise UsageError(f"precision '{name}': @cacheN needs a package converted with :deepcache")
    return fmt, base.removeprefix("gguf-"), options


def _kind(option: str) -> str:
    """'cache3' -> 'cache', 'tile512' -> 'tile': the options that take a number."""
    match = re.fullmatch(r"(cache|tile)\d+", option)
    return match.group(1) if match else option


def _number(options: set[str], kind: str, default: int) -> int:
    return next((int(o.removeprefix(kind)) for o in options if _kind(o) == kind), default)


def synthetic_taesd(base: Path) -> Path:
    """A diffusers AutoencoderTiny of TAESD's architecture (the default config) with random
    weights: its cost is the real one, its image is not."""
    folder = base / "taesd"
    if not (folder / "config.json").is_file():
        import diffusers
        import torch

        torch.manual_seed(0)
        diffusers.AutoencoderTiny().save_pretrained(folder)
    return folder


def _sample_rss(proc: subprocess.Popen, peak: list[float]) -> None:
    """Peak resident memory of the worker, sampled every 50 ms from /proc."""
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    peak[0] = max(peak[0], int(line.split()[1]) / 1024)
        except OSError:
            break
        time.sleep(0.05)


def run_worker(config: dict, python: str = sys.executable, timeout: float | None = None) -> dict:
    # -P: the working folder stays off sys.path (from a checkout, its `kernels/` would shadow the
    # `kernels` package transformers imports)
    proc = subprocess.Popen([python, "-P", "-m", "edgediff.benchmarks.worker", json.dumps(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    peak = [0.0]
    sampler = threading.Thread(target=_sample_rss, args=(proc, peak), daemon=True)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as exc:  # a timeout or Ctrl-C: stop the worker and anything it started
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        sampler.join()
        if isinstance(exc, subprocess.TimeoutExpired):
            return {"status": "failed", "timed_out": True,
                    "error": f"timed out after {timeout:.0f} s (the scenario's timeout)"}
        raise
    sampler.join()
    if proc.returncode != 0:
        tail = (err or "").strip().splitlines()[-3:]
        return {"status": "failed", "error": " | ".join(tail)}
    result = json.loads(out.strip().splitlines()[-1])
    return {"status": "ok", "rss_peak_sampled_mb": round(peak[0], 1), **result}


def configurations(scenario: Scenario, packages: dict[str, Path], source: Path | None):
    """(label, worker config, skip reason) for edgediff at each precision and each peer."""
    out = []
    # where peers keep their own conversions: beside our packages in the cache, never in the source
    work_dir = next(iter(packages.values())).parent if packages else cache_root()
    for precision, package in packages.items():
        if precision == scenario.reference and precision not in scenario.precisions:
            continue
        options = parse_configuration(precision)[2]
        out.append((f"edgediff-{precision}", {"tool": "edgediff", "precision": precision, "package": str(package),
                                              "weights": "expanded" if "expanded" in options else "compact",
                                              "accuracy_level": 4 if "int8" in options else 0,
                                              "cache_interval": _number(options, "cache", 1),
                                              "vae_tile": _number(options, "tile", 0),
                                              **({"device": "openvino"} if "openvino" in options else {}),
                                              **({"run_precision": "bf16"} if "bf16" in options else {})}, None))
    for name in scenario.peers:
        peer = PEERS[name]
        python = peer_python(name, scenario)
        if python == Path(sys.executable):
            reason = missing(peer)
        else:
            reason = None if python.is_file() else (
                f"{name}: skipped, its environment {python.parent.parent} does not exist "
                f"(create it with: edgediff bench --install-peer {name})")
        if peer.source == "diffusers" and source is None:
            reason = f"{name}: skipped, the scenario's model is a package, not a diffusers folder"
        gguf = packages.get(peer.variant) if peer.source == "gguf" else None
        if peer.source == "gguf" and gguf is None:
            reason = f"{name}: skipped, it runs edgediff's {peer.variant} file, which the scenario's precisions lack"
        cfg = {"tool": name, "module": peer.module, "variant": peer.variant, "precision": peer.variant,
               "diffusers": str(source) if source else None, "python": str(python),
               "work_dir": str(work_dir), "gguf": str(gguf) if gguf else None}
        out.append((name, cfg, reason))
    return out


def run_scenario(scenario: Scenario, out_dir: Path, progress: Progress, reconvert: bool = False,
                 ray: str | bool | None = None) -> list[dict]:
    """Run every configuration of the scenario, each run in its own process; with `ray` (True: a
    local cluster, or an address) the runs go to the cluster's nodes, one at a time per node, and
    each row says the CPU of the node that ran it. The paths must be the same on every node."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(exist_ok=True)
    source, packages = prepare(scenario, progress, reconvert)
    info = system_info(scenario.threads)
    configs = configurations(scenario, packages, source)
    rows: list[dict] = []
    runs = out_dir / "runs.jsonl"
    common = {"scenario": scenario.name, "model": scenario.model, **info}
    for label, _cfg, reason in configs:
        if reason:
            progress(reason)
            rows.append({**common, "label": label, "status": "skipped", "reason": reason})
    live = [(label, cfg) for label, cfg, reason in configs if not reason]
    for label, cfg in live:
        module = PEERS[cfg["tool"]].module if cfg["tool"] in PEERS else None
        if module and hasattr(importlib.import_module(f"edgediff.benchmarks.peers.{module}"), "prepare"):
            progress(f"{label}: preparing its own conversion of the model")
            prep = run_worker({**cfg, "action": "prepare"}, cfg["python"])
            if prep["status"] != "ok":
                raise EdgediffError(f"{label}: preparing failed: {prep['error']}")
    jobs = []  # A B A B: every configuration once per round
    for size in scenario.sizes:
        for p, prompt in enumerate(scenario.prompts):
            for seed in scenario.seeds:
                for repeat in range(scenario.repeats):
                    for label, cfg in live:
                        image = out_dir / "images" / f"{label}-{size}-p{p}-s{seed}-r{repeat}.png"
                        config = {"device": scenario.device, **cfg, "size": size, "steps": scenario.steps,
                                  "sampler": scenario.sampler, "schedule": scenario.schedule,
                                  "guidance": scenario.guidance, "seed": seed, "prompt": prompt,
                                  "negative_prompt": scenario.negative_prompt, "threads": scenario.threads,
                                  "image": str(image)}
                        row = {**common, "label": label, "tool": cfg["tool"], "precision": cfg["precision"],
                               "size": size, "steps": scenario.steps, "prompt_index": p, "seed": seed,
                               "repeat": repeat}
                        jobs.append((config, cfg, row, f"{label} {size}x{size} prompt {p} seed {seed} round {repeat + 1}"))
    def record(job: tuple, result: dict) -> None:  # each row kept as it finishes
        _config, cfg, row, _what = job
        row = {**row, **result}
        if result["status"] == "ok":
            row["step_s"] = stats.summary(result["steps_s"])
            row["package_bytes"] = _package_bytes(cfg)
        rows.append(row)
        with runs.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    if ray:
        for job, result in zip(jobs, _on_ray(jobs, scenario, progress, ray), strict=True):
            record(job, result)
    else:
        _here(jobs, scenario, progress, record)
    add_quality(rows, f"edgediff-{scenario.reference}")
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out_dir / "scenario.json").write_text(json.dumps(asdict(scenario), indent=2))
    return rows


def _here(jobs: list, scenario: Scenario, progress: Progress, record: Callable[[tuple, dict], None]) -> None:
    """The runs one after another on this machine (a configuration that timed out is not run again)."""
    timed_out = set()
    for done, job in enumerate(jobs, 1):
        config, cfg, row, what = job
        progress(f"[{done}/{len(jobs)}] {what}")
        if row["label"] in timed_out:  # it would only spend the timeout again
            record(job, {"status": "skipped", "reason": f"{row['label']}: timed out in an earlier round"})
            continue
        result = run_worker(config, cfg.get("python", sys.executable), scenario.timeout)
        if result.get("timed_out"):
            timed_out.add(row["label"])
        record(job, result)


def _on_ray(jobs: list, scenario: Scenario, progress: Progress, address: str | bool) -> list[dict]:
    """The runs as Ray tasks that each ask for a whole node's CPUs (so a node runs one at a time
    and its timings stay clean), each in its own worker process as here; rows say the node's CPU."""
    from edgediff.errors import require

    ray = require("ray", "ray", "edgediff bench --ray")
    started = not ray.is_initialized()
    if started:
        ray.init(address=None if address is True else address, include_dashboard=False, log_to_driver=False)
    try:
        cpus = min(int(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n.get("Alive"))

        @ray.remote(num_cpus=cpus)
        def run(config: dict, python: str, timeout: float) -> dict:
            return {**run_worker(config, python, timeout), **{k: v for k, v in system_info(config["threads"]).items()
                                                              if k in ("cpu", "cpu_flags")}}

        progress(f"{len(jobs)} runs on Ray ({len(ray.nodes())} nodes, {cpus} CPUs a run)")
        return ray.get([run.remote(config, cfg.get("python", sys.executable), scenario.timeout)
                        for config, cfg, _row, _what in jobs])
    finally:
        if started:
            ray.shutdown()


def _package_bytes(cfg: dict) -> int | None:
    if cfg["tool"] != "edgediff":
        return None
    from edgediff.manifest import Manifest

    package = Path(cfg["package"])
    if package.is_file():  # a GGUF package: the file
        return package.stat().st_size
    return sum(c.bytes for c in Manifest.read(package).components.values())


def add_quality(rows: list[dict], reference: str) -> None:
    """PSNR/SSIM of each image against the reference configuration's image of the same size,
    prompt and seed, for tools that start from the same noise; LPIPS where it is installed."""
    from PIL import Image

    refs = {(r["size"], r["prompt_index"], r["seed"]): r["image"] for r in rows
            if r.get("label") == reference and r.get("status") == "ok" and r.get("repeat") == 0}
    for row in rows:
        if row.get("status") != "ok":
            continue
        same_noise = row["tool"] == "edgediff" or PEERS[row["tool"]].same_noise
        ref = refs.get((row["size"], row["prompt_index"], row["seed"]))
        if not same_noise or ref is None:
            row["quality"] = None
            continue
        with Image.open(ref) as a, Image.open(row["image"]) as b:
            a, b = a.convert("RGB"), b.convert("RGB")
            row["quality"] = {"reference": reference, "psnr_db": stats.psnr(a, b), "ssim": stats.ssim(a, b)}


def check_runnable(scenario: Scenario) -> None:
    if scenario.device == "cuda":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise EdgediffError("the scenario asks for device = 'cuda' but onnxruntime has no CUDA provider here")
    if scenario.device == "openvino" or any("openvino" in parse_configuration(p)[2] for p in scenario.precisions):
        from edgediff.runtime import openvino_session

        openvino_session.require()  # says how to install it
