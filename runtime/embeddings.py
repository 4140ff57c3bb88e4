"""Textual inversion embeddings as A1111 uses them: files in a folder, each named in a prompt by its
file stem, each standing for as many new tokens as it has vectors.

A file holds one set of vectors ([vectors, width]: A1111's `string_to_param['*']` in a `.pt`,
`emb_params` in a `.safetensors`, a diffusers concept's one tensor) for a model with one CLIP text
encoder, or one per encoder for SDXL (`clip_l` for `text_encoder`, `clip_g` for `text_encoder_2`).
`.pt`/`.bin` files are read with runtime.pickle_tensors: only tensors, dicts, numbers and strings;
anything else is refused unrun (UnsafeFileError).

In a prompt, the embedding's name is found by its tokens, as A1111 finds it (the longest name at
each position), and its tokens are replaced by new ids past the tokenizer's vocabulary, one per
vector, which count against the 75-token chunk (runtime.text). The text encoder's graph looks those
ids up in the embeddings' vectors beside its own token table (`add_token_rows`): the table stays as
the package stores it (mapped from its file, in its block format for GGUF), and only the new rows
are handed to onnxruntime. T5 encoders read the name as the prompt's text.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgediff.errors import PackageError, SourceError, UsageError, arg
from edgediff.runtime.text import Words

SUFFIXES = (".safetensors", ".pt", ".bin")
# which encoder each of an SDXL embedding's sets is for (the diffusers layout's component names)
SETS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
SINGLE = "*"  # the key of a file's one set
_META = ("step", "sd_checkpoint", "sd_checkpoint_name")


@dataclass(frozen=True)
class Embedding:
    """One file's vectors by set ('*', or 'clip_l' and 'clip_g'): float32 arrays [vectors, width],
    or only their shapes when read without data; and what A1111's training wrote beside them."""

    name: str
    path: Path
    sets: Mapping[str, np.ndarray | tuple[int, int]]
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    @property
    def vectors(self) -> int:
        return _shape(next(iter(self.sets.values())))[0]

    @property
    def shape(self) -> int:
        """A1111's `shape`: the width, summed over an SDXL file's sets (768 + 1280 = 2048)."""
        return sum(_shape(v)[1] for v in self.sets.values())

    def a1111(self) -> dict:
        """As /sdapi/v1/embeddings lists it."""
        return {"step": self.step, "sd_checkpoint": self.sd_checkpoint,
                "sd_checkpoint_name": self.sd_checkpoint_name, "shape": self.shape, "vectors": self.vectors}


def _shape(v) -> tuple[int, int]:
    return tuple(v.shape) if isinstance(v, np.ndarray) else tuple(v)


def find(folder: str | Path) -> dict[str, Path]:
    """The embedding files in `folder` and below, by name (the file's stem, as A1111 names them);
    of two files with one stem, the first in path order."""
    folder = Path(folder)
    found: dict[str, Path] = {}
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        for fn in sorted(files):
            path = Path(root) / fn
            if path.suffix.lower() in SUFFIXES:
                found.setdefault(path.stem, path)
    return found


