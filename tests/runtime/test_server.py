"""`edgediff serve`, driven by AUTOMATIC1111's own client (`webuiapi`) and by raw HTTP: the images
equal `Pipeline.generate`'s, models list and switch, progress and interrupt work, and every bad
request is a 4xx JSON error in A1111's shape."""

from __future__ import annotations

import base64
import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from edgediff.runtime import Pipeline
from edgediff.runtime.server import Limits, Models, Running, Service

PROMPT, NEGATIVE = "a red circle", "blurry"
LIMITS = Limits(max_body=200_000, max_side=256, max_steps=60, max_images=4, queue=2)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_package, tiny_source):
    from edgediff.convert import convert

    folder = tmp_path_factory.mktemp("models")
    (folder / "alpha").symlink_to(tiny_package("sd1"))
    (folder / "beta").symlink_to(tiny_package("sd1-deep"))
    convert(tiny_source("sd1"), folder / "gamma.gguf", precision="q8_0")
    (folder / "notes.txt").write_text("not a model")
    service = Service(Models(folder), "alpha", LIMITS, device="cpu")
    running = Running(service)
    yield running.url, int(running.url.rsplit(":", 1)[1]), service
    running.stop()


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _ours(package, **kw):
    return Pipeline(package, device="cpu").generate(PROMPT, NEGATIVE, **kw)


def test_webuiapi_txt2img_and_img2img_equal_generate(served, tiny_package):
    import webuiapi

    _, port, service = served
    service.switch("alpha")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=4)
    result = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=5, cfg_scale=7.0, width=64, height=64)
    ours = _ours(tiny_package("sd1"), steps=4, guidance=7.0, sampler="euler_a", seed=5, width=64, height=64)
    assert np.array_equal(_pixels(result.image), _pixels(ours))
    assert result.info["seed"] == 5 and result.info["sd_model_name"] == "alpha"
    assert result.info["infotexts"][0] == ours.info["parameters"].replace("Model: sd1,", "Model: alpha,")

    init = Image.new("RGB", (64, 64), (200, 40, 40))
    result = api.img2img(images=[init], prompt=PROMPT, negative_prompt=NEGATIVE, seed=9, cfg_scale=7.0,
                         width=64, height=64, denoising_strength=0.5, sampler_name="DPM++ 2M Karras")
    ours = _ours(tiny_package("sd1"), steps=4, guidance=7.0, sampler="dpmpp_2m", schedule="karras", seed=9,
                 width=64, height=64, init_image=init, strength=0.5)
    assert np.array_equal(_pixels(result.image), _pixels(ours))


def test_batches_models_options_and_png_info(served, tiny_package):
    import webuiapi

    _, port, service = served
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler", steps=3)
    titles = api.util_get_model_names()
    assert [t.split(" [")[0] for t in titles] == ["alpha", "beta", "gamma.gguf"]
    api.util_set_model("beta")
    assert api.util_get_current_model().startswith("beta [")
    result = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=11, width=64, height=64, batch_size=2, n_iter=1)
    assert len(result.images) == 2 and result.info["all_seeds"] == [11, 12]
    second = _ours(tiny_package("sd1-deep"), steps=3, guidance=7.0, sampler="euler", seed=12, width=64, height=64)
    assert np.array_equal(_pixels(result.images[1]), _pixels(second))
    back = api.png_info(result.images[0])
    assert back.info.startswith(PROMPT) and back.parameters["Seed"] == "11"
    assert {s["name"] for s in api.get_samplers()} >= {"Euler", "Euler a", "DPM++ 2M"}
    assert "karras" in api.util_get_scheduler_names()
    api.util_set_model("gamma.gguf")  # a GGUF package
    result = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=4, width=64, height=64)
    gguf = Pipeline(service.models.paths["gamma.gguf"], device="cpu").generate(
        PROMPT, NEGATIVE, steps=3, guidance=7.0, sampler="euler", seed=4, width=64, height=64)
    assert np.array_equal(_pixels(result.image), _pixels(gguf))
    assert api.get_progress()["state"]["job_count"] == 0
    api.util_set_model("alpha")
    assert service.name == "alpha"


def test_override_settings_are_restored_after_the_job(served):
    """As A1111: override_settings hold for the one job, unless override_settings_restore_afterwards
    is false."""
    import webuiapi

    _, port, service = served
    service.switch("alpha")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler", steps=2)
    result = api.txt2img(prompt=PROMPT, seed=2, width=64, height=64,
                         override_settings={"sd_model_checkpoint": "beta", "CLIP_stop_at_last_layers": 2})
    assert (result.info["sd_model_name"], result.info["clip_skip"]) == ("beta", 2)
    options = api.get_options()
    assert options["sd_model_checkpoint"].startswith("alpha [") and options["CLIP_stop_at_last_layers"] == 1
    try:
        result = api.txt2img(prompt=PROMPT, seed=2, width=64, height=64, override_settings_restore_afterwards=False,
                             override_settings={"sd_model_checkpoint": "beta", "CLIP_stop_at_last_layers": 2})
        assert result.info["sd_model_name"] == "beta"
        options = api.get_options()
        assert options["sd_model_checkpoint"].startswith("beta [") and options["CLIP_stop_at_last_layers"] == 2
    finally:
        api.set_options({"sd_model_checkpoint": "alpha", "CLIP_stop_at_last_layers": 1})


