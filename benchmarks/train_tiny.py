"""Train the embedded default model: a tiny SD 1.x (CLIP text encoder with the real CLIP
vocabulary, UNet, 8x AutoencoderKL) that draws the shapes of `shapes.py` from their captions.

    python benchmarks/train_tiny.py --out convert/builtin/tiny-sd1

Seeded; the recipe (these arguments, steps, losses, seconds) is written to `recipe.json` in the
output folder. CPU only, well under an hour on 2 cores. Needs the `convert` extra.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgediff.benchmarks import shapes
from edgediff.benchmarks.synthetic import write_model_index

IMAGE = 64
SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "clip_sample": False, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "trained_betas": None}


@dataclass
class Recipe:
    seed: int = 0
    vae_steps: int = 4000
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_latent_l2: float = 1e-4
    dataset: int = 20000
    unet_steps: int = 6000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    caption_dropout: float = 0.1
    ema: float = 0.999
    threads: int = 2


def _log(stage: str, step: int, total: int, loss: float, started: float) -> None:
    print(f"[{stage}] {step}/{total} loss {loss:.4f} {time.perf_counter() - started:.0f}s", flush=True)


def train_vae(r: Recipe, rng: np.random.Generator):
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                        block_out_channels=(16, 32, 32, 32), norm_num_groups=4, sample_size=IMAGE,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    opt = torch.optim.AdamW(vae.parameters(), lr=r.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, r.vae_lr, total_steps=r.vae_steps, pct_start=0.05)
    started = time.perf_counter()
    for step in range(1, r.vae_steps + 1):
        x = torch.from_numpy(shapes.batch(rng, r.vae_batch, IMAGE)[0])
        # The posterior's mean with a small L2 pull on it, not a sample under a KL term: on these
        # flat shapes the sampling noise slowed reconstruction several-fold (measured).
        z = vae.encode(x).latent_dist.mode()
        recon = vae.decode(z).sample
        rec = (recon - x).abs().mean() + ((recon - x) ** 2).mean()
        loss = rec + r.vae_latent_l2 * (z**2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == 1:
            _log("vae", step, r.vae_steps, rec.item(), started)
    vae.eval()
    return vae, rec.item(), time.perf_counter() - started


def encode_dataset(vae, tok_dir: Path, r: Recipe, rng: np.random.Generator):
    import torch

    from edgediff.runtime.text import chunk_prompt
    from edgediff.runtime.tokenizer import EOS, load_clip_tokenizer

    tok = load_clip_tokenizer(tok_dir)
    latents, ids = [], []
    with torch.no_grad():
        for _ in range(r.dataset // 500):
            images, samples = shapes.batch(rng, 500, IMAGE)
            latents.append(vae.encode(torch.from_numpy(images)).latent_dist.mean)
            ids += [chunk_prompt(tok, s.caption, 77, tok.token_to_id(EOS))[0] for s in samples]
    latents = torch.cat(latents)
    scale = float(1.0 / latents.std())
    empty = chunk_prompt(tok, "", 77, tok.token_to_id(EOS))[0]
    return latents * scale, torch.tensor(ids), torch.tensor(empty), scale


def train_denoiser(latents, ids, empty, r: Recipe):
    import copy

    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=1, max_position_embeddings=77,
                                        hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
                                        pad_token_id=1, projection_dim=64))
    with torch.no_grad():  # unused vocabulary rows stay exactly zero: they compress to nothing
        text.get_input_embeddings().weight.zero_()
    unet = UNet2DConditionModel(sample_size=IMAGE // 8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), attention_head_dim=8, cross_attention_dim=64,
                                norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    noise_sched = DDPMScheduler(**{k: SCHEDULER[k] for k in ("beta_start", "beta_end", "beta_schedule",
                                                             "num_train_timesteps")})
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=r.unet_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, r.unet_lr, total_steps=r.unet_steps, pct_start=0.03)
    ema_unet, ema_text = copy.deepcopy(unet), copy.deepcopy(text)
    gen = torch.Generator().manual_seed(r.seed)
    started, running = time.perf_counter(), None
    for step in range(1, r.unet_steps + 1):
        idx = torch.randint(0, len(latents), (r.unet_batch,), generator=gen)
        x0, tokens = latents[idx], ids[idx].clone()
        drop = torch.rand(r.unet_batch, generator=gen) < r.caption_dropout
        tokens[drop] = empty
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (r.unet_batch,), generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        context = text(tokens).last_hidden_state
        loss = ((unet(xt, t, context).sample - noise) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text)):
                for pe, pl in zip(ema.parameters(), live.parameters(), strict=True):
                    pe.lerp_(pl, 1 - r.ema)
        running = float(loss) if running is None else 0.99 * running + 0.01 * float(loss)
        if step % 500 == 0 or step == 1:
            _log("unet", step, r.unet_steps, running, started)
    return ema_unet.eval(), ema_text.eval(), running, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(prog="edgediff bench train_tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    for name, value in asdict(Recipe()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    r = Recipe(**{k: getattr(args, k) for k in asdict(Recipe())})
    torch.manual_seed(r.seed)
    torch.set_num_threads(r.threads)
    rng = np.random.default_rng(r.seed)
    tok_dir = Path(__file__).resolve().parents[1] / "convert" / "data" / "clip_tokenizer"

    vae, vae_loss, vae_seconds = train_vae(r, rng)
    latents, ids, empty, scale = encode_dataset(vae, tok_dir, r, rng)
    vae.register_to_config(scaling_factor=scale)
    unet, text, unet_loss, unet_seconds = train_denoiser(latents, ids, empty, r)

    out = args.out
    scratch = out.parent / f".{out.name}.training"
    shutil.rmtree(scratch, ignore_errors=True)
    for module, name in ((unet, "unet"), (vae, "vae"), (text, "text_encoder")):
        module.half().save_pretrained(scratch / name)
    shutil.copytree(tok_dir, scratch / "tokenizer")
    (scratch / "scheduler").mkdir()
    (scratch / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    write_model_index(scratch)
    recipe = {"script": "benchmarks/train_tiny.py", **asdict(r), "latent_scale": scale,
              "final_vae_loss": vae_loss, "final_denoiser_loss": unet_loss,
              "vae_seconds": round(vae_seconds), "denoiser_seconds": round(unet_seconds),
              "torch": torch.__version__, "image_size": IMAGE}
    (scratch / "recipe.json").write_text(json.dumps(recipe, indent=2))
    if out.exists():
        shutil.rmtree(out)
    scratch.rename(out)
    print(f"wrote {out}: {json.dumps(recipe)}")
    return 0


if __name__ == "__main__":
    main()
