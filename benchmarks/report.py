"""Reports of a scenario's runs: a Markdown table, a PNG chart, and the row schema."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from edgediff.benchmarks import stats

# Every row has these; an "ok" row also has the measured ones.
ROW_KEYS = {"scenario": str, "model": str, "label": str, "status": str, "edgediff": str,
            "onnxruntime": str, "python": str, "cpu": str, "cpu_flags": list, "cores": int}
OK_KEYS = {"tool": str, "precision": str, "size": int, "steps": int, "seed": int, "repeat": int,
           "load_cold_s": float, "load_warm_s": float, "text_encode_s": float, "steps_s": list,
           "step_s": dict, "vae_decode_s": float, "total_s": float, "wall_s": float,
           "peak_rss_mb": float, "rss_peak_sampled_mb": float, "image": str, "provider": str}


OPTIONAL_STAGES = {"text_encode_s", "vae_decode_s", "load_warm_s"}  # null for tools that do not time them apart


def validate_row(row: dict) -> list[str]:
    """The schema problems of one JSON row (empty when it is valid)."""
    problems = []
    keys = dict(ROW_KEYS, **(OK_KEYS if row.get("status") == "ok" else {}))
    for key, kind in keys.items():
        if key not in row:
            problems.append(f"missing '{key}'")
        elif row[key] is None and key in OPTIONAL_STAGES:
            continue
        elif not isinstance(row[key], kind) and not (kind is float and isinstance(row[key], int)):
            problems.append(f"'{key}' is {type(row[key]).__name__}, expected {kind.__name__}")
    if row.get("status") not in ("ok", "skipped", "failed"):
        problems.append(f"unknown status {row.get('status')!r}")
    if row.get("status") == "skipped" and not row.get("reason"):
        problems.append("a skipped row needs a reason")
    return problems


def aggregate(rows: list[dict]) -> list[dict]:
    """One line per (label, size): medians over runs, and ratios to the first label paired by
    round (same size, prompt, seed and repeat), so drift between rounds cancels."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("status") == "ok":
            groups[(r["label"], r["size"])].append(r)
    baseline_label = next((r["label"] for r in rows if r.get("status") == "ok"), None)
    base = {(r["size"], r["prompt_index"], r["seed"], r["repeat"]): r for r in rows
            if r.get("label") == baseline_label and r.get("status") == "ok"}
    lines = []
    for (label, size), runs in groups.items():

        def med(key: str, runs=runs) -> float:
            return stats.summary([r[key] for r in runs if r.get(key) is not None])["median"]

        pairs = [base[k]["total_s"] / r["total_s"] for r in runs
                 if (k := (r["size"], r["prompt_index"], r["seed"], r["repeat"])) in base]
        quality = [r["quality"] for r in runs if r.get("quality")]
        lines.append({
            "label": label, "size": size, "runs": len(runs),
            "load_cold_s": med("load_cold_s"), "load_warm_s": med("load_warm_s"), "text_encode_s": med("text_encode_s"),
            # every run's cold load opened its graphs from the optimized-graph cache
            "cold_cached": all(r.get("cold_load_cached") for r in runs),
            "step_median_s": stats.summary([s for r in runs for s in r["steps_s"]])["median"],
            "step_min_s": min(s for r in runs for s in r["steps_s"]),
            "step_max_s": max(s for r in runs for s in r["steps_s"]),
            "denoise_s": stats.summary([sum(r["steps_s"]) for r in runs])["median"],
            "vae_decode_s": med("vae_decode_s"), "total_s": med("total_s"),
            "speedup_vs_baseline": stats.summary(pairs)["median"] if pairs else math.nan,
            "rss_peak_mb": max(max(r["peak_rss_mb"], r["rss_peak_sampled_mb"]) for r in runs),
            "package_mb": (runs[0].get("package_bytes") or 0) / 2**20 or None,
            "psnr_db": stats.summary([q["psnr_db"] for q in quality])["median"] if quality else None,
            "ssim": stats.summary([q["ssim"] for q in quality])["median"] if quality else None,
            "provider": runs[0]["provider"],
        })
    return lines


