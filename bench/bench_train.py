"""Training throughput of the category DDPM on this CPU: precision, memory format, width.

For each UNet width (``pipeline.backbones.ddpm.unet_arch``) it times full
training steps (forward, epsilon-MSE, backward, AdamW) at batch ``--batch`` and
64 px, counts the FLOPs of one step with ``torch.utils.flop_counter`` and
reports achieved GFLOP/s and the ratio to the CPU's fp32 peak (``--peak-gflops``,
per thread: cores x clock x FLOP/cycle; an AVX2 core with two 256-bit FMA pipes
does 32 fp32 FLOP/cycle).

    OMP_NUM_THREADS=1 python bench/bench_train.py --threads 1 --write bench/results/train_speed.md
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.backbones.ddpm import CategoryDDPM, unet_arch

WIDTHS = {"shipped 16,24,32,64": (16, 24, 32, 64), "16,32,64,128": (16, 32, 64, 128), "32,48,64,128": (32, 48, 64, 128)}


def time_steps(unet: torch.nn.Module, batch: int, size: int, precision: str, channels_last: bool, n: int) -> tuple[float, float]:
    """(seconds per step, FLOPs per step)."""
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size)
    t = torch.randint(0, 1000, (batch,))
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = unet(x, t).sample
        loss = (out.float() - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n, float(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--peak-gflops", type=float, default=78.2, help="fp32 peak per thread (2.445 GHz x 32 FLOP/cycle)")
    ap.add_argument("--bf16-widths", default="shipped 16,24,32,64", help="widths also timed with bf16 autocast (slow without AVX512-BF16)")
    ap.add_argument("--write", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, ch in WIDTHS.items():
        for precision in ("fp32", "bf16"):
            if precision == "bf16" and name not in args.bf16_widths.split(";"):
                continue
            for cl in (False, True):
                torch.manual_seed(0)
                unet = CategoryDDPM.create(64, **unet_arch(ch)).unet.train().requires_grad_(True)
                n_params = sum(p.numel() for p in unet.parameters())
                sec, flops = time_steps(unet, args.batch, 64, precision, cl, args.steps)
                gfs = flops / sec / 1e9
                rows.append((name, n_params, precision, cl, sec, flops / 1e9, gfs, gfs / (args.peak_gflops * args.threads)))
                print(rows[-1], flush=True)
    lines = [
        "| widths | params | precision | channels_last | s/step | GFLOP/step | GFLOP/s | of fp32 peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, n, prec, cl, sec, gf, gfs, ratio in rows:
        lines.append(f"| {name} | {n / 1e6:.2f} M | {prec} | {cl} | {sec:.3f} | {gf:.1f} | {gfs:.1f} | {ratio:.0%} |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        head = (f"# DDPM training throughput\n\n`{' '.join(['python bench/bench_train.py', f'--threads {args.threads}', f'--batch {args.batch}'])}` "
                f"on {platform.processor() or platform.machine()}, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
                f"{args.threads} thread(s), batch {args.batch}, 64 px.\n\n")
        with open(args.write, "w") as fh:
            fh.write(head + text + "\n")


if __name__ == "__main__":
    main()
