"""Tiny seeded upscalers in torch, the references of the ESRGAN-family graphs: BasicSR's RRDBNet
(`basicsr/archs/rrdbnet_arch.py`) and Real-ESRGAN's SRVGGNetCompact
(`realesrgan/archs/srvgg_arch.py`), written out here as those files define them (neither package
is installed), and their state dicts in the other layouts files use."""

from __future__ import annotations

import re

import numpy as np


def psnr(x: np.ndarray, ref: np.ndarray) -> float:
    """dB against the reference's own range (random weights' outputs are not in [0, 1])."""
    mse = float(np.mean((np.asarray(x, np.float64) - ref) ** 2))
    peak = float(ref.max() - ref.min())
    return float("inf") if mse == 0 else 10 * np.log10(peak * peak / mse)


def modules():
    import torch
    from torch import nn
    from torch.nn import functional as F

    class ResidualDenseBlock(nn.Module):
        def __init__(self, num_feat, num_grow_ch):
            super().__init__()
            self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
            self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
            self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
            self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
            self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
            self.lrelu = nn.LeakyReLU(negative_slope=0.2)

        def forward(self, x):
            x1 = self.lrelu(self.conv1(x))
            x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
            x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
            x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
            x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
            return x5 * 0.2 + x

    class RRDB(nn.Module):
        def __init__(self, num_feat, num_grow_ch):
            super().__init__()
            self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
            self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
            self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

        def forward(self, x):
            return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x

    class RRDBNet(nn.Module):
        def __init__(self, num_in_ch=3, num_out_ch=3, scale=4, num_feat=64, num_block=23, num_grow_ch=32):
            super().__init__()
            self.scale = scale
            num_in_ch = num_in_ch * {4: 1, 2: 4, 1: 16}[scale]
            self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
            self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
            self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
            self.lrelu = nn.LeakyReLU(negative_slope=0.2)

        def forward(self, x):
            feat = F.pixel_unshuffle(x, 4 // self.scale) if self.scale < 4 else x
            feat = self.conv_first(feat)
            feat = feat + self.conv_body(self.body(feat))
            feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
            feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
            return self.conv_last(self.lrelu(self.conv_hr(feat)))

    class SRVGGNetCompact(nn.Module):
        def __init__(self, num_in_ch=3, num_out_ch=3, num_feat=64, num_conv=16, upscale=4):
            super().__init__()
            self.upscale = upscale
            self.body = nn.ModuleList([nn.Conv2d(num_in_ch, num_feat, 3, 1, 1), nn.PReLU(num_parameters=num_feat)])
            for _ in range(num_conv):
                self.body.append(nn.Conv2d(num_feat, num_feat, 3, 1, 1))
                self.body.append(nn.PReLU(num_parameters=num_feat))
            self.body.append(nn.Conv2d(num_feat, num_out_ch * upscale * upscale, 3, 1, 1))
            self.upsampler = nn.PixelShuffle(upscale)

        def forward(self, x):
            out = x
            for layer in self.body:
                out = layer(out)
            return self.upsampler(out) + F.interpolate(x, scale_factor=self.upscale, mode="nearest")

    return RRDBNet, SRVGGNetCompact


def tiny(kind: str, scale: int = 4, seed: int = 0):
    """(torch module in eval mode, its state dict as NumPy arrays in BasicSR's names)."""
    import torch

    rrdbnet, compact = modules()
    torch.manual_seed(seed)
    if kind == "rrdb":
        model = rrdbnet(scale=scale, num_feat=8, num_block=2, num_grow_ch=4)
    else:
        model = compact(num_feat=8, num_conv=3, upscale=scale)
    model.eval()
    with torch.no_grad():  # PReLU starts at one value and biases near 0: vary them
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model, {k: v.numpy().copy() for k, v in model.state_dict().items()}


def old_esrgan_names(state: dict) -> dict:
    """BasicSR's names -> the original ESRGAN release's (`model.N...`): a Sequential of conv_first,
    the trunk (its blocks, then its last convolution), per x2 upsample-conv-ReLU, HR conv, ReLU,
    last conv."""
    blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("body."))
    fixed = {"conv_first": "model.0", "conv_body": f"model.1.sub.{blocks}", "conv_up1": "model.3",
             "conv_up2": "model.6", "conv_hr": "model.8", "conv_last": "model.10"}
    out = {}
    for k, v in state.items():
        m = re.match(r"body\.(\d+)\.rdb(\d)\.conv(\d)\.(weight|bias)", k)
        if m:
            out[f"model.1.sub.{m[1]}.RDB{m[2]}.conv{m[3]}.0.{m[4]}"] = v
        else:
            stem, kind = k.rsplit(".", 1)
            out[f"{fixed[stem]}.{kind}"] = v
    return out


def trunk_names(state: dict) -> dict:
    """BasicSR's names -> xinntao/ESRGAN's later RRDBNet_arch.py's."""
    fixed = {"conv_first": "conv_first", "conv_body": "trunk_conv", "conv_up1": "upconv1", "conv_up2": "upconv2",
             "conv_hr": "HRconv", "conv_last": "conv_last"}
    out = {}
    for k, v in state.items():
        m = re.match(r"body\.(\d+)\.rdb(\d)\.conv(\d)\.(weight|bias)", k)
        out[f"RRDB_trunk.{m[1]}.RDB{m[2]}.conv{m[3]}.{m[4]}" if m else
            f"{fixed[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}"] = v
    return out