def _fmt(value, digits=2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "identical"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict], title: str) -> str:
    lines = aggregate(rows)
    info = next((r for r in rows if "cpu" in r), {})
    out = [f"# {title}", "",
           f"edgediff {info.get('edgediff')}, onnxruntime {info.get('onnxruntime')}, Python {info.get('python')}; "
           f"{info.get('cpu')} ({', '.join(info.get('cpu_flags', []))}), {info.get('cores')} cores, "
           f"threads {info.get('threads') or 'default'}.", "",
           "| tool | size | step median (min–max) s | text s | denoise s | VAE s | total s | speed vs first | "
           "cold load s | warm load s | peak RSS MB | package MB | PSNR dB | SSIM | runs |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for ln in lines:
        out.append(
            f"| {ln['label']} | {ln['size']} | {_fmt(ln['step_median_s'])} ({_fmt(ln['step_min_s'])}–"
            f"{_fmt(ln['step_max_s'])}) | {_fmt(ln['text_encode_s'])} | {_fmt(ln['denoise_s'])} | "
            f"{_fmt(ln['vae_decode_s'])} | {_fmt(ln['total_s'])} | {_fmt(ln['speedup_vs_baseline'])}× | "
            f"{_fmt(ln['load_cold_s'])}{'*' if ln['cold_cached'] else ''} | {_fmt(ln['load_warm_s'])} | {_fmt(ln['rss_peak_mb'], 0)} | {_fmt(ln['package_mb'], 0)} | "
            f"{_fmt(ln['psnr_db'], 1)} | {_fmt(ln['ssim'], 3)} | {ln['runs']} |")
    if any(ln["cold_cached"] for ln in lines):
        out += ["", "\\* cold load from the optimized-graph cache (opened before by an earlier run)"]
    skipped = [r["reason"] for r in rows if r.get("status") == "skipped"]
    failed = [f"{r['label']}: {r.get('error')}" for r in rows if r.get("status") == "failed"]
    if skipped or failed:
        out += ["", *(f"- {s}" for s in skipped), *(f"- failed: {f}" for f in failed)]
    return "\n".join(out) + "\n"


def chart(rows: list[dict], path: Path) -> Path:
    """Stage times stacked per tool and size, peak memory beside (Pillow only)."""
    from PIL import Image, ImageDraw

    lines = aggregate(rows)
    width, bar_h, gap, left = 900, 22, 14, 230
    height = 70 + max(1, len(lines)) * (bar_h * 2 + gap)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    colours = {"text": (90, 140, 210), "denoise": (230, 120, 50), "vae": (100, 180, 100), "rss": (150, 150, 150)}
    def known(v: float) -> float:
        return 0.0 if v is None or math.isnan(v) else v

    max_t = max((ln["total_s"] for ln in lines), default=1) or 1
    max_m = max((ln["rss_peak_mb"] for ln in lines), default=1) or 1
    span = width - left - 120
    draw.text((10, 10), "seconds per image (text | denoise | VAE), and peak RSS in MB (grey)", fill="black")
    for key, x in zip(("text", "denoise", "vae", "rss"), (10, 110, 230, 330), strict=True):
        draw.rectangle((x, 32, x + 12, 44), fill=colours[key])
        draw.text((x + 16, 32), key, fill="black")
    y = 60
    for ln in lines:
        draw.text((10, y + 4), f"{ln['label']} @{ln['size']}", fill="black")
        x = left
        text, vae = known(ln["text_encode_s"]), known(ln["vae_decode_s"])
        # a tool that does not time its stages apart shows its whole time as denoising
        for key, value in (("text", text), ("denoise", ln["total_s"] - text - vae), ("vae", vae)):
            w = int(span * value / max_t)
            draw.rectangle((x, y, x + max(w, 1), y + bar_h), fill=colours[key])
            x += w
        draw.text((x + 6, y + 4), f"{ln['total_s']:.1f} s", fill="black")
        w = int(span * ln["rss_peak_mb"] / max_m)
        draw.rectangle((left, y + bar_h + 2, left + max(w, 1), y + 2 * bar_h), fill=colours["rss"])
        draw.text((left + w + 6, y + bar_h + 4), f"{ln['rss_peak_mb']:.0f} MB", fill="black")
        y += 2 * bar_h + gap
    img.save(path)
    return path
