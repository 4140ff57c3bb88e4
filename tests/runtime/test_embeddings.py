"""Textual inversion embeddings: images match diffusers' `load_textual_inversion` on the same tiny
models (A1111's .pt and .safetensors files, in the prompt and the negative prompt, SDXL's pair, a
GGUF package), A1111's chunking with an embedding's vectors, the /sdapi/v1/embeddings listing and
bad input (a width no encoder has, a pickle with more than tensors, unknown names as text)."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from safetensors.numpy import save_file

from edgediff.errors import SourceError, UnsafeFileError, UsageError
from edgediff.runtime import Pipeline, text
from edgediff.runtime.embeddings import Lookup, listing, read_embedding

from reference import diffusers_pipeline, diffusers_scheduler, psnr

torch = pytest.importorskip("torch")

FP32_PSNR = 45.0
SIZE, STEPS = 64, 4
ARGS = dict(steps=STEPS, guidance=7.5, sampler="euler", schedule="normal", seed=1234, width=SIZE, height=SIZE)
PROMPT = "a red circle by shinystyle on a blue background"
NEGATIVE = "blurry, badthing"


def _vectors(count: int, width: int, seed: int) -> np.ndarray:
    # far from the token table's scale, so that a lost embedding would show in the picture
    return np.random.default_rng(seed).normal(0, 0.5, (count, width)).astype(np.float32)


def _a1111_pt(path, vectors: np.ndarray, legacy: bool = False):
    """A .pt as A1111's training writes it."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.from_numpy(vectors)},
                "name": path.stem, "step": 1500, "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "v1-5"},
               path, _use_new_zipfile_serialization=not legacy)
    return path


def _reference(source, ours: Pipeline, embeddings: dict, prompt: str = PROMPT, negative: str = NEGATIVE):
    """diffusers' image with each embedding (name -> {encoder: vectors}) loaded as its tokens."""
    pipe = diffusers_pipeline(source)
    pipe.scheduler, _ = diffusers_scheduler("euler", "normal", pipe.scheduler.config, ours.schedule)
    for name, sets in embeddings.items():
        for encoder, vectors in sets.items():
            tokenizer = "tokenizer" + encoder.removeprefix("text_encoder")
            pipe.load_textual_inversion(torch.from_numpy(vectors), token=name, text_encoder=getattr(pipe, encoder),
                                        tokenizer=getattr(pipe, tokenizer))
    return pipe(prompt=prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=7.5, width=SIZE,
                height=SIZE, generator=torch.Generator().manual_seed(1234)).images[0]


@pytest.fixture(scope="module")
def sd1_embeddings(tmp_path_factory):
    """A1111's two files: a 3-vector .pt (in the prompt) and a 2-vector .safetensors (negative)."""
    folder = tmp_path_factory.mktemp("embeddings")
    (folder / "sub").mkdir()
    style, bad = _vectors(3, 64, 1), _vectors(2, 64, 2)
    _a1111_pt(folder / "shinystyle.pt", style)
    save_file({"emb_params": bad}, str(folder / "sub" / "badthing.safetensors"))  # found below the folder too
    return folder, {"shinystyle": {"text_encoder": style}, "badthing": {"text_encoder": bad}}


def test_embeddings_match_diffusers(tiny_source, tiny_package, sd1_embeddings, fp32_images):
    folder, sets = sd1_embeddings
    ours = Pipeline(tiny_package("sd1"), device="cpu", embeddings_dir=folder)
    image = ours.generate(PROMPT, NEGATIVE, **ARGS)
    ref = _reference(tiny_source("sd1"), ours, sets)
    plain = fp32_images[1]
    assert psnr(image, fp32_images[0]) == float("inf")  # the same Pipeline settings: the same picture
    assert psnr(ref, plain) < 40  # the names as text make another picture: a lost embedding would fail
    assert psnr(ref, image) >= FP32_PSNR
    # a prompt without them runs the encoder as it was; unknown names are text, as A1111 reads them
    again = ours.generate("a red circle by nosuchstyle", "", **ARGS)
    alone = Pipeline(tiny_package("sd1"), device="cpu").generate("a red circle by nosuchstyle", "", **ARGS)
    assert psnr(again, alone) == float("inf")


