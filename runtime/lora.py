"""LoRA files as people download them, read without torch and matched to a package's weights.

Formats: kohya/A1111 (`lora_unet_*`, `lora_te_*`, SDXL's `lora_te1_*`/`lora_te2_*`, with
`.lora_down`/`.lora_up`/`.alpha`; LyCORIS LoCon on convolutions, with or without a Tucker
`lora_mid`; LoHa `hada_*` and LoKr `lokr_*`) and diffusers/PEFT (`lora_A`/`lora_B`, with or
without `unet.`/`text_encoder.`/`transformer.` prefixes). Module names may be diffusers' or the
original LDM ones (kohya's SDXL files), dotted or flattened with underscores: each graph weight
is known under all of them (`targets`).

A layer changes its weight by strength * (alpha / rank) * up @ down (LoHa: the elementwise
product of two such products; LoKr: a Kronecker product). `Plan` says, per component, which
weights change; kernels.patch and kernels.bind add the change where the graph stores the weight.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgediff.errors import SourceError, UsageError

# role suffixes, longest first (a key is MODULE + SUFFIX)
_ROLES = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid",
    ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".alpha": "alpha",
    ".hada_w1_a": "w1a", ".hada_w1_b": "w1b", ".hada_w2_a": "w2a", ".hada_w2_b": "w2b",
    ".hada_t1": "t1", ".hada_t2": "t2",
    ".lokr_w1": "k1", ".lokr_w1_a": "k1a", ".lokr_w1_b": "k1b", ".lokr_w2": "k2", ".lokr_w2_a": "k2a",
    ".lokr_w2_b": "k2b", ".lokr_t2": "kt2",
    ".dora_scale": "dora", ".lora_magnitude_vector": "dora",
}
_SUFFIXES = sorted(_ROLES, key=len, reverse=True)
# kohya's module prefixes -> the role of the component they change
_KOHYA = {"lora_unet_": "denoiser", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
          "lora_te2_": "text_encoder_2", "lora_te3_": "text_encoder_3"}
_PEFT = {"unet.": "denoiser", "transformer.": "denoiser", "base_model.model.": "denoiser",
         "diffusion_model.": "denoiser", "model.diffusion_model.": "denoiser",
         "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2", "text_encoder_3.": "text_encoder_3"}
_GRAPH_PREFIXES = ("unet.", "transformer.", "model.", "vae.")
_STRENGTH = re.compile(r"^(.*):([-+0-9.eE]+|nan|inf|-inf)$")


@dataclass(frozen=True)
class LoraRequest:
    """A LoRA file and the strength it is applied with."""

    path: Path
    strength: float = 1.0

    @classmethod
    def parse(cls, spec: str | Path | LoraRequest) -> LoraRequest:
        """'FILE' or 'FILE:STRENGTH' (a colon in the file name is kept when no number follows)."""
        if isinstance(spec, LoraRequest):
            return spec.checked()
        text = str(spec)
        m = _STRENGTH.match(text)
        path, strength = (m.group(1), float(m.group(2))) if m else (text, 1.0)
        return cls(Path(path), strength).checked()

    def checked(self) -> LoraRequest:
        if not math.isfinite(self.strength):
            raise UsageError(f"LoRA {self.path}: strength {self.strength} is not a finite number")
        if not self.path.is_file():
            raise UsageError(f"LoRA {self.path}: no such file")
        return self


@dataclass
class Layer:
    """One module's change as the file stores it: factor arrays by role (views into the file)."""

    key: str  # the module as the file names it
    component: str  # denoiser, text_encoder, text_encoder_2, text_encoder_3
    module: str  # the module name without the component prefix
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        roles = set(self.tensors)
        if "dora" in roles:
            return "dora"
        if roles & {"w1a", "w1b", "w2a", "w2b"}:
            return "loha"
        if roles & {"k1", "k1a", "k2", "k2a"}:
            return "lokr"
        return "lora"

    @property
    def rank(self) -> int:
        t = self.tensors
        if self.kind == "lora":
            return int(t["down"].shape[0])
        if self.kind == "loha":
            return int(t["w1b"].shape[0])
        if "k2b" in t:
            return int(t["k2b"].shape[0])
        return int(t["k1b"].shape[0]) if "k1b" in t else 0

    def scale(self) -> float:
        """alpha / rank (1 without alpha; LoKr with no low-rank factor is not scaled)."""
        alpha = self.tensors.get("alpha")
        if alpha is None or not self.rank:
            return 1.0
        return float(np.asarray(alpha, np.float32).reshape(-1)[0]) / self.rank

    def check(self, where: str) -> None:
        """The factors fit together (a damaged file or an unsupported variant is named here)."""
        t, kind = self.tensors, self.kind
        if kind == "dora":
            raise SourceError(f"{where}: '{self.key}' is DoRA (a weight-decomposed LoRA); edgediff applies "
                              "LoRA, LoCon, LoHa and LoKr, not DoRA")
        need = {"lora": ("down", "up"), "loha": ("w1a", "w1b", "w2a", "w2b")}.get(kind, ())
        missing = [r for r in need if r not in t]
        if kind == "lokr" and not (("k1" in t or {"k1a", "k1b"} <= set(t)) and ("k2" in t or {"k2a", "k2b"} <= set(t))):
            missing = ["lokr_w1/lokr_w2 factors"]
        if missing:
            raise SourceError(f"{where}: '{self.key}' lacks {', '.join(missing)}; the file is incomplete")
        if kind == "lora":
            down, up = t["down"], t["up"]
            mid = t.get("mid")
            inner = mid.shape[:2] if mid is not None else (down.shape[0], down.shape[0])
            if up.shape[1] != inner[0] or down.shape[0] != inner[1]:
                raise SourceError(f"{where}: '{self.key}' has mismatched ranks: up {list(up.shape)}, down "
                                  f"{list(down.shape)}{f', mid {list(mid.shape)}' if mid is not None else ''}")
        if kind == "loha" and ("t1" in t or "t2" in t):
            raise SourceError(f"{where}: '{self.key}' is a LoHa with Tucker factors (hada_t1/hada_t2), "
                              "which edgediff does not apply; use a LoHa trained without --use_tucker")
        if kind == "lokr" and "kt2" in t:
            raise SourceError(f"{where}: '{self.key}' is a LoKr with a Tucker factor (lokr_t2), which "
                              "edgediff does not apply")

    def factors(self, rows: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(up [out, r], down [r, in] or [r, in, kh, kw]): up @ down is the change (of `rows` of
        the output) before scaling. A Tucker `lora_mid` is folded into down (LoCon: a k x k
        convolution between 1 x 1 ones)."""
        t = self.tensors
        up = np.asarray(t["up"], np.float32).reshape(t["up"].shape[0], -1)
        if rows is not None:
            up = up[rows[0]:rows[1]]
        down = np.asarray(t["down"], np.float32)
        if "mid" in t:  # down'[i, c, h, w] = sum_j mid[i, j, h, w] * down[j, c]
            mid = np.asarray(t["mid"], np.float32)
            down = np.einsum("ijhw,jc->ichw", mid, down.reshape(down.shape[0], -1))
        return up, down

    def delta(self, shape: Sequence[int], rows: tuple[int, int] | None = None) -> np.ndarray:
        """The change of the weight of `shape` (torch layout; `rows` of the layer's output when
        the weight is part of a fused one), alpha / rank applied, strength not."""
        t, kind = self.tensors, self.kind
        if kind == "lora":
            up, down = self.factors(rows)
            d = up @ down.reshape(down.shape[0], -1)
        elif kind == "loha":
            f = {k: np.asarray(t[k], np.float32) for k in ("w1a", "w1b", "w2a", "w2b")}
            d = (f["w1a"] @ f["w1b"].reshape(f["w1b"].shape[0], -1)) * (f["w2a"] @ f["w2b"].reshape(f["w2b"].shape[0], -1))
        else:
            w1 = np.asarray(t["k1"], np.float32) if "k1" in t else np.asarray(t["k1a"], np.float32) @ np.asarray(t["k1b"], np.float32)
            if "k2" in t:
                w2 = np.asarray(t["k2"], np.float32)
            else:
                w2 = np.asarray(t["k2a"], np.float32) @ np.asarray(t["k2b"], np.float32).reshape(t["k2b"].shape[0], -1)
            w2 = w2.reshape(w2.shape[0], -1)
            d = np.kron(w1.reshape(w1.shape[0], -1), w2)
        if rows is not None and kind != "lora":
            d = d[rows[0]:rows[1]]
        if d.size != math.prod(shape):
            raise UsageError(f"LoRA layer '{self.key}' changes a weight of {d.size} values; the model's "
                             f"weight has shape {list(shape)}: the LoRA is for another model")
        return (d * np.float32(self.scale())).reshape(tuple(shape)).astype(np.float32, copy=False)


@dataclass
class Lora:
    """A LoRA file read: its layers by module key, the format, and the file's digest."""

    path: Path
    strength: float
    format: str
    layers: dict[str, Layer]
    metadata: dict[str, str]
    unknown: list[str] = field(default_factory=list)  # keys that are no LoRA part edgediff knows

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def ranks(self) -> list[int]:
        return sorted({layer.rank for layer in self.layers.values()})

    def components(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for layer in self.layers.values():
            out[layer.component] = out.get(layer.component, 0) + 1
        return out

    def family(self) -> str | None:
        """The base family the file's names and shapes point to (None: no telling)."""
        keys = " ".join(self.layers)
        if "double_blocks" in keys or "single_transformer_blocks" in keys or "single_blocks" in keys:
            return "flux"
        if "joint_blocks" in keys or "context_block" in keys or ".add_q_proj" in keys:
            return "sd3"
        if any(layer.component == "text_encoder_2" for layer in self.layers.values()):
            return "sdxl"
        for layer in self.layers.values():  # cross-attention keys take the text width
            if layer.kind == "lora" and re.search(r"attn2[._]to_[kv]$", layer.module):
                width = int(np.prod(layer.tensors["down"].shape[1:]))
                return {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl-refiner"}.get(width)
        return None

    def short_hash(self) -> str:
        """The digest A1111 records in `Lora hashes`: sha256 of the data after the header (the
        'addnet' hash), its first 12 hex digits."""
        import hashlib
        import struct

        digest = hashlib.sha256()
        with self.path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            fh.seek(8 + n)
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()[:12]


def is_lora(path: Path) -> bool:
    """Whether a safetensors file holds LoRA parts (rather than a model's weights)."""
    from edgediff.runtime.safetensors_file import read_safetensors_header

    header, _ = read_safetensors_header(path)
    return any(key.endswith(s) for key in header for s in _SUFFIXES)


def read_lora(request: LoraRequest | str | Path) -> Lora:
    """Read a LoRA file (safetensors only: a pickle is never unpickled)."""
    from edgediff.runtime.safetensors_file import SafetensorsFile

    req = LoraRequest.parse(request)
    path = req.path
    if path.suffix.lower() != ".safetensors":
        raise UsageError(f"LoRA {path}: only .safetensors LoRA files are read (a .ckpt/.pt/.bin file could run "
                         "code when loaded); convert it to safetensors first")
    file = SafetensorsFile(path)
    layers: dict[str, Layer] = {}
    unknown = []
    for key, info in file.header.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        module_key = key[: -len(suffix)] if suffix else None
        where = _component_of(module_key) if module_key else None
        if where is None:
            unknown.append(key)
            continue
        component, module = where
        layer = layers.setdefault(module_key, Layer(module_key, component, module))
        layer.tensors[_ROLES[suffix]] = _read(file, key, info)
    if not layers:
        raise SourceError(f"{path}: not a LoRA file (none of its {len(file.header)} tensors is a LoRA part: "
                          f"{', '.join(list(file.header)[:3]) or 'no tensors'}...); edgediff reads kohya/A1111, "
                          "LyCORIS and diffusers/PEFT LoRA files")
    for layer in layers.values():
        layer.check(str(path))
    kohya = any(k.startswith("lora_") for k in layers)
    kinds = {layer.kind for layer in layers.values()}
    fmt = "kohya" if kohya else "diffusers/PEFT"
    if "loha" in kinds or "lokr" in kinds:
        fmt = "LyCORIS " + "+".join(sorted(k for k in kinds if k != "lora"))
    elif any(layer.tensors["down"].ndim == 4 and layer.tensors["down"].shape[2:] != (1, 1) or "mid" in layer.tensors
             for layer in layers.values()):
        fmt = "LyCORIS LoCon" if kohya else fmt + " (convolutions)"
    return Lora(path, req.strength, fmt, layers, file.metadata, unknown)


def _read(file, key: str, info) -> np.ndarray:
    if info.dtype not in ("F32", "F16", "BF16"):
        raise SourceError(f"{file.path}: tensor '{key}' is {info.dtype}; LoRA factors are float")
    w = file.weight(key)
    from edgediff.kernels.gguf_blocks import dequantize

    return np.asarray(dequantize(w.data, w.fmt, info.shape), np.float32)


def _component_of(module_key: str) -> tuple[str, str] | None:
    for prefix, component in _KOHYA.items():
        if module_key.startswith(prefix):
            return component, module_key[len(prefix):]
    for prefix, component in _PEFT.items():
        if module_key.startswith(prefix):
            return component, module_key[len(prefix):]
    if module_key.startswith("lora_"):
        return None
    return "denoiser", module_key  # diffusers files of a denoiser alone carry no prefix


def _flat(name: str) -> str:
    return name.replace(".", "_")


Rows = tuple[int, int]
# a graph weight, the rows of the layer's change that go to it (the layer is a fused tensor the
# graph holds split), and the rows of the weight they change (the graph holds the layer fused)
Target = tuple[str, "Rows | None", "Rows | None"]


def targets(component: str, names: Mapping[str, str], denoiser: bool,
            parts: Mapping[str, Sequence[tuple[str, Rows | None, Rows]]] | None = None) -> dict[str, list[Target]]:
    """Every name a LoRA may give a weight of this component's graph -> the graph weights it
    changes (`names`: graph name -> the name of the tensor it is stored as). Only `.weight`
    tensors are targets; each is known dotted and flattened, with and without `text_model.` (text
    encoders), under its LDM name (U-Nets: kohya's SDXL files) and under its stored name (a DiT's
    fused q/k/v in a GGUF file: a LoRA of `img_attn.qkv` changes rows of to_q, to_k and to_v), and
    under the names of the layers a fused weight holds (`parts`: graph weight -> (layer weight,
    rows of that layer, rows of the graph weight); a LoRA of `to_q` changes rows of `qkv`)."""
    from edgediff.kernels.bind import parse_rows_ref

    names = {n: ref for n, ref in names.items() if n.endswith(".weight")}
    config = _unet_config(list(names)) if denoiser else None
    out: dict[str, list[Target]] = {}

    def add(alias: str, target: Target) -> None:
        for a in (alias, _flat(alias)):
            if target not in out.setdefault(a, []):
                out[a].append(target)

    for name, ref in names.items():
        module = _module(name)
        aliases = {module}
        if not denoiser:
            bare = module.removeprefix("text_model.")
            aliases |= {bare, "text_model." + bare}
        elif config is not None:
            from edgediff.kernels.ldm_names import unet_name

            with contextlib.suppress(KeyError, IndexError):  # a weight LDM files do not have
                aliases.add(_module(unet_name(module + ".weight", config)))
        for a in aliases:
            add(a, (name, None, None))
        pieces = parse_rows_ref(ref)
        if len(pieces) == 1 and ref != name:
            stored, start, end = pieces[0]
            add(_module(stored), (name, None if end == -1 else (start, end), None))
    for name, held in (parts or {}).items():
        for layer, rows, at in held:
            add(_module(layer), (name, rows, at))
    return out


def _module(name: str) -> str:
    module = name.removesuffix(".weight").removeprefix("model.diffusion_model.")  # LDM/BFL file names
    for p in _GRAPH_PREFIXES:
        module = module.removeprefix(p)
    return module


def _unet_config(names: list[str]) -> dict | None:
    """The parts of a diffusers UNet config its LDM names depend on, read off its weight names."""
    levels = {int(m.group(1)) for n in names if (m := re.search(r"(?:^|\.)down_blocks\.(\d+)\.", n))}
    per_block = {int(m.group(1)) for n in names if (m := re.search(r"(?:^|\.)down_blocks\.0\.resnets\.(\d+)\.", n))}
    if not levels or not per_block:
        return None
    up = ["CrossAttnUpBlock2D" if any(f"up_blocks.{i}.attentions." in n for n in names) else "UpBlock2D"
          for i in range(len(levels))]
    return {"layers_per_block": len(per_block), "block_out_channels": [0] * len(levels), "up_block_types": up}


@dataclass
class Change:
    """One layer of one LoRA applied to one graph weight (`rows` of the layer's change, when the
    weight is part of a fused tensor; to rows `at` of the weight, when the weight is fused)."""

    layer: Layer
    strength: float
    rows: Rows | None = None
    at: Rows | None = None  # the rows of the weight it changes, when not all of them


@dataclass
class Plan:
    """What the LoRAs change: per component, graph weight name -> the changes to add."""

    loras: list[Lora]
    changes: dict[str, dict[str, list[Change]]]

    def delta(self, component: str, name: str, shape: Sequence[int]) -> np.ndarray | None:
        """The summed change of a weight (torch layout `shape`), or None when nothing changes it."""
        changes = self.changes.get(component, {}).get(name)
        if not changes:
            return None
        total = np.zeros(tuple(shape), np.float32)
        for c in changes:
            start, end = c.at or (0, shape[0])
            total[start:end] += np.float32(c.strength) * c.layer.delta((end - start, *shape[1:]), c.rows)
        return total

    def factors(self, component: str, name: str, out: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """The changes of a weight of `out` rows as one low-rank pair (up [out, R], down [R, ...]),
        strengths and scales in up, ranks stacked; None when nothing changes it or a change is not
        low-rank (LoHa, LoKr)."""
        changes = self.changes.get(component, {}).get(name)
        if not changes or any(c.layer.kind != "lora" for c in changes) or (
                out is None and any(c.at for c in changes)):
            return None
        pairs = [c.layer.factors(c.rows) for c in changes]
        if len({down.shape[1:] for _, down in pairs}) > 1:
            return None
        ups = []
        for (up, _), c in zip(pairs, changes, strict=True):
            up = up * np.float32(c.strength * c.layer.scale())
            if c.at:  # the rows of a fused weight it changes; the others' rows of up are zero
                placed = np.zeros((out, up.shape[1]), np.float32)
                placed[c.at[0]:c.at[1]] = up
                up = placed
            ups.append(up)
        return np.concatenate(ups, axis=1), np.concatenate([down for _, down in pairs], axis=0)

    def for_component(self, component: str) -> tuple | None:
        """(`delta`, `factors`) for one component, or None when the LoRAs leave it as it is."""
        if not self.changes.get(component):
            return None
        return (lambda name, shape: self.delta(component, name, shape),
                lambda name, out=None: self.factors(component, name, out))

    def hashes(self) -> str:
        """A1111's `Lora hashes` text: "name: hash, name: hash"."""
        return ", ".join(f"{lora.name}: {lora.short_hash()}" for lora in self.loras)


def plan(loras: Sequence[Lora], weight_names: Mapping[str, Mapping[str, str]], denoiser: str, family: str,
         parts: Mapping[str, Mapping[str, Sequence]] | None = None) -> Plan:
    """Match each LoRA's layers to the package's weights (`weight_names`: component -> its graph's
    weight names -> their stored names). A LoRA for another family is refused with the reason; layers that match no
    weight are reported in one warning per file."""
    index = {c: targets(c, names, c == denoiser, (parts or {}).get(c)) for c, names in weight_names.items()}
    changes: dict[str, dict[str, list[Change]]] = {}
    for lora in loras:
        other = lora.family()
        if other and not _fits(other, family):
            raise UsageError(f"LoRA {lora.path}: it is for {other} models (from its names and shapes) but the "
                             f"model is {family}; use a LoRA trained for {family}")
        missed = []
        for layer in lora.layers.values():
            component = denoiser if layer.component == "denoiser" else layer.component
            found = index.get(component, {}).get(layer.module) or index.get(component, {}).get(_flat(layer.module))
            if not found:
                missed.append(layer.key)
                continue
            for name, rows, at in found:
                changes.setdefault(component, {}).setdefault(name, []).append(Change(layer, lora.strength, rows, at))
        if missed and len(missed) == len(lora.layers):
            raise UsageError(f"LoRA {lora.path}: none of its {len(missed)} layers matches a weight of this "
                             f"{family} model (first: {missed[0]}); it is for another model")
        if missed or lora.unknown:
            parts = []
            if missed:
                parts.append(f"{len(missed)} of its {len(lora.layers)} layers match no weight of the model "
                             f"({', '.join(missed[:3])}{', ...' if len(missed) > 3 else ''})")
            if lora.unknown:
                parts.append(f"{len(lora.unknown)} tensors are no LoRA part edgediff knows "
                             f"({', '.join(lora.unknown[:3])}{', ...' if len(lora.unknown) > 3 else ''})")
            warnings.warn(f"LoRA {lora.path}: {'; '.join(parts)}; they are not applied", RuntimeWarning, stacklevel=2)
    return Plan(list(loras), changes)


def _fits(lora_family: str, family: str) -> bool:
    """Distilled variants share their base family's weights (and LoRAs)."""
    base = {"sd-turbo": "sd2", "sdxl-turbo": "sdxl"}
    return base.get(family, family) == base.get(lora_family, lora_family)


_TAG = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")


def prompt_loras(prompt: str, folder: Path | None) -> tuple[str, list[LoraRequest]]:
    """A1111's `<lora:NAME:STRENGTH>` tags: the prompt without them, and the files they name,
    looked up as NAME.safetensors in `folder` (or below it)."""
    requests = []
    for m in _TAG.finditer(prompt):
        name, value = m.group(1).strip(), (m.group(2) or "1").strip()
        try:
            strength = float(value)
        except ValueError:
            raise UsageError(f"prompt tag {m.group(0)}: the strength '{value}' is not a number (write "
                             "<lora:NAME> or <lora:NAME:0.8>)") from None
        if Path(name).name != name or name in (".", ".."):
            raise UsageError(f"prompt tag {m.group(0)}: a LoRA is named by its file name in --lora-dir, "
                             "without folders")
        if folder is None:
            raise UsageError(f"prompt tag {m.group(0)}: give the folder of your LoRA files (--lora-dir) to "
                             "use <lora:...> tags")
        path = folder / f"{name}.safetensors"
        if not path.is_file():
            path = next(iter(sorted(folder.rglob(f"{name}.safetensors"))), path)
        if not path.is_file():
            raise UsageError(f"prompt tag {m.group(0)}: no {name}.safetensors in {folder}")
        requests.append(LoraRequest(path, strength).checked())
    return _TAG.sub("", prompt).strip(), requests
