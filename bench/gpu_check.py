"""WeSaR on one GPU: step time against the same model ungated, in bf16 and in the torch-native
FP8 of `--fp8-format` (`--transformer-impl local`), FP8 against bf16, and the CUDA kernels of
csrc/ against the CPU path.

For a GPU machine without internet (H100 / H200, PyTorch 2.11, Python 3.12, no Transformer
Engine, no megatron-core): bring the wheels along (`make wheels` on a machine with internet
fills bench/wheels/, git-ignored) and run, from the checkout:

    python bench/gpu_check.py --wheels bench/wheels
    python bench/gpu_check.py --wheels bench/wheels --quick

1. Without CUDA it stops at once: one error line, exit status 1.
2. It installs what is missing, offline: megatron-core 0.16.1 and torchao from --wheels
   (pip --no-index --find-links; numpy and packaging, their dependencies, from there too where
   missing), then this checkout (pip install --no-build-isolation --no-deps -e ., which
   compiles csrc/ with its CUDA kernels where the CUDA toolkit is found). Each later
   step runs in a fresh interpreter, so it imports what was just installed.
3. Kernels: `megatron_wesar._C` must be built with CUDA; the fused gate-gradient all-reduce
   (pack kernel, one all-reduce on a one-rank NCCL group, unpack kernel) of CUDA gradients
   (fp32, bf16, fp16 and fp64, shapes (1,) and (3,), and a case with an inf) must equal,
   bitwise, the pure-PyTorch path on CPU copies (gloo), with the same non-finite flag.
4. Memory: the driver's engine (megatron-core GPTModel, DDP, distributed optimizer, Adam) of
   MODEL (28 layers, d 1024, d_ff 4096, 16 heads, sequence 2048: about 354M parameters, counted
   by the dry run's planner), WeSaR in bf16, alone on the GPU: its peak memory over a few steps
   against the dry run's plan (megatron_wesar.training.dry_run; 16.47 GB planned).
5. Step time: four engines of MODEL on the GPU, ungated and WeSaR, each in bf16 and in bf16 +
   FP8 hybrid; after warm-up steps, full training steps of the four are interleaved (order
   alternating); the figures are median ratios.
6. torchao reference: the speedup of torchao's float8 training (tensorwise scaling) over bf16
   on a plain MLP of the same shape, forward and backward, eager (no torch.compile, as the
   driver runs): what FP8 GEMMs give on this GPU without fused casts.

Prints the table and ends with `name: value` lines of ratios measured in this run:
`cuda_kernels_match_cpu:` (1 or 0), `dry_run_memory_ratio:` (peak / planned),
`torchao_fp8_mlp_speedup:`, `fp8_vs_bf16_speedup_ungated:`, `wesar_fp8_step_time_ratio:`,
`fp8_vs_bf16_speedup:` (WeSaR) and last `wesar_bf16_step_time_ratio:`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
WHEEL_PACKAGES = ("megatron-core==0.16.1", "torchao")
MODEL = ["--num-layers", "28", "--hidden-size", "1024", "--ffn-hidden-size", "4096",
         "--num-attention-heads", "16", "--seq-length", "2048", "--micro-batch-size", "2",
         "--global-batch-size", "8", "--bf16", "--use-distributed-optimizer", "--lr", "1e-4"]
VARIANTS = {"ungated bf16": ["--no-wesar"], "WeSaR bf16": [],
            "ungated fp8": ["--no-wesar", "--fp8-format", "hybrid"],
            "WeSaR fp8": ["--fp8-format", "hybrid"]}
WARMUP_STEPS = 3
GATE_CASES = [  # (dtype, shapes) of the gradients one fused all-reduce sums
    (torch.float32, [(1,), (1,), (3,)]), (torch.bfloat16, [(1,), (3,)]),
    (torch.float16, [(1,), (1,)]), (torch.float64, [(1,), (3,)]),
]


class GpuCheckError(RuntimeError):
    """Why the check cannot run here (one line)."""


def require_cuda() -> None:
    """GpuCheckError unless a CUDA GPU is visible to this torch."""
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise GpuCheckError(f"CUDA is not available (torch {torch.__version__}, {build}): run "
                            "this on a GPU machine")


def pip_install_commands(wheels: pathlib.Path | None) -> list[list[str]]:
    """The offline installs of what is missing: megatron-core and torchao from `wheels`, then
    this checkout with its extension (GpuCheckError when a wheel is needed and no folder
    holds it)."""
    pip = [sys.executable, "-m", "pip", "install", "--no-index"]
    missing = [package for package, module in zip(WHEEL_PACKAGES, ("megatron.core", "torchao"))
               if importlib.util.find_spec(module.split(".")[0]) is None
               or importlib.util.find_spec(module) is None]
    commands = []
    if missing:
        if wheels is None or not wheels.is_dir():
            raise GpuCheckError(f"{', '.join(missing)} not installed and no --wheels folder "
                                "holds them (make wheels, on a machine with internet)")
        # their dependencies (numpy, packaging) come from there too where missing
        commands.append(pip + ["--find-links", str(wheels), *missing])
    commands.append(pip + ["--no-deps", "--no-build-isolation", "-e", str(ROOT)])
    return commands


def install(wheels: pathlib.Path | None) -> None:
    """Run pip_install_commands. Where building this checkout fails (its C++/CUDA extension:
    say an nvcc that torch refuses), say so on one warning line and let the stages import it
    from the source tree, where megatron_wesar runs without the extension (its Python path):
    the kernel check then reports no CUDA kernels and the other stages still run."""
    *wheel_installs, checkout = pip_install_commands(wheels)
    for command in wheel_installs:
        subprocess.run(command, check=True, cwd=ROOT)
    try:
        subprocess.run(checkout, check=True, cwd=ROOT)
    except subprocess.CalledProcessError as err:
        print(f"gpu_check: warning: building this checkout failed ({err}); running it from the "
              "source tree without its C++ extension", file=sys.stderr)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


def _in_fresh_interpreter(stage: str, *args) -> dict:
    """Run `stage` of this script in a new interpreter (it imports what was just installed);
    its JSON result."""
    result = subprocess.run([sys.executable, __file__, "--stage", stage, *args],
                            capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        raise GpuCheckError(f"{stage} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def check_kernels() -> dict:
    """The extension's CUDA pack / all-reduce / unpack against the pure-PyTorch path on CPU."""
    import torch.distributed as dist

    from megatron_wesar import gate_reduce
    from megatron_wesar.training.pretrain import init_distributed

    if gate_reduce._C is None or not gate_reduce._C.with_cuda:
        return {"with_cuda": False, "match": False, "cases": 0}
    init_distributed()  # a world of one, NCCL
    cpu_group = dist.new_group(backend="gloo")
    generator = torch.Generator().manual_seed(0)
    cases = [[torch.randn(shape, generator=generator, dtype=dtype) * 1e3 for shape in shapes]
             for dtype, shapes in GATE_CASES]
    cases.append([torch.tensor([1.0, float("inf")]), torch.tensor([2.0])])
    match = True
    for grads in cases:
        on_gpu = [g.cuda() for g in grads]
        flag_gpu = gate_reduce.allreduce_gate_grads(on_gpu)
        flag_cpu = gate_reduce._allreduce_gate_grads_torch(grads, cpu_group)
        match &= flag_gpu == flag_cpu and all(
            torch.equal(a.cpu(), b) for a, b in zip(on_gpu, grads))
    dist.destroy_process_group()
    return {"with_cuda": True, "match": bool(match), "cases": len(cases)}