def test_progress_and_interrupt(served):
    url, _, _ = served
    answer = {}

    def job():
        answer["r"] = requests.post(f"{url}/sdapi/v1/txt2img", json={
            "prompt": PROMPT, "steps": 60, "width": 64, "height": 64, "seed": 1, "sampler_name": "Euler"})

    thread = threading.Thread(target=job)
    thread.start()
    seen = 0.0
    for _ in range(400):
        p = requests.get(f"{url}/sdapi/v1/progress").json()
        if p["state"]["sampling_step"] >= 2 and p["progress"] > 0:
            seen = p["progress"]
            break
        time.sleep(0.02)
    assert 0 < seen < 1 and p["state"]["job_count"] == 1
    requests.post(f"{url}/sdapi/v1/interrupt")
    thread.join(60)
    r = answer["r"]
    assert r.status_code == 200
    import json

    info = json.loads(r.json()["info"])
    assert info["interrupted"] and len(r.json()["images"]) == 1  # what it had, decoded
    import re

    ran = int(re.search(r"Interrupted: after (\d+) of 60 steps", info["infotexts"][0]).group(1))
    assert 2 <= ran < 60 and f"Steps: {ran}," in info["infotexts"][0]  # the steps that ran, not the 60 asked
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert f"Steps: {ran}," in image.info["parameters"]


def test_progress_has_a_preview_of_the_image_every_n_steps(served):
    """/progress's current_image: the latent so far through runtime.preview, a PNG of the asked
    size, every show_progress_every_n_steps (here 1, for this job only)."""
    url, _, service = served
    answer, previews = {}, []

    def job():
        answer["r"] = requests.post(f"{url}/sdapi/v1/txt2img", json={
            **SMALL, "steps": 60, "width": 128, "height": 64,
            "override_settings": {"show_progress_every_n_steps": 1}})

    thread = threading.Thread(target=job)
    thread.start()
    for _ in range(1000):
        p = requests.get(f"{url}/sdapi/v1/progress").json()
        if p["current_image"]:
            previews.append(p["current_image"])
            if len(previews) == 2:
                break
        time.sleep(0.01)
    requests.post(f"{url}/sdapi/v1/interrupt")
    thread.join(60)
    assert answer["r"].status_code == 200 and len(previews) == 2
    image = Image.open(io.BytesIO(base64.b64decode(previews[-1])))
    assert image.format == "PNG" and image.size == (128, 64) and np.asarray(image).std() > 0
    assert service.settings["show_progress_every_n_steps"] == 10  # the override held for the one job
    assert requests.get(f"{url}/sdapi/v1/progress").json()["current_image"] is None  # idle


def test_a_full_queue_answers_503(served):
    url, _, _ = served
    codes = []

    def job():
        codes.append(requests.post(f"{url}/sdapi/v1/txt2img", json={
            "prompt": PROMPT, "steps": 25, "width": 64, "height": 64, "seed": 1}))

    threads = [threading.Thread(target=job) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    statuses = sorted(r.status_code for r in codes)
    assert statuses.count(200) >= 2 and set(statuses) <= {200, 503}
    busy = [r for r in codes if r.status_code == 503]
    assert busy and busy[0].headers["Retry-After"] and "queue is full" in busy[0].json()["detail"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(("path", "body", "status", "detail"), [
    ("txt2img", b"{not json", 422, "not valid JSON"),
    ("txt2img", [1, 2], 422, "must be a JSON object"),
    ("txt2img", {"width": -64}, 422, "'width' must be between 8 and 256"),
    ("txt2img", {"height": 100000}, 422, "'height' must be between 8 and 256"),
    ("txt2img", {"width": 60}, 422, "multiple of 8"),
    ("txt2img", {"steps": 0}, 422, "'steps' must be between 1 and 60"),
    ("txt2img", {"steps": 10**6}, 422, "'steps' must be between 1 and 60"),
    ("txt2img", {"steps": "4"}, 422, "'steps' must be a number"),
    ("txt2img", {"cfg_scale": float("nan")}, 422, "must be a finite number"),
    ("txt2img", {"batch_size": 4, "n_iter": 4}, 422, "at most 4 images"),
    ("txt2img", {"sampler_name": "Euler z"}, 404, "Sampler not found"),
    ("txt2img", {"scheduler": "wavy"}, 404, "Scheduler not found"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "delta"}}, 404, "not served here"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "../alpha"}}, 404, "not served here"),
    ("img2img", {"init_images": []}, 422, "needs 'init_images'"),
    ("img2img", {"init_images": ["%%%"]}, 422, "not valid base64"),
    ("img2img", {"init_images": [_b64(b"plain text, no image")]}, 422, "not a readable image"),
    ("img2img", {"init_images": [_b64(_png()[:40])]}, 422, "not a readable image"),
    ("img2img", {"init_images": [_b64(_png())[:-7]]}, 422, "not valid base64"),
    ("img2img", {"init_images": ["data:image/png;base64," + _b64(_png()[:40])]}, 422, "not a readable image"),
    ("txt2img", {"prompt": "x" * 300_000}, 413, "over 200000 bytes"),
    ("options", {"sd_model_checkpoint": "/etc/passwd"}, 404, "not served here"),
    ("png-info", {"image": "%%%"}, 422, "not a readable base64 image"),
    ("no-such-endpoint", {}, 404, "Not Found"),
])
def test_bad_requests_are_4xx_json(served, path, body, status, detail):
    import json

    url, _, service = served
    if isinstance(body, dict) and path.endswith("2img"):
        body = {"width": 64, "height": 64, "steps": 2, **body}
    data = body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode()
    r = requests.post(f"{url}/sdapi/v1/{path}", data=data, headers={"Content-Type": "application/json"})
    assert r.status_code == status
    payload = r.json()
    assert set(payload) == {"error", "detail", "body", "errors"} and detail in payload["detail"]
    assert "Traceback" not in r.text and service.name == "alpha"


