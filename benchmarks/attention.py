"""onnxruntime's CPU MultiHeadAttention kernel on the attention shapes of SD 1.5's U-Net, each
way it can run, against the matrix products it does (what bounds it).

    edgediff bench attention --size 512 --threads 2

The kernel has two paths: flash attention (blocked by the L2 cache size; the default) and the
unfused one (Q·Kᵀ whole, softmax, ·V), chosen by ORT_DISABLE_FLASH_ATTENTION when the session is
made. "GEMM" runs the same two products as plain MatMuls without the softmax: the arithmetic
floor of the shape on this CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

# (tokens, context tokens, heads, head size) of SD 1.5's attention layers at a 512x512 image,
# batch 2 (guidance); other sizes scale the token counts with the area
SD15_512 = [("self 64x64", 4096, 4096, 8, 40), ("cross 64x64", 4096, 77, 8, 40),
            ("self 32x32", 1024, 1024, 8, 80), ("self 16x16", 256, 256, 8, 160)]


def _mha_model(heads: int):
    from onnx import TensorProto, helper

    q, k, v = (helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", n.upper() + "S", "D"]) for n in "qkv")
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["out"], domain="com.microsoft", num_heads=heads)
    graph = helper.make_graph([node], "mha", [q, k, v], [out])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=10)


def _gemm_model():
    """Q·Kᵀ then ·V per head, as batched MatMuls (inputs already split into heads)."""
    from onnx import TensorProto, helper

    q, kt, v = (helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("q", "kt", "v"))
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    nodes = [helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("MatMul", ["s", "v"], ["out"])]
    return helper.make_model(helper.make_graph(nodes, "gemm", [q, kt, v], [out]),
                             opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def run_seconds(model, feeds: dict, threads: int | None, repeats: int) -> float:
    """Median seconds of `repeats` warm runs of an in-memory graph on the CPU provider."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(size: int = 512, threads: int | None = None, repeats: int = 3, batch: int = 2) -> list[dict]:
    rng = np.random.default_rng(0)
    scale = (size / 512) ** 2
    rows = []
    for name, tokens, context, heads, head in SD15_512:
        s = max(1, round(tokens * scale))
        c = context if context == 77 else s
        q = rng.standard_normal((batch, s, heads * head), dtype=np.float32)
        k = rng.standard_normal((batch, c, heads * head), dtype=np.float32)
        v = rng.standard_normal((batch, c, heads * head), dtype=np.float32)
        row = {"layer": name, "tokens": s, "context": c, "heads": heads, "head_size": head,
               "gflop": 4 * batch * heads * s * c * head / 1e9}
        for path, flag in (("flash", "0"), ("unfused", "1")):
            os.environ["ORT_DISABLE_FLASH_ATTENTION"] = flag  # read when the kernel is made
            row[f"{path}_ms"] = 1000 * run_seconds(_mha_model(heads), {"q": q, "k": k, "v": v}, threads, repeats)
        os.environ.pop("ORT_DISABLE_FLASH_ATTENTION")
        qh, kh, vh = (x.reshape(batch, -1, heads, head).transpose(0, 2, 1, 3).copy() for x in (q, k, v))
        feeds = {"q": qh, "kt": kh.transpose(0, 1, 3, 2).copy(), "v": vh}
        row["gemm_ms"] = 1000 * run_seconds(_gemm_model(), feeds, threads, repeats)
        for path in ("flash", "unfused", "gemm"):
            row[f"{path}_gflops"] = row["gflop"] / (row[f"{path}_ms"] / 1000)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| layer (B=2) | tokens x context | GFLOP | flash ms | unfused ms | GEMM only ms | flash GFLOP/s | GEMM GFLOP/s |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r['layer']} | {r['tokens']}x{r['context']} | {r['gflop']:.1f} | {r['flash_ms']:.0f} | "
                   f"{r['unfused_ms']:.0f} | {r['gemm_ms']:.0f} | {r['flash_gflops']:.0f} | {r['gemm_gflops']:.0f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgediff bench attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = measure(args.size, args.threads, args.repeats)
    print(json.dumps(rows, indent=1) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
