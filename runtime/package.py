"""Opening a package: the manifest, its scheduler config and tokenizers, and lazy components.

Two containers hold the same manifest: a folder (ONNX graphs in optimum's layout plus
`edgediff.json`) and a single `.gguf` file (tensors, and in `edgediff.*` metadata the manifest,
tokenizer files and each component's weight-less graph). A component whose graph is weight-less
gets its weights bound when its session opens (kernels.bind)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edgediff.errors import PackageError
from edgediff.manifest import Manifest
from edgediff.runtime.sessions import Component, SessionOptions

GGUF_MANIFEST = "edgediff.manifest"
GGUF_SCHEDULER = "edgediff.scheduler"
GGUF_TOKENIZER = "edgediff.tokenizer."  # + folder + "." + file name
GGUF_GRAPH = "edgediff.graph."  # + component


@dataclass
class Package:
    root: Path  # the folder, or the .gguf file
    manifest: Manifest
    scheduler_config: dict
    gguf: object | None = None  # runtime.gguf_file.GGUFFile of a single-file package
    _residency: dict = field(default_factory=dict, repr=False)  # expand -> residency(expand)

    @property
    def name(self) -> str:
        """What users call it: the .gguf file's or folder's name; for the cached package of a file
        another tool wrote (convert.adopt), that file's, not the cache folder's hash."""
        if self.gguf is not None:
            return self.root.stem
        adopted = self.manifest.source.get("files")
        if isinstance(adopted, list) and adopted and isinstance(self.manifest.source.get("path"), str):
            return Path(self.manifest.source["path"]).stem
        return self.root.name

    def _entry(self, name: str):
        entry = self.manifest.components.get(name)
        if entry is None:
            raise PackageError(
                f"{self.root}: the package has no '{name}' component "
                f"(it has: {', '.join(self.manifest.components)})"
            )
        return entry

    def component(self, name: str, options: SessionOptions, change=None) -> Component:
        """A component's lazy session. `change` (a LoRA: kernels.patch's Delta and Factors) changes
        its weights as the session opens: float weights in place; quantized ones too, or, with
        `options.lora_mode` 'branch', beside a low-rank branch each."""
        entry = self._entry(name)
        if change is not None and options.lora_mode != "branch":
            change = (change[0], None)
        how = {"expand": options.weights == "expanded", "accuracy_level": options.accuracy_level, "change": change}
        if self.gguf is not None:
            return Component(name, self.root, options, bind=lambda: self._bind(entry.file, self.gguf, component=name,
                                                                               **how))
        path = self.root / entry.file
        if entry.weights:
            return Component(name, path, options, bind=lambda: self._bind(
                path, open_weights(self.root / entry.weights, entry.weights_prefix), component=name, **how))
        if change is not None:
            return Component(name, path, options, bind=lambda: _changed(path, *change))
        return Component(name, path, options)

    def weight_names(self, name: str) -> dict[str, str]:
        """A component's weights: state-dict name (what a LoRA names it) -> the name it is stored
        under (a file tensor, or rows of one, for bound graphs)."""
        return self._lora_names(name)[0]

    def weight_parts(self, name: str) -> dict[str, list]:
        """A component's weights that hold parts of other layers: state-dict name -> those layers
        (a fused q/k/v; diffusers' to_q as rows of BFL's qkv): kernels.bind.lora_names."""
        return self._lora_names(name)[1]

    def _lora_names(self, name: str) -> tuple[dict[str, str], dict[str, list]]:
        from edgediff.kernels.bind import lora_names

        entry = self._entry(name)
        return lora_names(self._graph(entry.file if self.gguf is not None else self.root / entry.file)[0])

    def residency(self, expand: bool = False) -> dict[str, list]:
        """Per bound component, how each weight would be held (kernels.bind.Binding), without
        opening a session (what runtime.memory counts before every image: worked out once)."""
        if expand in self._residency:
            return self._residency[expand]
        out = self._residency[expand] = {}
        for name, entry in self.manifest.components.items():
            if self.gguf is not None:
                out[name] = self._bind(entry.file, self.gguf, expand, dry_run=True).bindings
            elif entry.weights:
                weights = open_weights(self.root / entry.weights, entry.weights_prefix)
                out[name] = self._bind(self.root / entry.file, weights, expand, dry_run=True).bindings
        return out

    def _graph(self, graph):
        """A component's graph (external data not loaded), where it is (for messages), and its
        stored bytes."""
        import onnx

        if self.gguf is not None:
            data, where = self.gguf.blob(graph), f"{self.root} ({graph})"
            if data is None:
                raise PackageError(f"{self.root}: metadata '{graph}' (a component's graph) is missing")
        else:
            data, where = Path(graph).read_bytes(), str(graph)
        try:
            return onnx.load_model_from_string(data), where, data
        except Exception as exc:  # protobuf's DecodeError and friends
            raise PackageError(f"{where}: the stored graph is not a valid ONNX model ({exc})") from exc

    def _bind(self, graph, weights, expand: bool = False, dry_run: bool = False, accuracy_level: int | dict = 0,
              change=None, component: str = ""):
        """The component's graph with its weights: the arrays bind makes come from (or go to) the
        repack cache, so a later open maps them instead of repacking (runtime.weight_cache)."""
        from edgediff.kernels.bind import bind, graph_name, is_placeholder, parse_rows_ref
        from edgediff.runtime.weight_cache import bind_mapped

        model, _, stored = self._graph(graph)
        delta, factors = change or (None, None)
        if factors is not None:  # block-format weights keep their blocks, beside a low-rank branch
            from edgediff.kernels.patch import add_branches

            blocks = {t.name: graph_name(t) for t in model.graph.initializer if is_placeholder(t)
                      and (w := weights.weight(parse_rows_ref(t.name)[0][0])) is not None and w.fmt.nbits}
            delta = _except(delta, add_branches(model, blocks, factors))
        if dry_run:
            return bind(model, weights.weight, str(weights.path), dry_run=True, expand=expand)
        bound = bind_mapped(model, weights, stored, component, expand=expand, accuracy_level=accuracy_level,
                            delta=delta)
        weights.drop_pages()
        return bound

    def tokenizer(self, folder: str):
        from edgediff.runtime.tokenizer import (
            TOKENIZER_FILES,
            load_clip_tokenizer,
            tokenizer_from_texts,
        )

        if self.gguf is None:
            return load_clip_tokenizer(self.root / folder)
        files = {n: text for n in TOKENIZER_FILES
                 if (text := self.gguf.string(f"{GGUF_TOKENIZER}{folder}.{n}")) is not None}
        return tokenizer_from_texts(files, f"{self.root} ({GGUF_TOKENIZER}{folder}.*)")


def _except(delta, names: set[str]):
    """`delta` for every weight but `names` (those given a branch instead)."""
    return lambda name, shape: None if name in names else delta(name, shape)


def _changed(path: Path, delta, factors=None):
    """An ONNX component with `delta` added to its weights (quantized ones given a low-rank
    branch instead, with `factors`). Changed weights the graph keeps in a data file are handed to
    onnxruntime in place of the file's; those inside the graph (and int4 ones, which NumPy
    cannot hold) are replaced there."""
    import numpy as np
    import onnx
    from onnx import TensorProto, numpy_helper

    from edgediff.kernels.bind import Bound, lora_names
    from edgediff.kernels.graph import weight_name
    from edgediff.kernels.patch import add_branches, changed_weights, quantized_weights

    model = onnx.load(str(path), load_external_data=False)
    # the plan names weights as LoRAs do; a graph in a file's own names knows them by those (BFL's)
    known = {weight_name(stored): name for name, stored in lora_names(model)[0].items()}
    if factors is not None:
        quantized = {init: known.get(name, name) for init, name in quantized_weights(model).items()}
        delta = _except(delta, add_branches(model, quantized, factors))
    planned = delta
    delta = lambda name, shape: planned(known.get(name, name), shape)  # noqa: E731
    external = {t.name for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    arrays, inline = {}, {}
    for name, value in changed_weights(model, path.parent, delta).items():
        if name in external and isinstance(value, np.ndarray):
            arrays[name] = value
        else:
            inline[name] = value if isinstance(value, TensorProto) else numpy_helper.from_array(value, name)
    for i, t in enumerate(model.graph.initializer):
        if t.name in inline:
            model.graph.initializer[i].CopyFrom(inline[t.name])
    return Bound(model, arrays, [], path.parent)


def open_weights(path: Path, prefix: str = ""):
    """A weight file a weight-less graph binds to (.gguf or .safetensors)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".gguf":
        from edgediff.runtime.gguf_file import GGUFFile

        return GGUFFile(path)
    if suffix == ".safetensors":
        from edgediff.runtime.safetensors_file import SafetensorsFile

        return SafetensorsFile(path, prefix)
    raise PackageError(f"{path}: weight files must be .gguf or .safetensors (got '{suffix}')")