def read_embedding(path: str | Path, data: bool = True) -> Embedding:
    """An embedding file (.safetensors, or .pt/.bin through the restricted torch.save reader);
    without `data`, only the shapes of its vectors (nothing but headers is read)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        content = _read_safetensors(path, data)
    elif suffix in (".pt", ".bin"):
        from edgediff.runtime import pickle_tensors

        content = pickle_tensors.load(path, data=data)
    else:
        raise SourceError(f"{path}: embeddings are .safetensors, .pt or .bin files (got '{suffix or path.name}')")
    return _embedding(content, path)


def _read_safetensors(path: Path, data: bool) -> dict:
    from edgediff.kernels.gguf_blocks import dequantize
    from edgediff.runtime.pickle_tensors import Shape
    from edgediff.runtime.safetensors_file import SafetensorsFile

    file = SafetensorsFile(path)
    out: dict = {}
    for name, info in file.header.items():
        w = file.weight(name) if data else None
        if data and w is None:
            raise SourceError(f"{path}: tensor '{name}' is {info.dtype}; an embedding's vectors are floats "
                              "(F32, F16 or BF16)")
        out[name] = dequantize(w.data, w.fmt, w.shape) if data else Shape(info.shape, np.dtype(np.float32))
    return out


def _embedding(content, path: Path) -> Embedding:
    """The vectors of a file's contents, by the rules A1111 reads them with."""
    from edgediff.runtime.pickle_tensors import Shape

    def tensor(v) -> bool:
        return isinstance(v, (np.ndarray, Shape))

    if not isinstance(content, dict):
        raise SourceError(f"{path}: holds a {type(content).__name__}, not the dict of an embedding file")
    if "string_to_param" in content:  # A1111's and the original textual inversion's .pt
        params = content["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1 or not tensor(next(iter(params.values()))):
            raise SourceError(f"{path}: its string_to_param holds {len(params) if isinstance(params, dict) else 0} "
                              "tensors; an embedding file holds one (A1111 reads no other)")
        sets = {SINGLE: next(iter(params.values()))}
    elif "clip_l" in content and "clip_g" in content:  # SDXL's pair
        sets = {k: content[k] for k in ("clip_l", "clip_g")}
    else:  # A1111's .safetensors (`emb_params`) and diffusers' concepts: one tensor under any name
        tensors = {k: v for k, v in content.items() if tensor(v)}
        if len(tensors) != 1:
            listed = ", ".join(list(map(str, tensors))[:4]) or "none"
            raise SourceError(f"{path}: not an embedding file: it holds {len(tensors)} tensors ({listed}) where "
                              "an embedding has one (emb_params, string_to_param) or SDXL's clip_l and clip_g")
        sets = {SINGLE: next(iter(tensors.values()))}
    checked: dict = {}
    for key, v in sets.items():
        if not tensor(v):
            raise SourceError(f"{path}: '{key}' is a {type(v).__name__}, not a tensor of vectors")
        shape = tuple(v.shape)
        if len(shape) == 1:  # one vector (diffusers' concepts)
            shape = (1, *shape)
        if len(shape) != 2 or 0 in shape:
            raise SourceError(f"{path}: '{key}' has shape {list(v.shape)}; an embedding's vectors are "
                              "[vectors, width]")
        if isinstance(v, np.ndarray):
            if v.dtype.kind != "f":
                raise SourceError(f"{path}: '{key}' holds {v.dtype} numbers; an embedding's vectors are floats")
            v = v.reshape(shape).astype(np.float32)
            if not np.isfinite(v).all():
                raise SourceError(f"{path}: '{key}' holds NaN or Inf; the file is damaged")
        checked[key] = v if isinstance(v, np.ndarray) else shape
    counts = {_shape(v)[0] for v in checked.values()}
    if len(counts) > 1:
        raise SourceError(f"{path}: clip_l and clip_g hold {' and '.join(str(_shape(v)[0]) for v in checked.values())} "
                          "vectors; an SDXL embedding has as many for each encoder")
    meta = {k: content.get(k) for k in _META}
    return Embedding(path.stem, path, checked, step=meta["step"] if isinstance(meta["step"], int) else None,
                     **{k: str(meta[k]) if isinstance(meta[k], (str, int)) else None for k in _META[1:]})


def encoder_widths(package) -> dict[str, int]:
    """The width of each CLIP text encoder of a package (component -> width), read off its graph's
    `hidden_states` output without opening a session."""
    import onnx

    out = {}
    for entry in package.manifest.text_encoders:
        if entry.kind == "t5":
            continue
        file = package.manifest.components[entry.component].file
        if package.gguf is not None:
            model = onnx.load_model_from_string(package.gguf.blob(file) or b"")
        else:
            model = onnx.load(str(package.root / file), load_external_data=False)
        dims = next((o.type.tensor_type.shape.dim for o in model.graph.output if o.name == "hidden_states"), None)
        if not dims or not dims[-1].dim_value:
            raise PackageError(f"{package.root}: the {entry.component} graph says no width for its hidden states; "
                               "re-convert the model with this edgediff version")
        out[entry.component] = dims[-1].dim_value
    return out


def fit(emb: Embedding, widths: Mapping[str, int], model: str = "the model") -> dict[str, np.ndarray]:
    """The vectors each text encoder (component -> width) gets from `emb`, or a UsageError saying
    why it is not for this model: one set fits models whose every CLIP encoder has its width; an
    SDXL pair fits models with SDXL's second encoder (`clip_g`), the first taking `clip_l`."""
    where = f"embedding '{emb.name}' ({emb.path}, from {arg('embeddings_dir')})"
    have = ", ".join(f"{c} {w}" for c, w in widths.items()) or "none"
    if SINGLE in emb.sets:
        width = _shape(emb.sets[SINGLE])[1]
        wrong = [c for c, w in widths.items() if w != width]
        if not widths or wrong:
            pair = " (an SDXL model takes an embedding with clip_l and clip_g)" if len(widths) > 1 else ""
            raise UsageError(f"{where} has {width}-wide vectors, which fit no text encoder of {model} (its CLIP "
                             f"encoders' widths: {have}){pair}; use an embedding made for this model's family")
        return {c: emb.sets[SINGLE] for c in widths}
    if "text_encoder_2" not in widths:
        raise UsageError(f"{where} is an SDXL embedding (clip_l and clip_g), which fits no text encoder of "
                         f"{model} (its CLIP encoders' widths: {have}); use an embedding made for this model's family")
    out = {}
    for component, width in widths.items():
        key = SETS.get(component)
        got = _shape(emb.sets[key])[1] if key else None
        if got != width:
            raise UsageError(f"{where}: its {key or 'sets'} vectors are {got} wide where {model}'s {component} is "
                             f"{width}; use an embedding made for this model's family")
        out[component] = emb.sets[key]
    return out


def listing(folder: str | Path | None, package) -> dict:
    """A1111's /sdapi/v1/embeddings for a package: {"loaded": {name: {step, sd_checkpoint,
    sd_checkpoint_name, shape, vectors}}, "skipped": {...}}; skipped are those made for other
    models (and files that cannot be read, with their `error`). Only headers are read."""
    loaded, skipped = {}, {}
    if folder is None or not Path(folder).is_dir():
        return {"loaded": loaded, "skipped": skipped}
    widths = encoder_widths(package)
    for name, path in find(folder).items():
        try:
            emb = read_embedding(path, data=False)
        except SourceError as exc:
            skipped[name] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                             "vectors": None, "error": str(exc)}
            continue
        try:
            fit(emb, widths)
            loaded[name] = emb.a1111()
        except UsageError:
            skipped[name] = emb.a1111()
    return {"loaded": loaded, "skipped": skipped}


