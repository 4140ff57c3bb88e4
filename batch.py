"""`edgediff batch`: many images from a JSONL file of jobs, in this process or on a Ray cluster.

One line of the jobs file is one image, with the A1111 API's field names (those `edgediff serve`
reads: runtime.server's field checks and sampler names are used here as they are); the model's
defaults fill what a line leaves out. Line N (0-based) becomes `DIR/NNNNN.png` with its
parameters, written under a scratch name and renamed, and then one line in `DIR/results.jsonl`.
A run skips every line whose PNG is there with the sha256 results.jsonl holds for it, so the same
command run again after Ctrl-C, a crash or a bad line finishes the rest and redoes nothing.

With `ray=` (`--ray [ADDRESS]`) the images are made by Ray Data's `map_batches` over an actor pool,
each actor holding one model open; Ray is imported only then (`pip install 'edgediff[ray]'`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from edgediff.errors import EdgediffError, UsageError

RESULTS = "results.jsonl"
# the A1111 fields a line may set (the server's names): kind, lowest, highest
FIELDS = {
    "prompt": (str, None, None), "negative_prompt": (str, None, None), "seed": (int, -1, 2**32 - 1),
    "steps": (int, 1, 1000), "cfg_scale": (float, 0.0, 100.0), "width": (int, 8, 16384),
    "height": (int, 8, 16384), "sampler_name": (str, None, None), "scheduler": (str, None, None),
    "denoising_strength": (float, 0.0, 1.0), "init_images": (list, None, None), "model": (str, None, None),
}
# `generate --prompt-file`'s own names for the same fields, so its JSON lines run here as they are
ALIASES = {"guidance": "cfg_scale", "sampler": "sampler_name", "schedule": "scheduler"}


class JobError(UsageError):
    """A line of the jobs file that cannot run as written; the others still run."""


@dataclass(frozen=True)
class Job:
    """One line's image: what `Pipeline.generate` is called with, on which model."""

    index: int  # the 0-based line number: the image is DIR/{index:05d}.png
    model: str | None  # a package path, builtin:NAME, a foreign file; None: the embedded default
    arguments: dict  # Pipeline.generate's keywords (prompt and negative_prompt among them)
    digest: str  # the line's text and its model: a line edited since is not finished

    @property
    def line(self) -> int:
        return self.index + 1

    @property
    def file(self) -> str:
        return f"{self.index:05d}.png"


def parse_line(text: str, index: int, model: str | None, base: Path) -> Job:
    """One JSON line -> its Job. `model` is the run's (--model); a line's `model` and
    `init_images` paths are read relative to `base`, the jobs file's folder. A missing or -1 seed
    is drawn now, so results.jsonl records the one the image has."""
    from edgediff.runtime.server import UNIMPLEMENTED, ApiError, _field, sampler_choice

    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JobError(f"not valid JSON ({exc}); write one JSON object a line") from None
    if not isinstance(body, dict):
        raise JobError(f"a line is one JSON object with A1111's fields (got {type(body).__name__})")
    for name, a1111 in ALIASES.items():
        if name in body:
            if a1111 in body:
                raise JobError(f"'{name}' and '{a1111}' both given; they are the same field")
            body[a1111] = body.pop(name)
    for name in body:
        if name in UNIMPLEMENTED:
            raise JobError(f"edgediff does not implement A1111's '{name}'; leave it out")
        if name not in FIELDS:
            raise JobError(f"unknown field '{name}' (known: {', '.join(FIELDS)})")
    if "prompt" not in body:
        raise JobError("no 'prompt' field")
    try:
        got = {name: _field(body, name, kind, None, low, high) for name, (kind, low, high) in FIELDS.items()}
        sampler, schedule = sampler_choice(got["sampler_name"], got["scheduler"])
    except ApiError as exc:
        raise JobError(exc.detail) from None
    arguments = dict(prompt=got["prompt"], negative_prompt=got["negative_prompt"] or "", steps=got["steps"],
                     guidance=got["cfg_scale"], sampler=sampler, schedule=schedule, width=got["width"],
                     height=got["height"])
    seed = got["seed"]
    arguments["seed"] = random.randrange(2**32) if seed is None or seed == -1 else seed
    if got["init_images"] is not None:
        images = got["init_images"]
        if len(images) != 1 or not isinstance(images[0], str):
            raise JobError(f"'init_images' must be a list of one image file's path (got {images!r})")
        path = base / images[0]
        if not path.is_file():
            raise JobError(f"init_images: {path}: no such file")
        arguments["init_image"] = str(path)
        if got["denoising_strength"] is not None:
            if got["denoising_strength"] <= 0:
                raise JobError("'denoising_strength' must be above 0 for img2img")
            arguments["strength"] = got["denoising_strength"]
    line_model = got["model"]
    if line_model is not None and not line_model.startswith("builtin:"):
        line_model = str(base / line_model)
    chosen = line_model if line_model is not None else model
    digest = hashlib.sha256(f"{text.strip()}\n{chosen}".encode()).hexdigest()[:16]
    return Job(index, chosen, arguments, digest)


