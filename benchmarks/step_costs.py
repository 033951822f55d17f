"""Milliseconds per training step and per 1,000 evaluated samples for each model of a family, under the optional
speed flags (--channels_last, --amp, --compile) and evaluation variants, measured in this process on random data
of the dataset's shape.

    python benchmarks/step_costs.py [--family HtFE2] [--image 3 32 32] [--batch 10] [--steps 20] [--device cpu]
        [--threads 1] [--compile]

Rows per model: the training step as today (fp32, contiguous), with channels_last, with bf16 autocast (fp16 and
its grad scaler on CUDA), with torch.compile (--compile; its compile time printed apart); evaluation under
no_grad in batches of 256 (today), under inference_mode in batches of 256 and of 1,024. Each variant starts from
the same weights; the first steps are warm-up and not timed; the variants run interleaved --repeats times and the
fastest of each is printed.
"""
import argparse
import copy
import platform
import time

import torch
import torch.nn.functional as F

from flcore.trainmodel import build_family_model, family_models

WARMUP = 3


def clock(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def step_ms(model, batch, labels, steps, device, memory_format=torch.contiguous_format, amp=None):
    """Mean milliseconds of an SGD step (forward, cross-entropy, backward, step) after the warm-up."""
    model = model.to(memory_format=memory_format)
    batch = batch.contiguous(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    model.train()
    for i in range(WARMUP + steps):
        if i == WARMUP:
            start = clock(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(model(batch), labels)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    return (clock(device) - start) / steps * 1000


def eval_ms(model, data, batch_size, mode):
    """Milliseconds per 1,000 samples of eval-mode forward passes in batches of `batch_size`."""
    model.eval()
    with mode():
        model(data[:batch_size])
        start = clock(data.device)
        for first in range(0, len(data), batch_size):
            model(data[first:first + batch_size])
        return (clock(data.device) - start) / len(data) * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="HtFE2")
    parser.add_argument("--image", type=int, nargs=3, default=[3, 32, 32], metavar=("C", "H", "W"))
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the fastest of each is kept")
    parser.add_argument("--eval_samples", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile on CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"machine: {platform.node()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), device {device}; batch {args.batch}, image {args.image}")
    half = torch.bfloat16 if device.type == "cpu" else torch.float16
    header = ["fp32", "channels_last", f"autocast {str(half).split('.')[1]}"] + (["compiled"] if args.compile else [])
    print(f"\n| model | {' | '.join(f'train step ms, {h}' for h in header)} | eval ms/1k no_grad 256 | "
          f"inference_mode 256 | inference_mode 1024 |")
    print("|---" * (len(header) + 4) + "|")
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(args.batch, *args.image, generator=generator).to(device)
    labels = torch.randint(0, 10, (args.batch,), generator=generator).to(device)
    data = torch.randn(args.eval_samples, *args.image, generator=generator).to(device)
    for index, name in enumerate(family_models(args.family)):
        torch.manual_seed(index)
        model = build_family_model(args.family, index, 10, 512, args.image[0], args.image[1]).to(device)
        variants = [{}, {"memory_format": torch.channels_last}, {"amp": half}]
        # Interleaved repeats, the fastest kept: a busy machine slows whichever variant it happens to meet.
        cells = [min(timings) for timings in zip(*(
            [step_ms(copy.deepcopy(model), batch, labels, args.steps, device, **variant) for variant in variants]
            for _ in range(args.repeats)))]
        compile_note = ""
        if args.compile:
            compiled = torch.compile(copy.deepcopy(model))
            start = time.perf_counter()
            step_ms(compiled, batch, labels, 1, device)
            compile_note = f" (compile + first steps {time.perf_counter() - start:.1f} s)"
            cells.append(step_ms(compiled, batch, labels, args.steps, device))
        cells += [min(timings) for timings in zip(*(
            [eval_ms(model, data, 256, torch.no_grad), eval_ms(model, data, 256, torch.inference_mode),
             eval_ms(model, data, 1024, torch.inference_mode)] for _ in range(args.repeats)))]
        print(f"| {name}{compile_note} | {' | '.join(f'{c:.1f}' for c in cells)} |")


if __name__ == "__main__":
    main()
