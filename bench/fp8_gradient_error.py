"""How far torch-native FP8 moves one step's gradient, WeSaR against the He baseline.

For each method the 200-step tiny run of bench/fp8_tracking.py trains in fp32 for --steps steps
(its FP8 layers under megatron_wesar.fp8.without_rounding: the exact model). Before each step
the gradient of the same weights on the same batch is computed twice, with the FP8 rounding
(hybrid: e4m3 activations and W_bar, e5m2 output gradients) and without, and compared:

- `loss`: the FP8 loss minus the exact one;
- `all`: ||g8 - g|| / ||g|| over every parameter;
- `weights`: the median over the transformer linears' weights (W_bar under WeSaR) of the
  per-tensor ||g8 - g|| / ||g||, and `flips`: the median fraction of their elements whose
  gradient changes sign (Adam's first steps move an element by about the LR in its gradient's
  sign, so a flip moves it the other way);
- `gates` (WeSaR): ||gate gradients8 - gate gradients|| / ||gate gradients|| over all gates.

    python bench/fp8_gradient_error.py               # wesar and he, 30 steps (~3 min here)
    python bench/fp8_gradient_error.py --steps 10 --seed 2

Ends with, per method, `fp8_grad_rel_error_median_<method>`, `fp8_weight_grad_rel_error_median_
<method>`, `fp8_weight_grad_sign_flips_median_<method>` (medians over the steps),
`fp8_gate_grad_rel_error_median_wesar`, and `fp8_weight_grad_error_wesar_over_he` (the ratio of
the two methods' weight medians).
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
from fp8_tracking import METHODS, RUN

LINEARS = ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare(fp8_grads: dict, grads: dict, gates: list[str]) -> dict:
    """The figures of one step (see the module docstring) from two {name: gradient} dicts and
    the names of the gates among them."""
    names = list(grads)
    everything = torch.cat([grads[n].flatten() for n in names])
    linears = [n for n in names if n.endswith(LINEARS)]
    figures = {
        "all": _relative(torch.cat([fp8_grads[n].flatten() for n in names]), everything),
        "weights": statistics.median(_relative(fp8_grads[n], grads[n]) for n in linears),
        "flips": statistics.median(float(((fp8_grads[n] > 0) != (grads[n] > 0)).double().mean())
                                   for n in linears),
    }
    if gates:
        figures["gates"] = _relative(torch.cat([fp8_grads[n].flatten() for n in gates]),
                                     torch.cat([grads[n].flatten() for n in gates]))
    return figures


def measure(method: str, seed: int, steps: int) -> list[dict]:
    """Train `method` in fp32 for `steps` steps; each step's FP8 gradient error (rank 0, TP 1)."""
    from megatron.core import parallel_state

    from megatron_wesar import fp8
    from megatron_wesar.compat import enable_cpu_compat
    from megatron_wesar.data.sources import microbatches
    from megatron_wesar.layers import gate_parameters
    from megatron_wesar.training.arguments import parse_pretrain_args
    from megatron_wesar.training.engine import initialize_parallel, train_step
    from megatron_wesar.training.pretrain import (
        build_data,
        build_run_engine,
        init_distributed,
        padded_vocab_size,
    )

    config = parse_pretrain_args([*RUN, *METHODS[method], "--seed", str(seed),
                                  "--micro-batch-size", "8", "--fp8-format", "hybrid"])
    training, seq_length = config.training, config.model.seq_length
    enable_cpu_compat()
    init_distributed()
    initialize_parallel(1, 1, training.seed)
    data = build_data(config)
    engine = build_run_engine(config, padded_vocab_size(data.vocab_size, 1))
    params = dict(engine.module.named_parameters())
    gates = [name for name, _ in gate_parameters(engine.module)]
    shape = (1, training.micro_batch_size, seq_length)

    def gradients(batch):
        """(loss, {name: gradient}) of the current weights on `batch`; nothing is applied."""
        captured = {}

        def capture(_engine):
            captured.update({n: p.main_grad.detach().double().clone() for n, p in params.items()})

        result = train_step(engine, microbatches(batch, 0, 1, shape[1]), *shape,
                            after_backward=capture, decide=lambda loss, grad_norm: False)
        return result.loss, captured

    records = []
    for iteration in range(1, steps + 1):
        batch = data.train_batch(iteration - 1, training.global_batch_size)
        fp8_loss, fp8_grads = gradients(batch)
        with fp8.without_rounding():
            loss, grads = gradients(batch)
            train_step(engine, microbatches(batch, 0, 1, shape[1]), *shape)
        records.append({"iteration": iteration, "loss": loss, "loss_diff": fp8_loss - loss,
                        **compare(fp8_grads, grads, gates)})
    parallel_state.destroy_model_parallel()
    return records


def main(argv=None) -> int:
    """Measure every method, print the per-step table and the summary lines."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="wesar,he")
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    results = {method: measure(method, args.seed, args.steps) for method in methods}
    print("| method | step | loss (exact) | loss FP8 - exact | all | weights | flips | gates |")
    print("|---|---|---|---|---|---|---|---|")
    for method, records in results.items():
        for r in records:
            gates = f"{r['gates']:.4f}" if "gates" in r else "-"
            print(f"| {method} | {r['iteration']} | {r['loss']:.4f} | {r['loss_diff']:+.4f} | "
                  f"{r['all']:.4f} | {r['weights']:.4f} | {r['flips']:.4f} | {gates} |")
    medians = {}
    for method, records in results.items():
        for key, name in (("all", "grad_rel_error"), ("weights", "weight_grad_rel_error"),
                          ("flips", "weight_grad_sign_flips"), ("gates", "gate_grad_rel_error")):
            if key in records[0]:
                medians[method, key] = statistics.median(r[key] for r in records)
                print(f"fp8_{name}_median_{method}: {medians[method, key]:.4f}")
    if ("wesar", "weights") in medians and ("he", "weights") in medians:
        ratio = medians["wesar", "weights"] / medians["he", "weights"]
        print(f"fp8_weight_grad_error_wesar_over_he: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
