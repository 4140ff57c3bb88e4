"""The int8 choices benchmark quantizes with the converter's own code and measures against fp32."""

from __future__ import annotations

import json

from edgediff.benchmarks.int8 import block_only, main


def test_int8_bench_measures_variants_and_blocks(tiny_package, tmp_path, capsys):
    work = tmp_path / "work"
    assert main([str(tiny_package("sd1")), "--work", str(work), "--size", "64", "--steps", "2",
                 "--seeds", "1", "--only", "(int8-static)"]) == 0
    assert (work / "ranges-minmax.json").is_file()  # the ranges, kept for every later variant
    main([str(tiny_package("sd1")), "--work", str(work), "--size", "64", "--steps", "2", "--seeds", "1",
          "--sensitivity", "--only", "mid_block"])
    rows = {r["variant"]: r for r in json.loads((work / "results.json").read_text())}
    assert set(rows) == {"7-bit, shortcut convolutions float (int8-static)", "only mid_block"}
    whole, mid = rows["7-bit, shortcut convolutions float (int8-static)"], rows["only mid_block"]
    assert len(whole["unet_snr_db_per_step"]) == 2 and whole["images"] == 2
    # one block quantized stays closer to fp32 than all of them, and keeps more nodes float
    assert mid["excluded_nodes"] > whole["excluded_nodes"]
    assert min(whole["unet_snr_db_per_step"]) < min(mid["unet_snr_db_per_step"]) < float("inf")  # some quantized
    assert "| only mid_block |" in capsys.readouterr().out
    assert not any(p.is_dir() for p in work.iterdir())  # each variant's graph is removed


def test_block_only_keeps_the_rest_float():
    from edgediff.convert.precision import chooser

    choose = chooser("unet", "int8-static", block_only("up_blocks.1").rules)
    for prefix in ("", "unet."):  # the graph's weight names carry the component's prefix
        assert choose(f"{prefix}up_blocks.1.resnets.0.conv1.weight", (64, 64, 3, 3)) == 8
        assert choose(f"{prefix}up_blocks.10.resnets.0.conv1.weight", (64, 64, 3, 3)) == 0
        assert choose(f"{prefix}down_blocks.1.resnets.0.conv1.weight", (64, 64, 3, 3)) == 0


def test_kernel_throughput_is_measured():
    from edgediff.benchmarks.int8 import kernel_throughput

    rates = kernel_throughput(threads=1, m=64, k=288, n=32, repeats=1)
    assert set(rates) == {"fp32", "u8 x s8", "u8 x u8"} and all(r > 0 for r in rates.values())
