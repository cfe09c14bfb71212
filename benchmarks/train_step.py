"""One training step at real GPT-2 size: I-Tuning vs full fine-tuning of the same model.

    .venv/bin/python benchmarks/train_step.py [--size gpt2] [--batch 8] [--length 32] [--steps 5]

Each mode runs in its own process so peak memory is its own. Reports the median AdamW step time,
the peak resident memory and the optimizer state (AdamW's two moments) in bytes.
"""

import argparse
import json
import subprocess
import sys

import torch

from common import CLIP_TOKENS, CLIP_WIDTH, gpt2_captioner, machine, median_seconds, peak_rss_mib


def measure(mode, size, batch, length, steps, device, bf16, drop_first) -> dict:
    model = gpt2_captioner(size, drop_first).to(device).train()
    if mode == "full":
        model.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    tokens = torch.randint(0, 50000, (batch, length), device=device)
    visual = torch.randn(batch, CLIP_TOKENS, CLIP_WIDTH, device=device)

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(tokens, visual=visual, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    seconds = median_seconds(step, steps)
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim())
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mib()
    return {"mode": mode, "trainable": sum(p.numel() for p in trainable), "step_s": seconds,
            "peak_mib": peak, "optimizer_state_mib": state_bytes / 2**20}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="gpt2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--drop-first", type=int, default=0, help="I-Tuning Dropping for both modes")
    parser.add_argument("--mode", choices=["ituning", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args.size, args.batch, args.length, args.steps, args.device, args.bf16,
                                 args.drop_first)))
        return
    results = {mode: json.loads(subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode],
                                               check=True, capture_output=True, text=True).stdout.splitlines()[-1])
               for mode in ("ituning", "full")}
    ituning, full = results["ituning"], results["full"]
    print(f"# {args.size}, drop first {args.drop_first}, batch {args.batch} x {args.length} tokens, {machine()}")
    print("| mode | trainable | step (s) | peak memory (MiB) | optimizer state (MiB) |")
    print("|---|---|---|---|---|")
    for result in (ituning, full):
        print(f"| {result['mode']} | {result['trainable']:,} | {result['step_s']:.3f} | {result['peak_mib']:.0f} "
              f"| {result['optimizer_state_mib']:.1f} |")
    print(f"speed-up {full['step_s'] / ituning['step_s']:.2f}x; optimizer state "
          f"{ituning['optimizer_state_mib'] / full['optimizer_state_mib']:.3f}x; peak memory "
          f"{ituning['peak_mib'] / full['peak_mib']:.2f}x")


if __name__ == "__main__":
    main()
