"""`edgediff batch`: a JSONL file of A1111 jobs gives the images `edgediff generate` gives, line by
line, in this process and on a local Ray cluster; runs resume without redoing finished lines and
leave no partial file; a bad line is reported by its number while the others run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from edgediff.batch import JobError, Output, parse_line, read_jobs, run
from edgediff.cli import main


@pytest.fixture(scope="module")
def jobs(tiny_package, default_package, tmp_path_factory):
    """A jobs file of two models (the embedded default and the tiny SD 1.x package), txt2img and
    img2img, with a bad fourth line; and what `edgediff generate` writes for each good line."""
    folder = tmp_path_factory.mktemp("jobs")
    Image.new("RGB", (64, 64), (200, 40, 30)).save(folder / "init.png")
    sd1 = str(tiny_package("sd1"))
    lines = [
        {"prompt": "a red cube", "seed": 1, "steps": 3},
        {"prompt": "a cat", "negative_prompt": "dog", "seed": 2, "steps": 3, "cfg_scale": 5, "width": 64,
         "height": 64, "sampler_name": "Euler a", "model": sd1},
        {"prompt": "a blue sphere", "seed": 3, "steps": 4, "sampler_name": "DPM++ 2M", "scheduler": "Karras"},
        {"prompt": "bad", "steps": "three"},
        {"prompt": "a house", "seed": 4, "steps": 3, "width": 64, "height": 64, "init_images": ["init.png"],
         "denoising_strength": 0.6, "model": sd1},
        {"prompt": "a tree", "seed": 5, "steps": 2, "width": 64, "height": 64, "model": sd1},
        {"prompt": "a boat", "seed": 6, "steps": 3, "cfg_scale": 3.5},
    ]
    path = folder / "jobs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    expected = {}
    for index, line in enumerate(lines):
        if line["prompt"] == "bad":
            continue
        argv = ["generate", "--prompt", line["prompt"], "--seed", str(line["seed"]), "--steps", str(line["steps"]),
                "--output", str(folder / f"generate-{index}.png")]
        for field, flag in (("negative_prompt", "--negative-prompt"), ("cfg_scale", "--cfg"), ("width", "--width"),
                            ("height", "--height"), ("sampler_name", "--sampler"), ("scheduler", "--schedule"),
                            ("model", "--model"), ("denoising_strength", "--strength")):
            if field in line:
                argv += [flag, str(line[field])]
        if "init_images" in line:
            argv += ["--init-image", str(folder / line["init_images"][0])]
        assert main(argv) == 0
        expected[index] = (folder / f"generate-{index}.png").read_bytes()
    return path, expected


def _check(out: Path, expected: dict[int, bytes]) -> list[dict]:
    """Every good line's PNG is byte for byte generate's, recorded once, and nothing else is there."""
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in records) == sorted(expected)
    for r in records:
        data = (out / r["file"]).read_bytes()
        assert data == expected[r["index"]], f"line {r['line']} differs from generate's image"
        assert r["file"] == f"{r['index']:05d}.png" and r["line"] == r["index"] + 1 and r["seconds"] >= 0
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{i:05d}.png" for i in expected] + ["results.jsonl"])
    return records


def test_lines_give_generate_images_and_a_bad_line_is_reported(jobs, tmp_path, capsys):
    path, expected = jobs
    out = tmp_path / "out"
    code = main(["batch", str(path), "--output", str(out)])
    stdout = capsys.readouterr().out
    assert code == 1  # one line failed; the others ran
    assert f"{path} line 4: 'steps' must be a number (got 'three')" in stdout
    assert "7 jobs: 6 written, 0 already done, 1 failed (line 4)" in stdout
    _check(out, expected)
    with Image.open(out / "00002.png") as img:
        assert "Sampler: DPM++ 2M, Schedule type: Karras" in img.text["parameters"]
    # the same command again: nothing to redo
    code = main(["batch", str(path), "--output", str(out)])
    assert code == 1 and "7 jobs: 0 written, 6 already done, 1 failed (line 4)" in capsys.readouterr().out


def test_an_interrupted_run_finishes_the_rest_and_redoes_nothing(jobs, tmp_path):
    path, expected = jobs
    out = tmp_path / "out"
    seen = []

    def stop_after_three(record):
        seen.append(record["index"])
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(path, out, on_record=stop_after_three)
    assert len(list(out.glob("*.png"))) == 3 and not list(out.glob(".*"))
    (out / f"{seen[0]:05d}.png").write_bytes(b"not the image")  # a file changed since: made again
    again = []
    summary = run(path, out, on_record=lambda r: again.append(r["index"]))
    assert sorted(again) == sorted(set(expected) - set(seen[1:]))
    assert sorted(summary.skipped) == sorted(seen[1:]) and [n for n, _ in summary.failed] == [4]
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    latest = {r["index"]: r for r in records}
    assert len(records) == 7 and len(latest) == 6  # the changed one recorded again, the rest once
    for index, r in latest.items():
        assert (out / r["file"]).read_bytes() == expected[index]


def test_sigint_keeps_what_finished(default_package, tmp_path):
    """A real Ctrl-C (SIGINT) to `edgediff batch`: exit 130, the finished images and their records
    kept, no partial file; the same command again runs only the rest."""
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"slow {i}", "seed": i, "steps": 8, "width": 192, "height": 192})
                            + "\n" for i in range(6)))
    out = tmp_path / "out"
    command = [sys.executable, "-P", "-m", "edgediff.cli", "batch", str(path), "--output", str(out), "--threads", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 60
    while not (results.is_file() and results.read_text().count("\n") >= 1) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "the same command again runs the rest" in stderr and "Traceback" not in stderr
    finished = {json.loads(x)["index"] for x in results.read_text().splitlines()}
    assert 1 <= len(finished) < 6 and not list(out.glob(".*"))
    assert {p.name for p in out.glob("*.png")} == {f"{i:05d}.png" for i in finished}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{len(finished)} of 6 jobs already done" in done.stdout
    indexes = [json.loads(x)["index"] for x in results.read_text().splitlines()]
    assert sorted(indexes) == list(range(6))  # each line recorded once: none redone


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "a line is one JSON object with A1111's fields (got list)"),
    ('{"steps": 3}', "no 'prompt' field"),
    ('{"prompt": "x", "batch": 3}', "unknown field 'batch' (known: prompt, negative_prompt, seed"),
    ('{"prompt": "x", "restore_faces": true}', "edgediff does not implement A1111's 'restore_faces'"),
    ('{"prompt": "x", "sampler_name": "Nope"}', "Sampler not found: 'Nope'"),
    ('{"prompt": "x", "scheduler": "nope"}', "Scheduler not found: 'nope'"),
    ('{"prompt": "x", "seed": -2}', "'seed' must be between -1 and 4294967295 (got -2)"),
    ('{"prompt": "x", "cfg_scale": true}', "'cfg_scale' must be a number (got True)"),
    ('{"prompt": "x", "init_images": ["missing.png"]}', "missing.png: no such file"),
    ('{"prompt": "x", "init_images": "a.png"}', "'init_images' must be list (got 'a.png')"),
    ('{"prompt": "x", "guidance": 3, "cfg_scale": 4}', "'guidance' and 'cfg_scale' both given"),
])
def test_bad_lines_say_what_is_wrong(tmp_path, line, message):
    with pytest.raises(JobError) as caught:
        parse_line(line, 0, None, tmp_path)
    assert message in str(caught.value)


def test_fields_map_to_generate_and_prompt_file_names_run_too(tmp_path):
    job = parse_line('{"prompt": "x", "guidance": 3, "sampler": "euler", "schedule": "karras", "seed": -1}', 4,
                     "builtin:tiny-sd1", tmp_path)
    assert job.file == "00004.png" and job.line == 5 and job.model == "builtin:tiny-sd1"
    args = job.arguments
    assert (args["guidance"], args["sampler"], args["schedule"]) == (3.0, "euler", "karras")
    assert 0 <= args["seed"] < 2**32  # drawn now, so results.jsonl records it
    assert parse_line('{"prompt": "x", "model": "m"}', 0, None, tmp_path).model == str(tmp_path / "m")
    assert parse_line('{"prompt": "x"}', 0, "other", tmp_path).digest != parse_line('{"prompt": "x"}', 0, None,
                                                                                   tmp_path).digest


def test_usage_errors(tmp_path, capsys):
    assert main(["batch", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o")]) == 2
    assert "JOBS " in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert main(["batch", str(tmp_path / "empty.jsonl"), "-o", str(tmp_path / "o")]) == 2
    assert "no jobs in it" in capsys.readouterr().err
    (tmp_path / "one.jsonl").write_text('{"prompt": "x"}\n')
    assert main(["batch", str(tmp_path / "one.jsonl"), "-o", str(tmp_path / "o"), "--actors", "2"]) == 2
    assert "--actors is for --ray runs" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["batch", str(tmp_path / "one.jsonl"), "-o", str(tmp_path / "file")]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err


def test_a_line_cut_short_in_results_is_passed_over(tmp_path):
    out = Output(tmp_path)
    (tmp_path / "results.jsonl").write_text('{"index": 0, "sha256": "ab"}\n{"index": 1, "sha2')
    job = read_jobs_one(tmp_path)
    out.write(job, b"png", {"seed": 1})
    assert set(out.records()) == {0, 2}
    assert (tmp_path / "results.jsonl").read_text().splitlines()[2].startswith('{"index": 2')


def read_jobs_one(folder: Path):
    (folder / "j.jsonl").write_text('\n\n{"prompt": "x", "seed": 1}\n')
    (job,), bad = read_jobs(folder / "j.jsonl")
    assert not bad and job.index == 2
    return job


def test_the_product_does_not_import_ray(default_package, tmp_path):
    (tmp_path / "j.jsonl").write_text('{"prompt": "x", "seed": 1, "steps": 1}\n')
    code = (f"import sys; from edgediff.cli import main; assert main(['batch', {str(tmp_path / 'j.jsonl')!r}, '-o', "
            f"{str(tmp_path / 'o')!r}]) == 0; assert 'ray' not in sys.modules, 'ray imported'")
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# Ray: one local cluster of 2 CPUs for these tests, no dashboard, shut down after them

@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("EDGEDIFF")}})
    yield ray
    ray.shutdown()


def test_on_ray_the_same_images_and_a_dead_worker_loses_nothing(jobs, local_ray, tmp_path, capsys):
    """Two actors per model, the packages shipped through the object store (as to other nodes);
    the worker that made the first image is killed (SIGKILL) as it comes back: Ray restarts it
    and runs its rows again, and every line ends up written once."""
    path, expected = jobs
    out = tmp_path / "out"
    killed = []

    def kill_first_worker(record):
        if not killed:
            pid = int(record["worker"].rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    summary = run(path, out, ray=True, actors=2, on_record=kill_first_worker, say=print, ship=True)
    stdout = capsys.readouterr().out
    assert killed and f"{path} line 4: 'steps' must be a number" in stdout
    assert stdout.count("(shipped through the object store) on 2 Ray actors x 1 thread") == 2
    assert len(list((Path(os.environ["EDGEDIFF_CACHE"]) / "shipped").iterdir())) == 2  # one copy per model
    assert [n for n, _ in summary.failed] == [4] and len(summary.written) == 6
    records = _check(out, expected)
    assert len(records) == 6
    # and again: everything is done, Ray is not needed for it
    assert run(path, out, ray=True).skipped == sorted(expected)


def test_a_video_model_is_refused_before_it_runs(tiny_package, tmp_path, capsys):
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps({"prompt": ""}) + "\n")
    code = main(["batch", str(path), "--output", str(tmp_path / "out"), "--model", str(tiny_package("svd"))])
    assert code == 1
    assert "makes videos (svd); `edgediff batch` writes images" in capsys.readouterr().out