def read_jobs(path: str | Path, model: str | None = None) -> tuple[list[Job], list[tuple[int, str]]]:
    """The jobs of a JSONL file and its bad lines as (line number, what is wrong); blank lines
    count for the numbering and are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(f"JOBS {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"JOBS {path}: cannot be read as UTF-8 text ({exc})") from None
    jobs, bad = [], []
    for index, text in enumerate(lines):
        if not text.strip():
            continue
        try:
            jobs.append(parse_line(text, index, model, path.parent))
        except JobError as exc:
            bad.append((index + 1, str(exc)))
    if not jobs and not bad:
        raise UsageError(f"JOBS {path}: no jobs in it (one JSON object a line, with a 'prompt')")
    return jobs, bad


def by_model(jobs: Iterable[Job]) -> dict[str | None, list[Job]]:
    """Jobs grouped by model, in the order each model first appears: each model opens once."""
    groups: dict[str | None, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.model, []).append(job)
    return groups


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """`data` under a scratch name, then renamed over `path`: a reader (or a rerun after a kill)
    never sees half a file."""
    scratch = path.parent / f".{path.name}.partial-{os.getpid()}"
    try:
        with open(scratch, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        scratch.replace(path)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise


class Output:
    """The output folder: the images and results.jsonl, which only the running driver writes."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise UsageError(f"--output {self.folder}: is a file; give a folder")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--output {self.folder}: cannot be created ({exc})") from None
        self.results = self.folder / RESULTS
        for stale in self.folder.glob(".*.partial-*"):  # a run killed mid-write (SIGKILL) left it
            stale.unlink(missing_ok=True)

    def records(self) -> dict[int, dict]:
        """The latest record of each job index in results.jsonl (a line cut short by a kill is
        passed over)."""
        found: dict[int, dict] = {}
        if not self.results.is_file():
            return found
        for text in self.results.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(text)
                found[int(record["index"])] = record
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
        return found

    def finished(self, jobs: Iterable[Job]) -> set[int]:
        """The jobs whose PNG is there with the sha256 recorded for the same line and model."""
        records, done = self.records(), set()
        for job in jobs:
            record, path = records.get(job.index), self.folder / job.file
            if record and record.get("job") == job.digest and path.is_file() and sha256(path.read_bytes()) == record.get("sha256"):
                done.add(job.index)
        return done

    def write(self, job: Job, png: bytes, record: dict) -> dict:
        """The image (atomically), then its line in results.jsonl (flushed to disk)."""
        write_atomic(self.folder / job.file, png)
        record = {"index": job.index, "line": job.line, "file": job.file, "sha256": sha256(png), "job": job.digest,
                  **record}
        text = json.dumps(record) + "\n"
        with open(self.results, "ab+") as f:
            if f.tell():  # a line a kill cut short: the next one starts on its own line
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    text = "\n" + text
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())
        return record


def render(pipe, job: Job, init_image=None) -> tuple[bytes, dict]:
    """One job's PNG (the bytes `edgediff generate` writes for it) and what results.jsonl keeps
    of the run: seed, seconds, node, worker. `init_image` stands in for the job's file (Ray ships
    its bytes)."""
    from edgediff.runtime.image import encode

    if pipe.manifest.conditioning.image_encoder:
        raise UsageError(f"{pipe.package.name} makes videos ({pipe.manifest.family}); `edgediff batch` writes images: "
                         "make each video with `edgediff generate --model MODEL --init-image IMAGE --output clip.webp`")
    arguments = dict(job.arguments)
    if init_image is not None:
        arguments["init_image"] = init_image
    started = time.perf_counter()
    image = pipe.generate(**arguments)
    png = encode(image, "PNG", image.info["parameters"])
    return png, {"seed": arguments["seed"], "seconds": round(time.perf_counter() - started, 3),
                 "node": socket.gethostname(), "worker": f"{socket.gethostname()}:{os.getpid()}",
                 "model": job.model}