def test_sdxl_pair_matches_diffusers(tiny_source, tiny_package, tmp_path):
    l_vec, g_vec = _vectors(2, 64, 3), _vectors(2, 64, 4) * 2
    save_file({"clip_l": l_vec, "clip_g": g_vec}, str(tmp_path / "shinystyle.safetensors"))
    ours = Pipeline(tiny_package("sdxl"), device="cpu", embeddings_dir=tmp_path)
    image = ours.generate(PROMPT, "shinystyle", **ARGS)
    ref = _reference(tiny_source("sdxl"), ours, {"shinystyle": {"text_encoder": l_vec, "text_encoder_2": g_vec}},
                     negative="shinystyle")
    plain = Pipeline(tiny_package("sdxl"), device="cpu").generate(PROMPT, "shinystyle", **ARGS)
    assert psnr(ref, plain) < 40 and psnr(ref, image) >= FP32_PSNR


@pytest.fixture(scope="module")
def fp32_images(tiny_package, sd1_embeddings):
    """The fp32 package's pictures with the embeddings and without them."""
    folder, _ = sd1_embeddings
    return [Pipeline(tiny_package("sd1"), device="cpu", embeddings_dir=d).generate(PROMPT, NEGATIVE, **ARGS)
            for d in (folder, None)]


@pytest.mark.parametrize(("name", "precision"), [("p.gguf", "f16"), ("p", "fp16")])
def test_other_packages_take_embeddings(tiny_source, fp32_images, sd1_embeddings, tmp_path, name, precision):
    """A GGUF package binds its token table from the file (here f16, cast as it runs); an fp16
    package holds it in fp16: the embeddings' rows go beside it, in its type, and the picture is
    as close to fp32's with them as the package's own is without."""
    from edgediff.convert import convert

    folder, _ = sd1_embeddings
    package = tmp_path / name
    convert(tiny_source("sd1"), package, precision=precision)
    ours = Pipeline(package, device="cpu", embeddings_dir=folder).generate(PROMPT, NEGATIVE, **ARGS)
    plain = Pipeline(package, device="cpu").generate(PROMPT, NEGATIVE, **ARGS)
    fp32, fp32_plain = fp32_images
    floor = psnr(fp32_plain, plain)
    assert psnr(ours, plain) < 40 and psnr(ours, fp32) >= min(floor, FP32_PSNR) - 1.5


def test_an_embedding_of_words_is_those_words(tiny_package, tmp_path, capsys):
    """The README's recipe: an embedding holding the token table's rows of 'red circle' draws what
    those words draw (through `edgediff generate --embeddings-dir`)."""
    import onnx
    from onnx import numpy_helper
    from PIL import Image

    from edgediff.cli import main
    from edgediff.runtime.tokenizer import load_clip_tokenizer

    package = tiny_package("sd1")
    model = onnx.load(str(package / "text_encoder" / "model.onnx"))
    table = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("token_embedding.weight"))
    ids = load_clip_tokenizer(package / "tokenizer").encode("red circle", add_special_tokens=False).ids
    (tmp_path / "e").mkdir()
    save_file({"emb_params": table[ids]}, str(tmp_path / "e" / "redcircle.safetensors"))
    out = tmp_path / "a.png"
    assert main(["generate", "-m", str(package), "--embeddings-dir", str(tmp_path / "e"), "-p",
                 "a redcircle on a blue background", "--steps", "4", "--seed", "7", "-o", str(out)]) == 0
    words = Pipeline(package, device="cpu").generate("a red circle on a blue background", steps=4, seed=7)
    assert psnr(Image.open(out), words) == float("inf")
    assert main(["generate", "-m", str(package), "--embeddings-dir", str(tmp_path / "none"), "-p", "x"]) == 2
    assert "--embeddings-dir" in capsys.readouterr().err