def _engines(variants) -> tuple:
    """(engines of `variants` on a one-rank NCCL world, data, a config) (the driver's own)."""
    from megatron_wesar.data.sources import EmbeddedCorpus
    from megatron_wesar.training.arguments import parse_pretrain_args
    from megatron_wesar.training.engine import initialize_parallel
    from megatron_wesar.training.pretrain import build_run_engine, init_distributed

    configs = {v: parse_pretrain_args(MODEL + VARIANTS[v]) for v in variants}
    config = configs[variants[0]]
    init_distributed()
    initialize_parallel(1, 1, config.training.seed)
    data = EmbeddedCorpus(config.model.seq_length, config.training.seed)
    return ({v: build_run_engine(c, data.vocab_size) for v, c in configs.items()}, data,
            config)


def _step(engine, data, config, index: int) -> float:
    """Seconds of one full training step (synchronised)."""
    from megatron_wesar.data.sources import microbatches
    from megatron_wesar.training.engine import train_step

    seq, micro = config.model.seq_length, config.training.micro_batch_size
    global_batch = config.training.global_batch_size
    batch = data.train_batch(index, global_batch)
    torch.cuda.synchronize()
    start = time.perf_counter()
    train_step(engine, microbatches(batch, 0, 1, micro), global_batch // micro, micro, seq)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def measure_memory(reps: int) -> dict:
    """Peak GPU memory of WeSaR bf16 alone over warm-up steps, its dry-run plan and size."""
    from megatron_wesar.training.dry_run import plan

    engines, data, config = _engines(["WeSaR bf16"])
    for index in range(WARMUP_STEPS):
        _step(engines["WeSaR bf16"], data, config, index)
    planned = plan(config, 1)
    return {"peak_bytes": torch.cuda.max_memory_allocated(),
            "planned_bytes": planned.memory_per_gpu_bytes,
            "parameters": planned.model_parameters}


def time_steps(reps: int) -> dict:
    """Median step time per variant, the four interleaved."""
    engines, data, config = _engines(list(VARIANTS))
    times = {v: [] for v in VARIANTS}
    for rnd in range(WARMUP_STEPS + reps):
        for variant in VARIANTS if rnd % 2 == 0 else reversed(list(VARIANTS)):
            elapsed = _step(engines[variant], data, config, rnd)
            if rnd >= WARMUP_STEPS:
                times[variant].append(elapsed)
    return {"median_s": {v: statistics.median(t) for v, t in times.items()},
            "tokens_per_step": config.training.global_batch_size * config.model.seq_length}


def torchao_mlp_speedup(reps: int) -> dict:
    """bf16 / torchao-float8 median time of forward + backward of the model's MLP shape."""
    from torchao.float8 import convert_to_float8_training

    tokens, hidden = 4 * 2048, 1024

    def mlp():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(hidden, 4 * hidden, bias=False), torch.nn.GELU(),
            torch.nn.Linear(4 * hidden, hidden, bias=False)).cuda().to(torch.bfloat16)

    models = {"bf16": mlp(), "fp8": convert_to_float8_training(mlp())}
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    times = {name: [] for name in models}
    for rnd in range(WARMUP_STEPS + reps):
        for name, model in models.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(x).float().square().mean().backward()
            torch.cuda.synchronize()
            if rnd >= WARMUP_STEPS:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {"speedup": medians["bf16"] / medians["fp8"]}