@dataclass
class Summary:
    """What a run did, line by line."""

    total: int = 0
    written: list[int] = field(default_factory=list)  # job indexes
    skipped: list[int] = field(default_factory=list)  # finished by an earlier run
    failed: list[tuple[int, str]] = field(default_factory=list)  # (line number, message)

    def line(self) -> str:
        parts = [f"{len(self.written)} written", f"{len(self.skipped)} already done"]
        if self.failed:
            numbers = ", ".join(str(n) for n, _ in sorted(self.failed)[:10])
            parts.append(f"{len(self.failed)} failed (line{'s' if len(self.failed) > 1 else ''} {numbers}"
                         f"{', ...' if len(self.failed) > 10 else ''})")
        left = self.total - len(self.written) - len(self.skipped) - len(self.failed)
        if left > 0:
            parts.append(f"{left} not run")
        return f"{self.total} jobs: " + ", ".join(parts)


Report = Callable[[str], None]


def _quiet(_message: str) -> None:
    pass


def run(jobs_file: str | Path, output: str | Path, *, model: str | None = None, device: str = "auto",
        threads: int | None = None, ray: str | bool | None = None, actors: int | None = None,
        say: Report = _quiet, on_record: Callable[[dict], None] | None = None, ship: bool | None = None) -> Summary:
    """Run a jobs file into `output`: in this process, or with `ray` (True or "": a local Ray, or
    the cluster RAY_ADDRESS names; a string: that cluster's address) on Ray Data. Bad lines and
    failed images are reported through `say` with their line numbers and counted in the summary;
    the others run. `on_record` sees each finished image's record as it is written; `ship` says
    whether packages go to Ray's workers through the object store (None: on clusters of several
    nodes, packages up to SHIP_LIMIT)."""
    jobs, bad = read_jobs(jobs_file, model)
    out = Output(output)
    summary = Summary(total=len(jobs) + len(bad), failed=list(bad))
    for number, message in bad:
        say(f"{jobs_file} line {number}: {message}")
    done = out.finished(jobs)
    summary.skipped = sorted(done)
    todo = [job for job in jobs if job.index not in done]
    if done:
        say(f"{len(done)} of {len(jobs)} jobs already done in {out.folder}; running the other {len(todo)}")

    def finished(job: Job, png: bytes, record: dict) -> None:
        record = out.write(job, png, record)
        summary.written.append(job.index)
        say(f"wrote {out.folder / job.file} (line {job.line}, seed {record['seed']}, {record['seconds']:.1f} s, "
            f"{record['node']})")
        if on_record is not None:
            on_record(record)

    def failed(job: Job, message: str) -> None:
        summary.failed.append((job.line, message))
        say(f"{jobs_file} line {job.line}: {message}")

    if not todo:
        return summary
    if ray is None or ray is False:
        run_here(todo, finished, failed, device=device, threads=threads, say=say)
    else:
        run_on_ray(todo, finished, failed, address=None if ray is True or ray == "" else ray, device=device,
                   threads=threads, actors=actors, say=say, ship=ship)
    return summary


def open_model(model: str | None, say: Report) -> Path:
    """The package that runs `model` (convert.adopt.runnable: a builtin converted once, a foreign
    file's cached graphs), made by the driver before any image."""
    from edgediff.convert.adopt import runnable

    return runnable(model, progress=lambda m: say(f"[convert] {m}"))


def run_here(jobs: list[Job], finished, failed, *, device: str, threads: int | None, say: Report) -> None:
    """The jobs in this process, one model at a time, each model opened once."""
    from edgediff.runtime import Pipeline

    for model, group in by_model(jobs).items():
        try:
            pipe = Pipeline(open_model(model, say), device=device, threads=threads, keep_loaded=True)
        except EdgediffError as exc:
            for job in group:
                failed(job, f"model {model or 'builtin (default)'}: {exc}")
            continue
        for job in group:
            try:
                png, record = render(pipe, job)
            except EdgediffError as exc:
                failed(job, str(exc))
                continue
            finished(job, png, record)
        for comp in pipe._components.values():
            comp.release()


class Worker:
    """A Ray Data actor: opens one model once, then turns rows of jobs into rows of PNGs. A job
    that fails with an EdgediffError comes back as its message (the run goes on); a worker that
    dies has its in-flight rows retried by Ray on a new actor."""

    def __init__(self, package: str, device: str, threads: int | None, shipped=None):
        from edgediff.runtime import Pipeline

        self.pipe, self.error = None, None
        try:
            if shipped is not None:  # the package through the object store: unpacked once per node
                import ray

                package = str(unpack(ray.get(shipped[0]), shipped[1], Path(package).name))
            self.pipe = Pipeline(package, device=device, threads=threads, keep_loaded=True)
        except EdgediffError as exc:  # every row says so (the driver opened it, so rarely: a node without it)
            self.error = f"model {package} on {socket.gethostname()}: {exc}"

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        pngs, records = [], []
        for payload, init in zip(batch["job"], batch["init"], strict=True):
            job = Job(**json.loads(payload))
            png, record = b"", {}
            try:
                if self.error:
                    raise EdgediffError(self.error)
                png, record = render(self.pipe, job, open_bytes(init) if init else None)
            except EdgediffError as exc:
                record = {"error": str(exc)}
            pngs.append(png)
            records.append(json.dumps({"index": job.index, **record}))
        return {"png": np.array(pngs, dtype=object), "record": np.array(records, dtype=object)}