SMALL = {"prompt": PROMPT, "width": 64, "height": 64, "steps": 2, "seed": 1}
CONTROLNET_UNIT = {"enabled": True, "module": "canny", "model": "control_canny", "weight": 1.0}


@pytest.mark.parametrize(("path", "body", "named"), [
    ("txt2img", {"restore_faces": True}, "restore_faces"),
    ("txt2img", {"styles": ["cinematic"], "tiling": True}, "styles, tiling"),
    ("txt2img", {"seed_resize_from_h": 128}, "seed_resize_from_h"),
    ("txt2img", {"subseed": 5, "subseed_strength": 0.3}, "subseed_strength"),
    ("txt2img", {"script_name": "x/y/z plot", "script_args": [1]}, "script_name"),
    ("txt2img", {"alwayson_scripts": {"ADetailer": {"args": [True, {"ad_model": "face_yolov8n.pt"}]}}},
     "alwayson_scripts.ADetailer"),
    ("txt2img", {"override_settings": {"samples_format": "jpg"}}, "override_settings.samples_format"),
    ("txt2img", {"sampler_name": "DDIM", "eta": 1.0}, "eta (DDIM runs at eta 0)"),
    ("txt2img", {"sampler_name": "Euler a", "eta": 0.5}, "eta (Euler a runs at eta 1)"),
    ("img2img", {"latent_mask": _b64(_png())}, "latent_mask"),
    ("img2img", {"resize_mode": 1}, "resize_mode"),
])
def test_fields_edgediff_does_not_implement_are_422_naming_them(served, path, body, named):
    url, _, service = served
    if path == "img2img":
        body = {"init_images": [_b64(_png())], **body}
    r = requests.post(f"{url}/sdapi/v1/{path}", json={**SMALL, **body})
    assert r.status_code == 422
    assert f"edgediff does not implement {named};" in r.json()["detail"] and "--lenient" in r.json()["detail"]
    assert service.name == "alpha"


def test_default_and_disabled_fields_are_not_set(served):
    """What webuiapi and front ends send on every request (defaults, empty lists, scripts switched
    off) runs; the always-on scripts that are off do not count."""
    url, _, _ = served
    quiet = {"restore_faces": False, "styles": [], "enable_hr": False, "hr_scale": 2, "subseed": -1,
             "subseed_strength": 0, "seed_resize_from_h": -1, "seed_resize_from_w": 0, "eta": None, "s_churn": 0,
             "s_noise": 1, "script_name": None, "script_args": [], "tiling": None, "override_settings": {
                 "samples_format": "png"}, "alwayson_scripts": {"ControlNet": {"args": []}, "ADetailer": {"args": [False]},
                                                                "Other": {"args": [{**CONTROLNET_UNIT, "enabled": False}]}}}
    r = requests.post(f"{url}/sdapi/v1/txt2img", json={**SMALL, **quiet})
    assert r.status_code == 200, r.text
    r = requests.post(f"{url}/sdapi/v1/img2img", json={**SMALL, **quiet, "init_images": [_b64(_png())], "mask": None,
                                                       "mask_blur": 4, "inpainting_fill": 0, "resize_mode": 0})
    assert r.status_code == 200, r.text


def test_lenient_answers_200_and_lists_what_it_ignored(served):
    import json

    import webuiapi

    url, port, service = served
    service.lenient = True
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler", steps=2)
        result = api.txt2img(prompt=PROMPT, seed=3, width=64, height=64, restore_faces=True, styles=["x"],
                             override_settings={"samples_format": "jpg"})
        assert result.info["ignored"] == ["styles", "restore_faces", "override_settings.samples_format"]
        r = requests.post(f"{url}/sdapi/v1/options", json={"samples_format": "jpg"})
        assert r.status_code == 200 and r.json() == {"ignored": ["samples_format"]}
    finally:
        service.lenient = False
    r = requests.post(f"{url}/sdapi/v1/txt2img", json=SMALL)
    assert json.loads(r.json()["info"])["ignored"] == []