class Lookup:
    """Finds embedding names in a prompt's tokens, as A1111 does: at each position the longest
    name whose tokens start there."""

    def __init__(self, tok, names: Iterable[str]):
        self.by_first: dict[int, list[tuple[tuple[int, ...], str]]] = {}
        for name in names:
            ids = tuple(tok.encode(name, add_special_tokens=False).ids)
            if ids:
                self.by_first.setdefault(ids[0], []).append((ids, name))
        for found in self.by_first.values():
            found.sort(key=lambda x: len(x[0]), reverse=True)

    def at(self, ids: list[int], position: int) -> tuple[str, int] | None:
        """The name at `position` and how many tokens it spans."""
        for name_ids, name in self.by_first.get(ids[position], ()):
            if tuple(ids[position:position + len(name_ids)]) == name_ids:
                return name, len(name_ids)
        return None

    def names(self, ids: list[int]) -> list[str]:
        """Every name in `ids`, in order."""
        out, position = [], 0
        while position < len(ids):
            found = self.at(ids, position)
            if found is None:
                position += 1
                continue
            out.append(found[0])
            position += found[1]
        return out


@dataclass
class _Assigned:
    stamp: tuple
    offset: int  # its first new id, past the vocabulary
    vectors: int
    rows: dict[str, np.ndarray]  # per encoder component