SHIP_LIMIT = 1 << 30  # bytes: a package up to this size goes to other nodes through Ray's object store


def package_size(package: Path) -> int:
    return sum(p.stat().st_size for p in package.rglob("*") if p.is_file()) if package.is_dir() else package.stat().st_size


def pack(package: Path) -> tuple[bytes, str]:
    """A package folder or file as one uncompressed tar (weights do not compress), and its digest."""
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(package, arcname=package.name)
    data = buffer.getvalue()
    return data, sha256(data)[:16]


def unpack(data: bytes, digest: str, name: str) -> Path:
    """A shipped package, unpacked under this node's cache (once: the actors of a node share it;
    a scratch folder renamed into place, so none sees half of it)."""
    import shutil
    import tarfile
    import tempfile

    from edgediff.runtime.paths import cache_root

    home = cache_root() / "shipped" / digest
    if not home.is_dir():
        home.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=home.parent))
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                tar.extractall(scratch, filter="data")
            scratch.replace(home)
        except OSError:
            if not home.is_dir():  # not another actor of this node that got there first
                raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return home / name


def open_bytes(data: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


def _rows(group: list[Job]) -> list[dict]:
    """The rows Ray Data carries: each job as JSON, and an init image's file bytes (read here,
    so the workers need no access to it)."""
    rows = []
    for job in group:
        arguments = dict(job.arguments)
        init = arguments.pop("init_image", None)
        payload = json.dumps({"index": job.index, "model": job.model, "arguments": arguments, "digest": job.digest})
        rows.append({"job": payload, "init": Path(init).read_bytes() if init else b""})
    return rows


def start_ray(address: str | None, say: Report):
    """Ray, connected: the running session (a caller's own `ray.init`), the cluster at `address`,
    or a local one started for this run. Returns (ray, whether this run started it)."""
    from edgediff.errors import require

    ray = require("ray", "ray", "edgediff batch --ray")
    require("ray.data", "ray", "edgediff batch --ray")
    if ray.is_initialized():
        return ray, False
    import logging

    say(f"starting Ray ({'the cluster at ' + address if address else 'a local cluster, or RAY_ADDRESS'})")
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UsageError(f"--ray {address or ''}: cannot connect to Ray ({exc})") from None
    return ray, True


def run_on_ray(jobs: list[Job], finished, failed, *, address: str | None, device: str, threads: int | None,
               actors: int | None, say: Report, ship: bool | None = None) -> None:
    """The jobs on Ray Data, one model at a time: `map_batches` over a pool of actors that each
    open the model once (`threads` onnxruntime threads each, default 1; as many actors as the
    cluster has CPUs for, or `actors`), results written here as they stream back. On a cluster of
    several nodes (or with `ship`), a package up to SHIP_LIMIT goes to the actors through the
    object store and is unpacked once per node; larger ones are opened by path (a shared
    filesystem). An actor that
    dies is restarted and its rows run again (Ray Data's defaults: restarts and retries without
    limit)."""
    import logging

    ray, started = start_ray(address, say)  # ray.data imported with it
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = False  # each image as it finishes
    threads = threads or 1
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        for model, group in by_model(jobs).items():
            try:
                package = str(open_model(model, say))
            except EdgediffError as exc:
                for job in group:
                    failed(job, f"model {model or 'builtin (default)'}: {exc}")
                continue
            size = max(1, min(len(group), actors or cpus // threads))
            shipped = None
            if ship if ship is not None else nodes > 1 and package_size(Path(package)) <= SHIP_LIMIT:
                data, digest = pack(Path(package))
                shipped = (ray.put(data), digest)
            say(f"{len(group)} jobs of {package}{' (shipped through the object store)' if shipped else ''} on {size} "
                f"Ray actor{'s' if size > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}")
            by_index = {job.index: job for job in group}
            data = ray.data.from_items(_rows(group), override_num_blocks=len(group))
            images = data.map_batches(Worker, fn_constructor_kwargs=dict(package=package, device=device, threads=threads,
                                                                         shipped=shipped),
                                      batch_size=1, compute=ray.data.ActorPoolStrategy(size=size), num_cpus=threads)
            for row in images.iter_rows():
                record = json.loads(row["record"])
                job = by_index[record.pop("index")]
                if "error" in record:
                    failed(job, record["error"])
                else:
                    finished(job, row["png"], record)
    finally:
        if started:
            ray.shutdown()
