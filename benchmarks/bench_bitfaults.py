"""Time BER bit-flip injection on all of VGG11's (CIFAR-10 shape) int8 weights against one
forward pass of a 256-image batch; prints one JSON line. Goal: injection <= 2x the forward pass.

The weights are quantized once; every trial then draws fresh flips for every mapped weight and
writes the faulty int8 tensors (bitfaults.bit_flip), which is what an evaluation does per trial.
Also timed: the same into reused buffers (out=), flipping in place and back (BitFlips.apply_,
an XOR, is its own inverse), drawing alone, and the quantized forward pass with flips installed.
On a busy machine, torch's multi-threaded copies of whole tensors dominate; the in-place trial
only touches the flipped bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from common import median_ms

from reduce_ops.hardware.bitfaults import bit_flip, draw_bit_flips, draw_model_bit_flips
from reduce_ops.models import build_model
from reduce_ops.quant import QuantizedWeights, quantize

GOAL_RATIO = 2.0


def run(ber: float, batch: int, repeats: int, seed: int) -> dict:
    """Figures for one BER; the model is randomly initialised (weights' values do not matter)."""
    torch.manual_seed(0)
    model = build_model("vgg11", (3, 32, 32), 10).eval()
    x = torch.randn(batch, 3, 32, 32)
    qw = QuantizedWeights(model)
    stored = {name: quantize(w) for name, w in qw.master_weights().items()}  # quantize once
    n_weights = sum(s.q.numel() for s in stored.values())
    generator = torch.Generator().manual_seed(seed)  # fault seed
    flipped: list[int] = []

    def inject() -> None:  # one trial: fresh flips, faulty int8 copy of every mapped weight
        flipped.append(sum(bit_flip(s.q, ber, generator)[1] for s in stored.values()))

    buffers = {name: torch.empty_like(s.q) for name, s in stored.items()}

    def inject_out() -> None:  # the same into the previous trial's buffers
        for name, s in stored.items():
            bit_flip(s.q, ber, generator, out=buffers[name])

    def inject_in_place() -> None:  # flip the stored int8 in place, then flip back
        for s in stored.values():
            flips = draw_bit_flips(s.q.shape, ber, generator)
            flips.apply_(s.q)
            flips.apply_(s.q)

    with torch.no_grad():
        forward_ms = median_ms(lambda: model(x), repeats)
        inject_ms = median_ms(inject, repeats)
        inject_out_ms = median_ms(inject_out, repeats)
        in_place_ms = median_ms(inject_in_place, repeats)
        draw_ms = median_ms(lambda: draw_model_bit_flips(qw.shapes(), ber, generator), repeats)
        with qw:  # the whole quantized forward of one trial, faults included
            qw.set_faults(draw_model_bit_flips(qw.shapes(), ber, generator))
            quantized_forward_ms = median_ms(lambda: model(x), repeats)
    return {
        "model": "build_model('vgg11', (3, 32, 32), 10)",
        "torch_threads": torch.get_num_threads(),
        "n_mapped_weights": n_weights,
        "n_bits": 8 * n_weights,
        "ber": ber,
        "mean_bits_flipped": round(statistics.mean(flipped), 1),
        "batch": batch,
        "repeats": repeats,
        "forward_ms_median": round(forward_ms, 2),
        "inject_ms_median": round(inject_ms, 2),
        "inject_over_forward": round(inject_ms / forward_ms, 4),
        "inject_into_out_ms_median": round(inject_out_ms, 2),
        "flip_in_place_and_back_ms_median": round(in_place_ms, 2),
        "draw_only_ms_median": round(draw_ms, 2),
        "quantized_faulty_forward_ms_median": round(quantized_forward_ms, 2),
        "goal_ratio": GOAL_RATIO,
        "goal_met": inject_ms <= GOAL_RATIO * forward_ms,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ber", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0, help="fault seed")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(run(args.ber, args.batch, args.repeats, args.seed)), flush=True)


if __name__ == "__main__":
    main()