STAGES = {"kernels": lambda reps: check_kernels(), "memory": measure_memory,
          "steps": time_steps, "torchao": torchao_mlp_speedup}


def report(kernels: dict, memory: dict, steps: dict, torchao: dict) -> list[str]:
    """The table and the closing `name: value` lines."""
    median = steps["median_s"]
    tokens = steps["tokens_per_step"]
    base = median["ungated bf16"]
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}; model "
             f"{memory['parameters']:,} parameters, {tokens} tokens per step",
             f"{'variant':<14} {'median s':>9} {'tokens/s':>10} {'vs ungated bf16':>16}"]
    lines += [f"{v:<14} {t:>9.4f} {tokens / t:>10.0f} {t / base:>16.3f}"
              for v, t in median.items()]
    lines += [
        f"CUDA kernels built: {kernels['with_cuda']}, {kernels['cases']} cases equal to the "
        "CPU path" if kernels["match"] else "CUDA kernels: NOT matching the CPU path or not built",
        f"peak memory {memory['peak_bytes'] / 2**30:.2f} GB, dry-run plan "
        f"{memory['planned_bytes'] / 2**30:.2f} GB (WeSaR bf16 alone)",
        f"cuda_kernels_match_cpu: {int(kernels['match'])}",
        f"dry_run_memory_ratio: {memory['peak_bytes'] / memory['planned_bytes']:.4f}",
        f"torchao_fp8_mlp_speedup: {torchao['speedup']:.4f}",
        f"fp8_vs_bf16_speedup_ungated: {base / median['ungated fp8']:.4f}",
        f"wesar_fp8_step_time_ratio: {median['WeSaR fp8'] / median['ungated fp8']:.4f}",
        f"fp8_vs_bf16_speedup: {median['WeSaR bf16'] / median['WeSaR fp8']:.4f}",
        f"wesar_bf16_step_time_ratio: {median['WeSaR bf16'] / base:.4f}",
    ]
    return lines


def main(argv=None) -> int:
    """Install, run the stages, print the table and the figures; exit 1 with one error line
    where the check cannot run."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", type=pathlib.Path, default=None,
                        help="folder of the megatron-core 0.16.1 and torchao wheels")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--reps", type=int, default=None, help="timed steps per variant")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    reps = opts.reps or (5 if opts.quick else 20)
    try:
        require_cuda()
        if opts.stage:  # a fresh interpreter's part of the run
            print(json.dumps(STAGES[opts.stage](reps)))
            return 0
        install(opts.wheels)
        results = {stage: _in_fresh_interpreter(stage, "--reps", str(reps)) for stage in STAGES}
    except (GpuCheckError, subprocess.CalledProcessError) as err:
        print(f"gpu_check: error: {err}", file=sys.stderr)
        return 1
    for line in report(**results):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