@dataclass
class Vocabulary:
    """The embeddings of a folder that a pipeline's prompts have used: each one's new token ids
    (kept from image to image, so the text encoders reopen only when one is added or its file
    changes) and the rows they add to each encoder's token table."""

    folder: Path
    widths: Callable[[], dict[str, int]]  # the model's CLIP encoders (component -> width), asked once
    model: str = "the model"
    version: int = 0  # counts changes of `rows`
    _assigned: dict[str, _Assigned] = field(default_factory=dict)
    _widths: dict[str, int] | None = None
    _lookups: dict = field(default_factory=dict)

    def words(self, texts: Iterable[str], tokenizers: Mapping[str, object], body: int) -> dict[str, Words]:
        """Per CLIP encoder (component -> its tokenizer), what runtime.text.chunk_prompt replaces
        the embeddings' names in these texts with. Reads the embeddings the texts name (`body`: the
        most vectors one may have, a chunk's tokens), checks them against the model and gives them
        ids."""
        texts = list(texts)
        files = find(self.folder)
        if not files or not tokenizers:
            return {}
        lookups = {c: self._lookup(c, tok, files) for c, tok in tokenizers.items()}
        used = sorted({name for c, tok in tokenizers.items() for t in texts
                       for name in lookups[c].names(tok.encode(t, add_special_tokens=False).ids)})
        stamps = {name: _stamp(files[name]) for name in used}
        if any(name in self._assigned and self._assigned[name].stamp != stamp for name, stamp in stamps.items()):
            self._assigned.clear()  # a file changed: ids from scratch, for what these texts use
            self.version += 1
        for name in used:
            self._assign(name, files[name], stamps[name], body)
        out = {}
        for c, tok in tokenizers.items():
            first = tok.get_vocab_size(with_added_tokens=True)
            out[c] = self._replacer(lookups[c], first)
        return out

    def rows(self) -> dict[str, tuple[int, np.ndarray]]:
        """Per CLIP encoder, its token table's added rows (in id order, past the vocabulary)."""
        if not self._assigned:
            return {}
        order = sorted(self._assigned.values(), key=lambda a: a.offset)
        return {c: np.concatenate([a.rows[c] for a in order]).astype(np.float32) for c in order[0].rows}

    def _lookup(self, component: str, tok, files: Mapping[str, Path]) -> Lookup:
        key = (component, id(tok), tuple(files))
        if key not in self._lookups:
            self._lookups = {k: v for k, v in self._lookups.items() if k[0] != component}
            self._lookups[key] = Lookup(tok, files)
        return self._lookups[key]

    def _replacer(self, lookup: Lookup, first: int) -> Words:
        def replace(ids: list[int], position: int):
            found = lookup.at(ids, position)
            if found is None or found[0] not in self._assigned:
                return None
            a = self._assigned[found[0]]
            return list(range(first + a.offset, first + a.offset + a.vectors)), found[1]
        return replace

    def _assign(self, name: str, path: Path, stamp: tuple, body: int) -> None:
        if name in self._assigned:
            return
        if self._widths is None:
            self._widths = self.widths()
        emb = read_embedding(path)
        if emb.vectors > body:
            raise UsageError(f"embedding '{name}' ({path}, from {arg('embeddings_dir')}) has {emb.vectors} vectors, "
                             f"more than the {body} tokens of a prompt chunk; A1111 cannot use it either")
        rows = fit(emb, self._widths, self.model)
        offset = sum(a.vectors for a in self._assigned.values())
        self._assigned[name] = _Assigned(stamp, offset, emb.vectors, rows)
        self.version += 1


def _stamp(path: Path) -> tuple:
    """What says a file is still the one read."""
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


