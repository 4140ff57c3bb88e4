"""Converters: a diffusers folder or single-file checkpoint -> an edgediff package.

Needs the `convert` extra (torch, diffusers, transformers, onnx) for exporting; reading headers
(`open_source`, family detection, `inspect`) works without it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from edgediff import __version__
from edgediff.convert.package import _component_entry, write_manifest
from edgediff.convert.sources import Source, open_source
from edgediff.errors import SourceError, UsageError
from edgediff.families import (
    FAMILIES,
    Family,
    detect_family,
    get_family,
)
from edgediff.manifest import MANIFEST, Manifest
from edgediff.runtime.paths import cache_root

__all__ = ["convert", "builtin_package", "open_source", "resolve_family", "Source"]

CALIBRATION_PROMPTS = (  # varied subjects, styles and lengths, for int8 activation ranges
    "a photograph of a lighthouse on a rocky coast at sunset, dramatic clouds",
    "portrait of an old man with a beard, oil painting, detailed",
    "a red circle on a blue background",
    "isometric illustration of a tiny city, vibrant colours, clean lines",
    "a bowl of fruit on a wooden table, soft window light",
    "",
)

DEFAULT_MODEL = "tiny-sd1"
ALL_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae_decoder",
                  "vae_encoder")
FORMATS = ("onnx", "gguf")
BUILTIN = Path(__file__).parent / "builtin"



def resolve_source(spec: str | Path) -> Path:
    """A path, or `builtin:NAME` for a model shipped inside edgediff."""
    text = str(spec)
    if text.startswith("builtin:"):
        name = text.split(":", 1)[1]
        path = BUILTIN / name
        if not path.is_dir():
            known = ", ".join(sorted(p.name for p in BUILTIN.iterdir())) if BUILTIN.is_dir() else "none"
            raise UsageError(f"unknown builtin model '{name}' (available: {known})")
        return path
    return Path(spec)


_SAME_WEIGHTS = {"sd-turbo": "sd2", "sdxl-turbo": "sdxl"}  # distilled variants, told apart only by --family


def resolve_family(source: Source, family: str = "auto") -> tuple[Family, str]:
    """The family to convert as: detected from the tensors' shapes, or forced with --family
    (refused when the shapes say another family). U-Nets that take other inputs than the
    family's latent (or an inpainting model's latent, mask and masked image's latent) are refused
    here, not inside onnxruntime later."""
    where = str(source.path)
    if family != "auto":
        forced = get_family(family)
        try:
            detected, _ = detect_family(source.shapes, where)
        except SourceError:
            return forced, "forced"  # shapes no family claims: the user's word stands
        if _SAME_WEIGHTS.get(detected.name, detected.name) != _SAME_WEIGHTS.get(forced.name, forced.name):
            raise SourceError(f"{where}: --family {family} does not fit this file: its tensors are "
                              f"{detected.name}'s ({detected.title}); drop --family or give --family {detected.name}")
        _check_inputs(source, forced)
        return forced, "forced"
    fam, layout = detect_family(source.shapes, where)
    _check_inputs(source, fam)
    return fam, layout


def _check_inputs(source: Source, fam: Family) -> None:
    if fam.denoiser != "unet" or fam.video is not None:  # SVD's takes the conditioning frame's latent too
        return
    for name in ("unet.conv_in.weight", "model.diffusion_model.input_blocks.0.0.weight"):
        shape = source.shapes.get(name)
        # an inpainting U-Net takes the latent, the mask and the masked image's latent (9 for SD)
        if shape is not None and len(shape) == 4 and shape[1] not in (fam.latent.channels,
                                                                       2 * fam.latent.channels + 1):
            raise SourceError(f"{source.path}: its U-Net takes {shape[1]} input channels ({name}), not the "
                              f"{fam.latent.channels} latent channels of {fam.title} (or "
                              f"{2 * fam.latent.channels + 1} of an inpainting model): a variant edgediff does "
                              "not run yet (it runs text-to-image, image-to-image and inpainting models)")


def convert(
    source: str | Path,
    output: str | Path,
    *,
    fmt: str | None = None,
    precision: str | None = None,
    family: str = "auto",
    prediction: str | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    rules: Sequence[str] = (),
    progress: Callable[[str], None] | None = None,
    base: str | Path | None = None,
    vae: str | Path | None = None,
    text_encoders: Sequence[str | Path] = (),
    quantize_convolutions: bool = False,
    deep_cache: bool = False,
) -> Manifest:
    """Convert `source` into a package at `output`, atomically; returns its manifest.

    `fmt` is 'onnx' (a folder) or 'gguf' (one file; the default when `output` ends in .gguf).
    `precision` is one name ('int8', or for GGUF 'q4_0') or per component ('unet=int4,vae=fp16');
    `rules` are 'REGEX=PRECISION' overrides of which weights keep high precision.

    A GGUF source (and `base`, `vae`, `text_encoders`, which supply the components it lacks)
    written to GGUF without a `precision` keeps every tensor as stored; otherwise it is
    dequantized and converted as any checkpoint. `quantize_convolutions` (GGUF) stores convolution
    weights in the block type too, in ComfyUI-GGUF's reshaped layout, which stable-diffusion.cpp
    cannot read. `deep_cache` also writes the U-Net's shallow branch, for DeepCache-style reuse of
    its deep features across steps (`generate --cache-interval N`)."""
    from edgediff.convert.package import atomic_folder, check_output
    from edgediff.convert.precision import parse_precision
    from edgediff.kernels.policy import Rule

    output = Path(output)
    fmt = fmt or ("gguf" if output.suffix.lower() == ".gguf" else "onnx")
    if fmt not in FORMATS:
        raise UsageError(f"unknown --format '{fmt}'; this version writes: {', '.join(FORMATS)}")
    if quantize_convolutions and fmt != "gguf":
        raise UsageError("--quantize-convolutions applies to --format gguf")
    if deep_cache and fmt != "onnx":
        raise UsageError("--deep-cache writes an ONNX package (a GGUF package has no graph for the shallow branch)")
    if fmt == "gguf" and output.suffix.lower() != ".gguf":
        raise UsageError(f"--output {output}: a GGUF package is one file; name it NAME.gguf")
    parsed_rules = [Rule.parse(r) for r in rules]
    _check_rules(parsed_rules, fmt)
    keep_types = precision is None
    precision = precision or "fp32"
    parse_precision(precision, ALL_COMPONENTS, fmt)  # usage errors before any file is read
    if family != "auto" and family not in FAMILIES:
        get_family(family)
    if prediction not in (None, "eps", "v"):
        raise UsageError(f"unknown --prediction '{prediction}'; choose eps or v")
    check_output(output, overwrite)
    src_path = resolve_source(source)
    from edgediff.convert.controlnet import convert_controlnet, is_controlnet

    if is_controlnet(src_path):  # a package of one component, for the family it steers
        if base or vae or text_encoders or deep_cache or family != "auto":
            raise UsageError(f"{src_path}: a ControlNet is converted on its own; drop --base, --vae, --text-encoder, "
                             "--deep-cache and --family")
        return convert_controlnet(src_path, output, fmt=fmt, precision=precision, rules=parsed_rules,
                                  overwrite=overwrite, progress=progress)
    from edgediff.convert.load import ldm_vae_file

    # a VAE in diffusers' form (or beside a diffusers folder) is swapped in after loading; an LDM
    # file is one more weight source of the single-file model
    swap_vae = vae is not None and (src_path.is_dir() or not ldm_vae_file(Path(vae)))
    parts = {"base": base and Path(base), "vae": None if swap_vae else vae and Path(vae),
             "text_encoders": [Path(p) for p in text_encoders]}
    if src_path.suffix.lower() == ".gguf" or any(parts.values()):
        from edgediff.convert import adopt

        if fmt == "gguf" and keep_types:
            if swap_vae:
                raise UsageError(f"--vae {vae}: a VAE in diffusers' form is converted, not kept as stored; "
                                 "give --precision (f16, q8_0, ...)")
            return adopt.write_adopted_gguf(src_path, output, family=family, prediction=prediction,
                                            overwrite=overwrite, progress=progress, **parts)
    src = open_source(src_path, allow_pickle=allow_pickle)
    fam, layout = resolve_family(src, family)
    components = fam.components
    precisions = parse_precision(precision, components, fmt)
    if deep_cache and fam.denoiser != "unet":
        raise UsageError(f"--deep-cache reuses a U-Net's deep features; {fam.title} has a transformer: "
                         "convert it without --deep-cache")
    from edgediff.convert import adopt
    from edgediff.convert.build import vae_graphs

    files = layout == "ldm" and src.kind in ("safetensors", "gguf", "checkpoint")
    given = vae_graphs(Path(vae), fam, fam.latent.scale, fam.latent.shift, fam.latent.channels,
                       fam.latent.downscale) if swap_vae and files else None
    if fmt == "gguf" and files:  # the files hold the very tensors of the GGUF file
        return adopt.write_adopted_gguf(src_path, output, family=family, prediction=prediction, precision=precision,
                                        rules=parsed_rules, overwrite=overwrite, progress=progress,
                                        reshape=quantize_convolutions, allow_pickle=allow_pickle, given_vae=given,
                                        **parts)
    if progress:
        progress(f"reading {src.kind} source ({fam.title}, {layout} layout)")
    if files:  # graphs built in the files' own names, each weight written from them as fp32
        adopted = adopt.adopt(src_path, family=family, prediction=prediction, own_vae=not swap_vae,
                              allow_pickle=allow_pickle, **parts)
        if given:
            adopted.info["vae"] = str(vae)
        precisions = _uncalibrated(fam, precision, parse_precision(precision, components, fmt, full_precision_components(
            fam, fam.vae_fp16 or bool(given and given.half_safe))), progress)
        if deep_cache:
            precisions["unet_shallow"] = precisions["unet"]
        with atomic_folder(output, overwrite) as tmp:
            manifest = adopt._graphs(adopted, tmp, progress, deep_cache, weights=True, vae=given)
            if any(p != "fp32" for p in precisions.values()):
                manifest = _apply_precisions(tmp, manifest, precisions, parsed_rules, progress)
                (tmp / MANIFEST).write_text(manifest.to_json())
        return manifest
    if src.kind == "diffusers":
        return _convert_folder(src, fam, layout, output, fmt, precision, parsed_rules, overwrite=overwrite,
                               progress=progress, prediction=prediction, deep_cache=deep_cache,
                               quantize_convolutions=quantize_convolutions, vae=Path(vae) if swap_vae else None)
    raise SourceError(f"{src_path}: a {src.kind} file in {layout} names; edgediff converts diffusers folders and "
                      "single files in the original layouts (LDM/SGM, BFL, Stability's)")


def _convert_folder(src: Source, fam: Family, layout: str, output: Path, fmt: str, precision: str, rules, *,
                    overwrite: bool, progress, prediction: str | None, deep_cache: bool,
                    quantize_convolutions: bool, vae: Path | None = None) -> Manifest:
    """A diffusers folder's package from graphs built from its configs and shapes (convert.build):
    to ONNX with each weight written from the folder's files in turn, or to GGUF with each tensor
    read, quantized and written in turn (a 12B Flux never in memory whole)."""
    from edgediff.convert import build
    from edgediff.convert.package import atomic_file, atomic_folder
    from edgediff.convert.precision import parse_precision

    configs = build.folder_configs(src.path, fam)
    arch = build.folder_architecture(src.path, fam, configs, prediction)
    vae_half = fam.vae_fp16 or configs["vae"].get("force_upcast", True) is False  # SDXL's fp16-fix VAE
    given = None
    if vae is not None:  # a VAE given apart (`--vae`) in the model's own's place
        given = build.vae_graphs(vae, fam, arch.latent_scale, arch.latent_shift, arch.latent_channels,
                                 arch.vae_downscale)
        arch, vae_half = dataclasses.replace(arch, info={**arch.info, "vae": str(vae)}), fam.vae_fp16 or given.half_safe
    precisions = _uncalibrated(fam, precision, parse_precision(precision, fam.components, fmt,
                                                              full_precision_components(fam, vae_half)), progress)
    if deep_cache:
        precisions["unet_shallow"] = precisions["unet"]  # the same weights, at the same precision

    def package(tmp: Path, weights: bool) -> Manifest:
        started = time.perf_counter()
        written = {}
        for component, make in build.folder_graphs(fam, src.shapes, configs, str(src.path), deep_cache):
            if progress:
                progress(f"building {component}")
            read = build.FolderWeights(src, component).__getitem__
            if given is not None and component.startswith("vae_"):
                make, read = (given.decoder if component == "vae_decoder" else given.encoder), given.read
            written[component] = build.write_graph(make(), tmp / component / "model.onnx", read if weights else None)
        return write_manifest(tmp, arch, written, {"path": str(src.path), "kind": src.kind, "layout": layout,
                                                   "seconds": round(time.perf_counter() - started, 1)})

    if fmt == "gguf":
        import tempfile

        from edgediff.convert.gguf import gguf_format, write_gguf

        with atomic_file(output, overwrite) as target, tempfile.TemporaryDirectory(
                dir=output.parent, prefix=f".{output.name}.export-") as scratch:
            manifest = package(Path(scratch), weights=False)
            names = build.ldm_names(fam, configs)
            if given is not None:
                names["vae_decoder"] = names["vae_encoder"] = given.gguf_name
            return write_gguf(Path(scratch), manifest, target, names,
                              formats={c: gguf_format(p) for c, p in precisions.items()}, rules=rules,
                              shapes=_ldm_shape, reshape=quantize_convolutions, progress=progress,
                              weights=lambda c: given if given and c.startswith("vae_") else build.FolderWeights(src, c))
    with atomic_folder(output, overwrite) as tmp:
        manifest = package(tmp, weights=True)
        if any(p != "fp32" for p in precisions.values()):
            manifest = _apply_precisions(tmp, manifest, precisions, rules, progress)
            (tmp / MANIFEST).write_text(manifest.to_json())
    return manifest


def _uncalibrated(fam: Family, asked: str, precisions: dict[str, str], progress) -> dict[str, str]:
    """int8 of a model int8-static cannot calibrate (an image-to-video model: the calibration runs
    its pipeline from prompts) is int8-weights, and says so; int8-static asked by name is refused."""
    if fam.video is None or "int8-static" not in precisions.values():
        return precisions
    if "int8-static" in asked:
        raise UsageError(f"--precision {asked}: int8-static calibrates on sampling runs from prompts, which "
                         f"{fam.title} does not take; choose int8 (its weights in 8 bits), int4 or fp16")
    if progress:
        progress(f"int8 for {fam.title} is int8-weights (int8-static calibrates on runs from prompts)")
    return {k: "int8-weights" if v == "int8-static" else v for k, v in precisions.items()}


RULE_PRECISIONS = ("keep", "fp32", "fp16", "int8", "int4")  # what a rule may give a weight of an ONNX package


def _check_rules(rules, fmt: str) -> None:
    """A rule names a precision the format has (a misspelled one would leave the weight as it is)."""
    from edgediff.kernels.gguf_blocks import WRITABLE

    allowed = ("keep", *WRITABLE) if fmt == "gguf" else RULE_PRECISIONS
    for rule in rules:
        if rule.precision not in allowed:
            raise UsageError(f"--rule '{rule.pattern}={rule.precision}': unknown precision '{rule.precision}' for "
                             f"{fmt.upper()} packages; a rule gives one of: {', '.join(allowed)}")


def full_precision_components(fam: Family, vae_half: bool) -> set[str]:
    """What a 16-bit precision leaves at 32 bits: T5 (its feed-forward activations pass fp16's
    65504) and a VAE not known to be safe in fp16 (SDXL's stock one gives black images)."""
    keep = {te.component for te in fam.text_encoders if te.kind == "t5"}
    return keep | (set() if vae_half else {"vae_decoder", "vae_encoder"})


def _ldm_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    from edgediff.kernels.ldm_names import ldm_shape

    return ldm_shape(name, shape)


def _apply_precisions(root: Path, manifest: Manifest, precisions: dict[str, str], rules,
                      progress: Callable[[str], None] | None) -> Manifest:
    """Rewrite each component to its precision (the fp32 package in `root` is complete, so
    int8-static calibrates on its own sampling runs first)."""
    import dataclasses

    from edgediff.convert.precision import apply_precision, chooser

    calibrated: dict[str, object] = {}

    def calibration(component: str):
        def ranges():
            if not calibrated:  # every int8-static component's ranges, in one set of runs
                from edgediff.convert.int8_static import calibrate

                static = {n: chooser(n, p, rules) for n, p in precisions.items()
                          if p == "int8-static" and n in manifest.components}
                calibrated.update(calibrate(root, manifest, static, progress=progress))
            return calibrated.get(component)
        return ranges

    components = dict(manifest.components)
    for name, precision in precisions.items():
        if precision == "fp32" and not rules or name not in components:
            continue
        if progress and precision != "fp32":
            progress(f"{name}: {precision}")
        applied = apply_precision(root / components[name].file, name, precision, rules, calibration(name))
        if precision == "fp32" and not applied.notes:
            continue  # no rule matched a weight of it
        files = [root / components[name].file]
        data = files[0].with_name(files[0].name + "_data")
        if data.exists():
            files.append(data)
        entry = _component_entry(files, root, applied.precision)
        components[name] = dataclasses.replace(entry, notes=applied.notes)
    return dataclasses.replace(manifest, components=components)


def builtin_package(name: str = DEFAULT_MODEL, progress: Callable[[str], None] | None = None) -> Path:
    """A model shipped inside edgediff (the embedded default by default) as a package, converted
    once into the user's cache (keyed by the shipped files' contents, so a new model or edgediff
    version converts again)."""
    import hashlib

    source = resolve_source(f"builtin:{name}")
    from edgediff.convert.adopt import _builders

    digest = hashlib.sha256(__version__.encode())
    digest.update(hashlib.sha256(_builders()).digest())  # new graphs (a U-Net's ControlNet inputs): converted again
    for path in sorted(source.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(source).as_posix().encode() + path.read_bytes())
    package = cache_root() / f"{name}-{digest.hexdigest()[:12]}"
    if not (package / MANIFEST).is_file():
        if progress:
            progress(f"converting the builtin model {name} once, into {package}")
        convert(source, package, overwrite=True, progress=progress)
    return package