def test_options_edgediff_does_not_honour_are_422(served):
    url, port, service = served
    r = requests.post(f"{url}/sdapi/v1/options", json={"samples_format": "jpg", "CLIP_stop_at_last_layers": 2})
    assert r.status_code == 422 and "edgediff does not implement samples_format;" in r.json()["detail"]
    assert service.settings["CLIP_stop_at_last_layers"] == 1  # all or nothing
    options = requests.get(f"{url}/sdapi/v1/options").json()
    r = requests.post(f"{url}/sdapi/v1/options", json=options)  # what GET says, posted back, changes nothing
    assert r.status_code == 200 and r.json() is None
    r = requests.post(f"{url}/sdapi/v1/options", json={"samples_format": "png", "CLIP_stop_at_last_layers": 2})
    try:
        assert r.status_code == 200 and requests.get(f"{url}/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
        import json

        info = json.loads(requests.post(f"{url}/sdapi/v1/txt2img", json=SMALL).json()["info"])
        assert info["clip_skip"] == 2 and "Clip skip: 2" in info["infotexts"][0]
    finally:
        requests.post(f"{url}/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1})


def test_listings_in_a1111_shapes_as_webuiapi_reads_them(served, tmp_path):
    """What clients call at start-up answers in A1111's shape: empty where edgediff has nothing of
    the kind, the LoRA folder's files, the models folder read again, real memory figures."""
    import webuiapi
    from safetensors.numpy import save_file

    _, port, service = served
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
    assert api.get_loras() == []  # no --lora-dir
    (tmp_path / "styles").mkdir()
    save_file({"lora_unet_x.lora_down.weight": np.zeros((1, 4), np.float32)}, tmp_path / "styles" / "ink.safetensors",
              metadata={"ss_output_name": "ink-v2", "ss_network_dim": "1"})
    (tmp_path / "broken.safetensors").write_bytes(b"\x01")
    service.lora_dir = tmp_path
    try:
        loras = api.get_loras()
        assert [(x["name"], x["alias"]) for x in loras] == [("broken", "broken"), ("ink", "ink-v2")]
        assert loras[1]["metadata"]["ss_network_dim"] == "1" and loras[1]["path"].endswith("ink.safetensors")
        assert api.session.post(f"{api.baseurl}/refresh-loras").status_code == 200
    finally:
        service.lora_dir = None
    assert api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos", "Nearest"]  # no --upscalers-dir
    for empty in (api.get_prompt_styles(), api.get_sd_vae(), api.get_face_restorers(), api.get_hypernetworks(),
                  api.get_realesrgan_models(), api.get_latent_upscale_modes()):
        assert empty == []
    memory = api.get_memory()
    assert 0 < memory["ram"]["used"] < memory["ram"]["total"] and 0 < memory["ram"]["free"] <= memory["ram"]["total"]
    assert "error" in memory["cuda"]
    flags = api.get_cmd_flags()
    assert flags["ckpt_dir"] == str(service.models.folder) and flags["lenient"] is False

    folder = service.models.folder
    (folder / "delta").symlink_to(service.models.paths["alpha"].resolve())
    try:
        assert "delta" not in [m["model_name"] for m in api.get_sd_models()]
        api.refresh_checkpoints()
        assert [m["model_name"] for m in api.get_sd_models()] == ["alpha", "beta", "delta", "gamma.gguf"]
    finally:
        (folder / "delta").unlink()
        api.refresh_checkpoints()
    assert [m["model_name"] for m in api.get_sd_models()] == ["alpha", "beta", "gamma.gguf"]


def test_skip_stops_the_image_running_now_and_the_job_goes_on(served):
    """As A1111's skip: the image being sampled stops (decoded as it is, its parameters saying the
    steps that ran); the next image of the batch runs whole."""
    import json

    url, _, _ = served
    answer = {}

    def job():
        answer["r"] = requests.post(f"{url}/sdapi/v1/txt2img", json={**SMALL, "steps": 60, "n_iter": 2})

    thread = threading.Thread(target=job)
    thread.start()
    for _ in range(1000):
        state = requests.get(f"{url}/sdapi/v1/progress").json()["state"]
        if state["sampling_step"] >= 2 and state["job_no"] == 0:
            break
        time.sleep(0.01)
    assert requests.post(f"{url}/sdapi/v1/skip").status_code == 200
    thread.join(120)
    info = json.loads(answer["r"].json()["info"])
    skipped, whole = sorted(info["infotexts"], key=lambda text: "Interrupted" not in text)  # the first, unless slow
    assert "Interrupted: after " in skipped and "Steps: 60," not in skipped
    assert "Steps: 60," in whole and "Interrupted" not in whole
    assert len(answer["r"].json()["images"]) == 2 and not info["interrupted"]


def test_saved_images_and_the_outputs_folder(served, tmp_path):
    """save_images writes A1111's outputs/txt2img-images/DATE/NNNNN-SEED.png (not with
    do_not_save_samples); send_images=false answers no images; the history lists what was written
    and the outputs endpoint serves nothing else."""
    url, _, service = served
    service.outputs = tmp_path / "outputs"
    requests.post(f"{url}/sdapi/v1/txt2img", json={**SMALL, "save_images": True, "do_not_save_samples": True})
    assert not (tmp_path / "outputs").exists()
    r = requests.post(f"{url}/sdapi/v1/txt2img", json={**SMALL, "seed": 7, "n_iter": 2, "save_images": True,
                                                       "send_images": False})
    assert r.status_code == 200 and r.json()["images"] == []
    r = requests.post(f"{url}/sdapi/v1/img2img", json={**SMALL, "init_images": [_b64(_png())], "save_images": True})
    assert r.json()["parameters"]["init_images"] is None  # echoed without the image, as A1111
    days = list((tmp_path / "outputs" / "txt2img-images").iterdir())
    assert len(days) == 1 and sorted(p.name for p in days[0].iterdir()) == ["00000-7.png", "00001-8.png"]
    listed = requests.get(f"{url}/edgediff/history").json()["images"]
    assert [x["name"].split("/")[0] for x in listed] == ["img2img-images", "txt2img-images", "txt2img-images"]
    assert "Seed: 8," in listed[1]["parameters"] and listed[1]["name"].endswith("00001-8.png")
    assert requests.get(url + listed[1]["url"]).content == (days[0] / "00001-8.png").read_bytes()
    (tmp_path / "secret.png").write_bytes(_png())
    (tmp_path / "outputs" / "notes.txt").write_text("x")
    for bad in ("..%2Fsecret.png", "%2e%2e/secret.png", "notes.txt", "txt2img-images/none.png"):
        r = requests.get(f"{url}/edgediff/outputs/{bad}")
        assert r.status_code == 404 and set(r.json()) == {"error", "detail", "body", "errors"}


def test_password(tiny_package, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "alpha").symlink_to(tiny_package("sd1"))
    running = Running(Service(Models(folder), limits=LIMITS, device="cpu"), auth=("me", "secret"))
    try:
        url = f"{running.url}/sdapi/v1/options"
        assert requests.get(url).status_code == 401
        assert requests.get(url, auth=("me", "wrong")).status_code == 401
        assert requests.get(url, auth=("me", "secret")).json()["sd_model_checkpoint"].startswith("alpha")
    finally:
        running.stop()


def test_a_video_model_answers_422_with_the_command_to_use(tiny_package, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "alpha").symlink_to(tiny_package("sd1"))
    (folder / "clip").symlink_to(tiny_package("svd"))
    service = Service(Models(folder), "alpha", LIMITS, device="cpu")
    running = Running(service)
    try:
        body = {**SMALL, "override_settings": {"sd_model_checkpoint": "clip"}}
        r = requests.post(f"{running.url}/sdapi/v1/txt2img", json=body)
        assert r.status_code == 422 and service.name == "alpha"  # the job's model, restored after it
        assert "clip (svd) makes videos from an image" in r.json()["detail"]
        assert f"edgediff generate --model {folder / 'clip'} --init-image IMAGE" in r.json()["detail"]
        service.switch("clip")
        r = requests.post(f"{running.url}/sdapi/v1/img2img", json={"init_images": [_b64(_png())], "width": 64,
                                                                   "height": 64, "steps": 2})
        assert r.status_code == 422 and "makes videos" in r.json()["detail"] and "Traceback" not in r.text
    finally:
        running.stop()


def test_serve_refuses_other_addresses_without_a_password(tmp_path, capsys):
    from edgediff.cli import main

    assert main(["serve", "--models", str(tmp_path), "--listen"]) == 2
    assert "--api-auth" in capsys.readouterr().err
    assert main(["serve", "--models", str(tmp_path / "none")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["serve", "--models", str(tmp_path)]) == 2
    assert f"--output {tmp_path}/NAME" in capsys.readouterr().err  # the folder's name, not '{folder}'


def test_serve_mistakes_are_messages(served, capsys):
    from edgediff.cli import main

    folder = served[2].models.folder
    assert main(["serve", "--models", str(folder), "--model", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--model nope: model 'nope' is not served here (served: alpha, beta, gamma.gguf)" in err
    assert "Traceback" not in err and "serving" not in err
    assert main(["serve", "--models", str(folder), "--port", "99999"]) == 2
    assert "--port 99999: a port is 1-65535" in capsys.readouterr().err


def test_files_other_tools_wrote_are_opened_by_the_hook_the_cli_hands_in(served):
    """runtime imports nothing from convert: `edgediff serve` passes convert.adopt.runnable in."""
    folder, opened = served[2].models.folder, []
    service = Service(Models(folder), "gamma.gguf", LIMITS, device="cpu",
                      runnable=lambda path: opened.append(path.name) or path)
    assert opened == ["gamma.gguf"] and service.pipe.manifest.family == "sd1"
    service.switch("alpha")  # a package folder needs no hook
    assert opened == ["gamma.gguf"]


def browser(width: int = 1100, height: int = 760):
    """Headless Chromium (Debian's chromium and chromium-driver) through selenium; skipped where
    they are missing, unless EDGEDIFF_REQUIRE_BROWSER is set (CI installs them and sets it)."""
    import os
    import shutil

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        message = "the page test needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        if os.environ.get("EDGEDIFF_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=ChromeService(driver), options=options)


def _type(driver, **fields) -> None:
    from selenium.webdriver.common.by import By

    for element, value in fields.items():
        field = driver.find_element(By.ID, element)
        field.clear()
        field.send_keys(str(value))


def _wait_done(driver, seconds: float = 120) -> set[int]:
    """Wait until the page says done (or cancelled, or shows an error); the bar values seen."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    seen = set()

    def finished(d):
        seen.add(int(d.find_element(By.ID, "bar").get_attribute("aria-valuenow")))
        return d.find_element(By.ID, "status").text in ("done", "cancelled") or d.find_element(By.ID, "error").text

    try:
        WebDriverWait(driver, seconds, poll_frequency=0.05).until(finished)
    except Exception:
        raise AssertionError(f"status {driver.find_element(By.ID, 'status').text!r}, logs "
                             f"{driver.get_log('browser')}") from None
    seen.add(int(driver.find_element(By.ID, "bar").get_attribute("aria-valuenow")))  # as it ended: the
    assert driver.find_element(By.ID, "error").text == ""  # status may turn between the two reads above
    return seen


def _src_image(element) -> Image.Image:
    src = element.get_attribute("src")
    if src.startswith("data:"):
        return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    return Image.open(io.BytesIO(requests.get(src).content))


def test_the_page_in_a_browser(served, tiny_package, tmp_path):
    """Type a prompt, press Generate, watch the progress bar fill, read the image back: it is
    `Pipeline.generate`'s; it is in the outputs folder and in the history after a reload, with a
    download link to the PNG and its parameters."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, _, service = served
    service.switch("alpha")
    service.outputs = tmp_path / "outputs"
    driver = browser()
    try:
        driver.get(url + "/")
        WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#sampler option")) > 0)
        assert Select(driver.find_element(By.ID, "model")).first_selected_option.text.startswith("alpha [")
        assert driver.find_elements(By.CSS_SELECTOR, "#history img") == []
        _type(driver, prompt=PROMPT, negative=NEGATIVE, width=256, height=256, steps=60, cfg=7, seed=21)
        Select(driver.find_element(By.ID, "sampler")).select_by_visible_text("Euler")
        driver.find_element(By.ID, "generate").click()
        seen = _wait_done(driver)
        assert max(seen) == 100 and any(0 < v < 100 for v in seen)  # the bar moved while it ran
        image = _src_image(driver.find_element(By.ID, "image"))
        ours = _ours(tiny_package("sd1"), steps=60, guidance=7.0, sampler="euler", seed=21, width=256, height=256)
        assert np.array_equal(_pixels(image), _pixels(ours))
        assert "Seed: 21" in driver.find_element(By.ID, "parameters").text
        assert len(driver.find_elements(By.CSS_SELECTOR, "#history img")) == 1
        driver.save_screenshot(str(tmp_path / "page.png"))

        saved = list((tmp_path / "outputs" / "txt2img-images").glob("*/00000-21.png"))
        assert len(saved) == 1 and np.array_equal(_pixels(Image.open(saved[0])), _pixels(ours))
        driver.refresh()  # the history is the server's: it survives a reload
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#history img"))
        driver.find_element(By.CSS_SELECTOR, "#history img").click()
        assert "Seed: 21" in driver.find_element(By.ID, "parameters").text
        assert np.array_equal(_pixels(_src_image(driver.find_element(By.ID, "image"))), _pixels(ours))
        link = driver.find_element(By.CSS_SELECTOR, "#history a[download]")
        download = requests.get(link.get_attribute("href"))
        assert download.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(download.content)).info["parameters"] == ours.info["parameters"].replace(
            "Model: sd1,", "Model: alpha,")
    finally:
        driver.quit()


def test_the_page_img2img_batches_model_switch_and_cancel(served, tiny_package, tmp_path):
    """The page's other controls in Chromium: upload an image and a strength (img2img), batch
    count, switch the model, and cancel a long job (the image so far comes back, saying so)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, _, service = served
    service.switch("alpha")
    service.outputs = tmp_path / "outputs"
    init = Image.fromarray((np.indices((64, 64)).sum(0) * 3 % 256).astype(np.uint8)).convert("RGB")
    init.save(tmp_path / "start.png")
    driver = browser()
    try:
        driver.get(url + "/")
        WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#schedule option")) > 0)
        driver.find_element(By.ID, "init").send_keys(str(tmp_path / "start.png"))
        WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "init-image").is_displayed())
        _type(driver, prompt=PROMPT, negative=NEGATIVE, width=64, height=64, steps=4, cfg=7, seed=9, strength=0.5,
              n_iter=2)
        Select(driver.find_element(By.ID, "sampler")).select_by_visible_text("Euler")
        Select(driver.find_element(By.ID, "schedule")).select_by_value("karras")
        driver.find_element(By.ID, "generate").click()
        _wait_done(driver)
        results = driver.find_elements(By.CSS_SELECTOR, "#result img")
        assert len(results) == 2
        ours = _ours(tiny_package("sd1"), steps=4, guidance=7.0, sampler="euler", schedule="karras", seed=9,
                     width=64, height=64, init_image=init, strength=0.5)
        assert np.array_equal(_pixels(_src_image(results[0])), _pixels(ours))
        assert len(list((tmp_path / "outputs" / "img2img-images").glob("*/*.png"))) == 2
        assert len(driver.find_elements(By.CSS_SELECTOR, "#history img")) == 2

        Select(driver.find_element(By.ID, "model")).select_by_index(1)  # beta
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "status").text.startswith("model: beta ["))
        assert service.name == "beta"

        driver.find_element(By.ID, "clear-init").click()  # back to txt2img, and a long job to cancel
        _type(driver, width=256, height=256, steps=60, n_iter=1)
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 60, poll_frequency=0.02).until(
            lambda d: d.find_element(By.ID, "status").text.startswith("step ") and not d.find_element(
                By.ID, "status").text.startswith("step 0 "))
        driver.find_element(By.ID, "cancel").click()
        _wait_done(driver)
        assert driver.find_element(By.ID, "status").text == "cancelled"
        assert "Interrupted: after " in driver.find_element(By.ID, "parameters").text
        assert "Model: beta," in driver.find_element(By.ID, "parameters").text
    finally:
        driver.quit()
        service.switch("alpha")


def test_forty_concurrent_requests_are_each_answered(served):
    """Each gets its image (its own seed and prompt back) or a 503; none lost or mixed up."""
    from concurrent.futures import ThreadPoolExecutor

    url, _, service = served

    def ask(i: int):
        body = {"prompt": f"{PROMPT} {i}", "seed": 1000 + i, "steps": 2, "width": 64, "height": 64}
        return i, requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=300)

    with ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(ask, range(40)))
    ok = 0
    for i, r in answers:
        assert r.status_code in (200, 503)
        if r.status_code == 200:
            import json

            info = json.loads(r.json()["info"])
            assert (info["seed"], info["prompt"]) == (1000 + i, f"{PROMPT} {i}") and len(r.json()["images"]) == 1
            ok += 1
    assert ok >= 1 and service.admitted == 0


def test_a_client_that_leaves_mid_job(served):
    url, _, service = served
    body = {"prompt": PROMPT, "steps": 60, "width": 256, "height": 256, "seed": 3}
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=0.2)
    for _ in range(600):  # the job finishes on its own; the server goes on
        if service.admitted == 0:
            break
        time.sleep(0.05)
    assert service.admitted == 0 and requests.get(f"{url}/sdapi/v1/progress").json()["progress"] == 0
    r = requests.post(f"{url}/sdapi/v1/txt2img", json=dict(body, steps=2, width=64, height=64), timeout=60)
    assert r.status_code == 200


def test_memory_stays_flat_over_sequential_requests(served):
    """RSS of the serving process after 10 warm-up requests and after 40 more: no growth per
    request beyond noise (a leaked image or session per request would be megabytes each)."""
    from edgediff.benchmarks.serve import _rss_mb

    url, _, _ = served
    body = {"prompt": PROMPT, "steps": 2, "width": 64, "height": 64, "seed": 3}
    for _ in range(10):
        requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=60).raise_for_status()
    before = _rss_mb()
    for _ in range(40):
        requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=60).raise_for_status()
    assert _rss_mb() - before < 40


def test_serve_flags_reach_the_server(tmp_path, monkeypatch):
    from edgediff.cli import main
    from edgediff.convert.adopt import runnable
    from edgediff.runtime import server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda *args, **kwargs: seen.update(args=args, kwargs=kwargs))
    assert main(["serve", "--models", str(tmp_path), "--lenient", "--outputs", str(tmp_path / "out")]) == 0
    from edgediff.convert.controlnet import controlnet_package

    adopt = {"controlnet_package": controlnet_package}
    assert seen["kwargs"] == {"lenient": True, "outputs": tmp_path / "out", "embeddings_dir": None,
                              "upscalers_dir": None, "controlnets_dir": None, **adopt} and seen["args"][-1] is runnable
    assert main(["serve", "--models", str(tmp_path), "--embeddings-dir", "e", "--upscalers-dir", "u",
                 "--controlnet-dir", "c"]) == 0
    assert seen["kwargs"] == {"lenient": False, "outputs": None, "embeddings_dir": Path("e"), "upscalers_dir": Path("u"),
                              "controlnets_dir": Path("c"), **adopt}


def test_embeddings_and_upscalers_through_the_server(tiny_package, tmp_path):
    """An embedding in a prompt gives the CLI's (Pipeline's) image; /embeddings lists it; an
    ESRGAN-family file upscales through /extra-single-image as runtime.upscale does."""
    import onnx
    import webuiapi
    from onnx import numpy_helper
    from safetensors.numpy import save_file

    from edgediff.runtime.tokenizer import load_clip_tokenizer
    from edgediff.runtime.upscale import load_upscaler, upscale

    from tiny_upscalers import tiny

    package = tiny_package("sd1")
    model = onnx.load(str(package / "text_encoder" / "model.onnx"))
    table = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("token_embedding.weight"))
    ids = load_clip_tokenizer(package / "tokenizer").encode("red circle", add_special_tokens=False).ids
    (tmp_path / "emb").mkdir()
    save_file({"emb_params": table[ids][::-1].copy()}, str(tmp_path / "emb" / "circlered.safetensors"))
    (tmp_path / "up").mkdir()
    save_file(tiny("rrdb", scale=2)[1], str(tmp_path / "up" / "tiny-x2.safetensors"))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "alpha").symlink_to(package)
    running = Running(Service(Models(tmp_path / "models"), limits=LIMITS, device="cpu", embeddings_dir=tmp_path / "emb",
                              upscalers_dir=tmp_path / "up"))
    try:
        host, port = running.url.rsplit(":", 1)
        api = webuiapi.WebUIApi(host=host.removeprefix("http://"), port=int(port))
        assert list(api.get_embeddings()["loaded"]) == ["circlered"]
        assert [u["name"] for u in api.get_upscalers()][-1] == "tiny-x2"
        args = dict(steps=3, width=64, height=64, seed=5, guidance=7.0, sampler="euler")
        got = api.txt2img(prompt="a circlered", steps=3, width=64, height=64, seed=5, cfg_scale=7.0,
                          sampler_name="Euler").image
        want = Pipeline(package, device="cpu", embeddings_dir=tmp_path / "emb").generate("a circlered", **args)
        plain = Pipeline(package, device="cpu").generate("a circlered", **args)
        assert not np.array_equal(_pixels(want), _pixels(plain))  # the embedding changes the image
        assert np.array_equal(_pixels(got), _pixels(want))
        small = want.resize((32, 32))
        up = api.extra_single_image(small, upscaler_1="tiny-x2", upscaling_resize=2).image
        assert up.size == (64, 64)
        direct = upscale(load_upscaler(tmp_path / "up" / "tiny-x2.safetensors", "cpu"), small, size=(64, 64))
        assert np.array_equal(_pixels(up), _pixels(direct))
        lanczos = api.extra_single_image(small, upscaler_1="Lanczos", upscaling_resize=2).image
        assert np.array_equal(_pixels(lanczos), _pixels(small.resize((64, 64), Image.Resampling.LANCZOS)))
        r = requests.post(f"{running.url}/sdapi/v1/extra-single-image",
                          json={"image": webuiapi.raw_b64_img(small), "upscaler_1": "nope"})
        assert r.status_code == 404 and "tiny-x2" in r.json()["detail"]
        r = requests.post(f"{running.url}/sdapi/v1/extra-single-image",
                          json={"image": webuiapi.raw_b64_img(small), "gfpgan_visibility": 0.5})
        assert r.status_code == 422 and "gfpgan_visibility" in r.json()["detail"]
    finally:
        running.stop()


def test_inpainting_and_hires_fix_give_generates_images(served, tiny_package):
    """A1111's inpainting fields (with the API's defaults) and hires fix map onto Pipeline.generate."""
    import webuiapi

    _, port, service = served
    service.switch("alpha")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler", steps=3)
    init = Image.new("RGB", (64, 64), (200, 40, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    result = api.img2img(images=[init], mask_image=mask, prompt=PROMPT, negative_prompt=NEGATIVE, seed=3, cfg_scale=7.0,
                         width=64, height=64,
                         denoising_strength=0.8, inpainting_fill=1, inpaint_full_res=False, mask_blur=2)
    ours = _ours(tiny_package("sd1"), steps=3, guidance=7.0, sampler="euler", seed=3, width=64, height=64,
                 init_image=init, strength=0.8, mask=mask, mask_blur=2, inpainting_fill=1, inpaint_full_res=False,
                 inpaint_full_res_padding=0)
    assert np.array_equal(_pixels(result.image), _pixels(ours))
    assert "Mask blur: 2" in result.info["infotexts"][0]
    result = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=4, cfg_scale=7.0, width=64, height=64,
                         enable_hr=True, hr_scale=1.5,
                         hr_upscaler="Lanczos", hr_second_pass_steps=2, denoising_strength=0.5)
    ours = _ours(tiny_package("sd1"), steps=3, guidance=7.0, sampler="euler", seed=4, width=64, height=64,
                 hires_scale=1.5, hires_upscaler="Lanczos", hires_steps=2, hires_strength=0.5)
    assert result.image.size == (96, 96) and np.array_equal(_pixels(result.image), _pixels(ours))
    assert "Hires upscaler: Lanczos" in result.info["infotexts"][0]
    r = requests.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img",
                      json={**SMALL, "enable_hr": True, "hr_upscaler": "nope-x4"})
    assert r.status_code == 404 and "hr_upscaler 'nope-x4' not found" in r.json()["detail"]


def test_controlnet_units_through_the_extension_api(tiny_package, tmp_path):
    """The ControlNet extension's API as webuiapi drives it: the models and modules listed, a unit
    in alwayson_scripts gives edgediff.Pipeline's image with the same ControlNet."""
    import webuiapi

    from edgediff import Pipeline as AnyPipeline
    from edgediff.convert.controlnet import controlnet_package
    from edgediff.runtime.controlnet import ControlNetUnit

    from tiny_models import build_tiny_controlnet

    (tmp_path / "cn").mkdir()
    build_tiny_controlnet(tmp_path / "cn" / "edges", "sd1", seed=1)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "alpha").symlink_to(tiny_package("sd1"))
    running = Running(Service(Models(tmp_path / "models"), limits=LIMITS, device="cpu", controlnets_dir=tmp_path / "cn",
                              controlnet_package=controlnet_package))
    control = Image.new("RGB", (64, 64), (0, 0, 0))
    control.paste((255, 255, 255), (16, 16, 48, 48))
    try:
        host, port = running.url.rsplit(":", 1)
        api = webuiapi.WebUIApi(host=host.removeprefix("http://"), port=int(port))
        assert api.controlnet_model_list() == ["edges"] and api.controlnet_module_list() == ["none", "canny"]
        unit = webuiapi.ControlNetUnit(image=control, module="none", model="edges [abc123]", weight=0.8,
                                       guidance_start=0.1, guidance_end=0.9)
        got = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=6, steps=3, cfg_scale=7.0, width=64, height=64,
                          sampler_name="Euler", controlnet_units=[unit]).image
        want = AnyPipeline(tiny_package("sd1"), device="cpu").generate(
            PROMPT, NEGATIVE, seed=6, steps=3, guidance=7.0, width=64, height=64, sampler="euler",
            controlnets=[ControlNetUnit(tmp_path / "cn" / "edges", control, 0.8, 0.1, 0.9)])
        plain = _ours(tiny_package("sd1"), seed=6, steps=3, guidance=7.0, width=64, height=64, sampler="euler")
        assert np.array_equal(_pixels(got), _pixels(want)) and not np.array_equal(_pixels(want), _pixels(plain))
        missing = webuiapi.ControlNetUnit(image=control, model="nope")
        r = requests.post(f"{running.url}/sdapi/v1/txt2img", json={**SMALL, "alwayson_scripts": {
            "ControlNet": {"args": [missing.to_dict()]}}})
        assert r.status_code == 404 and "ControlNet model 'nope' not found (there are: edges)" in r.json()["detail"]
        wide = webuiapi.ControlNetUnit(image=Image.new("RGB", (96, 64)), model="edges", resize_mode="Crop and Resize")
        r = requests.post(f"{running.url}/sdapi/v1/txt2img", json={**SMALL, "alwayson_scripts": {
            "ControlNet": {"args": [wide.to_dict()]}}})
        assert r.status_code == 422 and "args[0].resize_mode" in r.json()["detail"]
    finally:
        running.stop()