def test_vectors_count_against_the_chunk(tiny_package):
    """A1111 keeps an embedding's vectors in one chunk: one that would overflow starts the next."""
    from edgediff.runtime.package import open_package

    tok = open_package(tiny_package("sd1")).tokenizer("tokenizer")
    lookup = Lookup(tok, ["shinystyle"])
    first = tok.get_vocab_size(with_added_tokens=True)

    def words(ids, position):
        found = lookup.at(ids, position)
        return None if found is None else (list(range(first, first + 5)), found[1])

    filler = " ".join(["cat"] * 72)  # 72 tokens: 5 more do not fit in 75
    chunks = text.chunk_prompt(tok, f"{filler} shinystyle dog", 77, 0, words)
    assert len(chunks) == 2 and all(len(c) == 77 for c in chunks)
    assert first not in chunks[0] and chunks[1][1:7] == [*range(first, first + 5), tok.token_to_id("dog</w>")]
    short = text.chunk_prompt(tok, "cat shinystyle", 77, 0, words)
    assert short[0][:8] == [tok.token_to_id("<|startoftext|>"), tok.token_to_id("cat</w>"), *range(first, first + 5),
                            tok.token_to_id("<|endoftext|>")]
    # without embeddings the name is its own tokens
    assert text.chunk_prompt(tok, "cat shinystyle", 77, 0) == text.chunk_prompt(tok, "cat shinystyle", 77, 0, None)


def test_listing(tiny_package, sd1_embeddings, tmp_path):
    folder, _ = sd1_embeddings
    found = listing(folder, Pipeline(tiny_package("sd1"), device="cpu").package)
    assert found["loaded"]["shinystyle"] == {"step": 1500, "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "v1-5",
                                             "shape": 64, "vectors": 3}
    assert found["loaded"]["badthing"]["vectors"] == 2 and found["skipped"] == {}
    save_file({"clip_l": _vectors(1, 64, 0), "clip_g": _vectors(1, 64, 0)}, str(tmp_path / "xl.safetensors"))
    save_file({"emb_params": _vectors(1, 32, 0)}, str(tmp_path / "narrow.safetensors"))
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    pipe = Pipeline(tiny_package("sd1"), device="cpu", embeddings_dir=tmp_path)
    found = pipe.embedding_list()
    assert found["loaded"] == {}
    assert found["skipped"]["xl"]["shape"] == 128 and found["skipped"]["narrow"]["shape"] == 32
    assert "junk.pt" in found["skipped"]["junk"]["error"]


def test_bad_embeddings(tiny_package, tmp_path):
    save_file({"emb_params": _vectors(2, 32, 0)}, str(tmp_path / "narrow.safetensors"))
    pipe = Pipeline(tiny_package("sd1"), device="cpu", embeddings_dir=tmp_path)
    with pytest.raises(UsageError, match=r"narrow.*embeddings_dir.*32-wide vectors, which fit no text encoder.*64"):
        pipe.generate("a narrow cat", **ARGS)
    save_file({"clip_l": _vectors(1, 64, 0), "clip_g": _vectors(1, 64, 0)}, str(tmp_path / "xlonly.safetensors"))
    with pytest.raises(UsageError, match="SDXL embedding"):
        pipe.generate("xlonly", **ARGS)
    # a pickle that asks for anything but tensors is refused unrun
    torch.save({"string_to_param": {"*": torch.zeros(1, 64)}, "extra": collections.Counter()},
               tmp_path / "sneaky.pt")
    with pytest.raises(UnsafeFileError, match="collections.Counter"):
        pipe.generate("sneaky cat", **ARGS)
    with pytest.raises(UnsafeFileError):
        read_embedding(tmp_path / "sneaky.pt", data=False)
    save_file({"a": _vectors(1, 64, 0), "b": _vectors(1, 64, 0)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(SourceError, match="not an embedding file: it holds 2 tensors"):
        read_embedding(tmp_path / "two.safetensors")
    save_file({"emb_params": _vectors(80, 64, 0)}, str(tmp_path / "long.safetensors"))
    with pytest.raises(UsageError, match="80 vectors, more than the 75 tokens"):
        pipe.generate("long", **ARGS)
    with pytest.raises(UsageError, match="embeddings_dir .*: no such folder"):
        Pipeline(tiny_package("sd1"), device="cpu", embeddings_dir=tmp_path / "missing")


def test_legacy_pt_and_a_diffusers_concept(tmp_path):
    """torch's legacy format, and diffusers' learned_embeds.bin: {token: one vector}."""
    vec = _vectors(2, 64, 5)
    emb = read_embedding(_a1111_pt(tmp_path / "old.pt", vec, legacy=True))
    np.testing.assert_array_equal(emb.sets["*"], vec)
    torch.save({"<cat-toy>": torch.from_numpy(vec[0])}, tmp_path / "learned_embeds.bin")
    concept = read_embedding(tmp_path / "learned_embeds.bin")
    assert concept.name == "learned_embeds" and concept.vectors == 1 and concept.shape == 64