def with_rows(component, first: int, rows: np.ndarray):
    """A runtime.sessions.Component whose graph looks ids from `first` on up in `rows`."""
    from edgediff.kernels.bind import Bound

    inner = component.bind

    def bind():
        if inner is not None:
            bound = inner()
        else:  # an ONNX file: its external data stays where it is, read by onnxruntime
            import onnx

            bound = Bound(onnx.load(str(component.path), load_external_data=False), {}, [], component.path.parent)
        add_token_rows(bound.model, first, rows)
        return bound

    return dataclasses.replace(component, bind=bind)


ROWS = "textual_inversion.rows"
_ID_OPS = {"Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten"}  # what keeps ids ids


def _token_lookup(model) -> int:
    """The index of the node that looks tokens up in the table: a Gather along axis 0 of the
    graph's `input_ids` (reshaped or cast on the way, as torch's exporter writes it)."""
    from onnx import helper

    producer = {out: node for node in model.graph.node for out in node.output}

    def of_ids(name: str) -> bool:
        while name != "input_ids":
            node = producer.get(name)
            if node is None or node.op_type not in _ID_OPS:
                return False
            name = node.input[0]
        return True

    found = [i for i, n in enumerate(model.graph.node) if n.op_type == "Gather" and of_ids(n.input[1])
             and not any(a.name == "axis" and helper.get_attribute_value(a) != 0 for a in n.attribute)]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if len(found) != 1 or opset < 15:
        raise PackageError(f"the text encoder graph has {len(found)} token lookups (a Gather of input_ids) at "
                           f"opset {opset}, where embeddings need one at opset 15 or later; re-convert the model "
                           "with this edgediff version")
    return found[0]


def add_token_rows(model, first: int, rows: np.ndarray) -> None:
    """Rewrite the text encoder's token lookup (the Gather of `input_ids` from its token table) so
    that ids from `first` on read `rows` (float32 [n, width], cast to the table's type) and the
    others the table as it is stored (its file's mapping, its block format: nothing is copied):

        table ids = Min(ids, first - 1);  new ids = Max(ids - first, 0)
        out = Where(ids >= first, CastLike(Gather(rows, new ids), table rows), Gather(table, table ids))
    """
    from onnx import TensorProto, helper, numpy_helper

    nodes = list(model.graph.node)
    i = _token_lookup(model)
    gather = nodes[i]
    p = "/textual_inversion/"
    ids, out = gather.input[1], gather.output[0]

    def const(name: str, value: int, dims: tuple[int, ...] = ()):
        return helper.make_node("Constant", [], [p + name],
                                value=helper.make_tensor(p + name, TensorProto.INT64, dims, [value]))

    before = [
        const("first", first), const("last", first - 1), const("zero", 0), const("axes", -1, (1,)),
        helper.make_node("Cast", [ids], [p + "ids"], to=TensorProto.INT64),
        helper.make_node("Min", [p + "ids", p + "last"], [p + "table_ids"]),
        helper.make_node("Sub", [p + "ids", p + "first"], [p + "shifted"]),
        helper.make_node("Max", [p + "shifted", p + "zero"], [p + "new_ids"]),
        helper.make_node("GreaterOrEqual", [p + "ids", p + "first"], [p + "is_new"]),
    ]
    gather.input[1] = p + "table_ids"
    gather.output[0] = p + "table"
    after = [
        helper.make_node("Gather", [ROWS, p + "new_ids"], [p + "rows"], axis=0),
        helper.make_node("CastLike", [p + "rows", p + "table"], [p + "rows_cast"]),
        helper.make_node("Unsqueeze", [p + "is_new", p + "axes"], [p + "mask"]),
        helper.make_node("Where", [p + "mask", p + "rows_cast", p + "table"], [out]),
    ]
    del model.graph.node[:]
    model.graph.node.extend(nodes[:i] + before + [gather] + after + nodes[i + 1:])
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(rows, np.float32), ROWS))