def open_package(path: str | Path) -> Package:
    root = Path(path)
    if not root.exists():
        hint = ("edgediff.Pipeline (`from edgediff import Pipeline`) opens builtin models, converting them once"
                if str(path).startswith("builtin:") else "create one with `edgediff convert`")
        raise PackageError(f"{path}: no such package folder or .gguf file; {hint}")
    if root.is_file() and root.suffix.lower() == ".gguf":
        return _open_gguf(root)
    manifest = Manifest.read(root)
    for name, entry in manifest.components.items():
        for rel in (entry.file, *entry.data_files, *([entry.weights] if entry.weights else [])):
            if not (root / rel).is_file():
                raise PackageError(
                    f"{root}: component '{name}' is incomplete ({rel} is missing); re-run `edgediff convert`"
                )
    sched = root / "scheduler" / "scheduler_config.json"
    try:
        scheduler_config = json.loads(sched.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PackageError(f"{sched}: unreadable scheduler config ({exc}); re-run `edgediff convert`") from exc
    return Package(root, manifest, scheduler_config)


def _open_gguf(path: Path) -> Package:
    from edgediff.runtime.gguf_file import GGUFFile

    gguf = GGUFFile(path)
    text = gguf.string(GGUF_MANIFEST)
    if text is None:
        raise PackageError(
            f"{path}: a GGUF file without edgediff's metadata (written by {gguf.writer}); run it with "
            f"`edgediff generate --model {path}` (which builds its graphs once; from Python: "
            "edgediff.Pipeline(path)), or make a package of it: "
            f"edgediff convert {path} --output model.gguf"
        )
    manifest = Manifest.parse(text, f"{path} ({GGUF_MANIFEST})")
    try:
        scheduler_config = json.loads(gguf.string(GGUF_SCHEDULER) or "")
    except ValueError as exc:
        raise PackageError(f"{path}: unreadable scheduler config in '{GGUF_SCHEDULER}' ({exc})") from exc
    return Package(path, manifest, scheduler_config, gguf)
