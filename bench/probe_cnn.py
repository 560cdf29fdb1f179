"""How much can a plain local CNN gain over bicubic on these photos? (the default model's design probe)

    python -m bench.probe_cnn TRAIN_DIR VAL_DIR [--seconds 180] [--no-write]

An ESPCN-like network (3x3 convolutions on the LR image, pixel shuffle to x4, added to the bicubic
upsampling, last layer zero so it starts as bicubic) trained with L2 on clean bicubic x4 pairs,
then scored like ``bench.eval_model`` on the held-out crops. It told the recipe that the data
allows a gain a 16x16 px token's linear output did not reach (recipe README, "Detail head").
Not SMFSR and not shipped: a yardstick.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .eval_model import held_out, score
from .harness import Table, report


def espcn(width: int = 64, layers: int = 6) -> nn.Sequential:
    body: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
    for _ in range(layers - 2):
        body += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
    last = nn.Conv2d(width, 3 * 16, 3, padding=1)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*body, last)


def upscale(net: nn.Module, lr: torch.Tensor) -> torch.Tensor:
    from smfsr.pipeline import resize

    return resize(lr, lr.shape[-2] * 4, lr.shape[-1] * 4) + F.pixel_shuffle(net(lr * 2 - 1), 4) / 2


def probe(train_dir: Path, val_dir: Path, *, seconds: float = 180, crop: int = 128, batch: int = 16,
          val_crop: int = 256, max_steps: int | None = None) -> Table:
    from smfsr.pipeline import resize
    from smfsr_trainer.data import SRPairs

    torch.manual_seed(0)
    net = espcn()
    data = SRPairs(str(train_dir), crop=crop, scale=4, degradation="bicubic", seed=0)
    hr_val, lr_val = held_out(val_dir, val_crop, "bicubic")
    optimiser = torch.optim.Adam(net.parameters(), 1e-3)
    step, epoch, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds and (max_steps is None or step < max_steps):
        data.set_epoch(epoch)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(epoch)).tolist()
        epoch += 1
        for i in range(0, len(order), batch):
            items = [data[j] for j in order[i : i + batch]]
            hr, lr = torch.stack([it["hr"] for it in items]), torch.stack([it["lr"] for it in items])
            loss = F.mse_loss(upscale(net, lr), hr)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            step += 1
    with torch.no_grad():
        ours = score(upscale(net, lr_val).clamp(0, 1), hr_val)
    base = score(resize(lr_val, *hr_val.shape[-2:]), hr_val)
    params = sum(p.numel() for p in net.parameters())
    table = Table(f"CNN probe: {params / 1e3:.0f} k-parameter ESPCN-like net, L2 on clean x4 pairs of {train_dir}, "
                  f"{step} steps in {time.perf_counter() - start:.0f} s; held-out {val_crop} px crops of {val_dir}",
                  ["method", "PSNR (dB)", "SSIM", "sharpness / ground truth"])
    for name, s in (("bicubic", base), ("CNN probe", ours)):
        table.add(name, f"{s.psnr:.2f}", f"{s.ssim:.4f}", f"{s.sharpness_ratio:.3f}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.probe_cnn")
    parser.add_argument("train_dir", type=Path)
    parser.add_argument("val_dir", type=Path)
    parser.add_argument("--seconds", type=float, default=180, help="training time budget")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    report([probe(args.train_dir, args.val_dir, seconds=args.seconds)], write=not args.no_write)


if __name__ == "__main__":
    main()
