"""Benchmark the compiled kdsl loss against dense PyTorch and TRL: forward+backward time and peak memory.

Every (input mode, size, loss, implementation) case runs in a fresh
subprocess on the same seeded inputs:

1. build the inputs (float32, 10% of positions labelled -100 as a prompt);
2. memory, in one worker: reset the process's peak resident set size
   (`5 > /proc/self/clear_refs`, Linux), run one forward+backward pass and
   read the peak (`VmHWM` in /proc/self/status). The memory column is that
   peak minus the resident size just before the pass, so it counts all the
   loss allocates: activations, temporaries and the gradients it returns.
   This worker runs with `MALLOC_MMAP_THRESHOLD_=65536`, so glibc returns
   freed tensors to the system and the peak counts live memory only;
3. time, in a second worker with the default allocator: one warm-up pass,
   then the median of `--repeats` forward+backward passes;
4. with `--check`, the time worker of each `kdsl` and `kdsl-separate` case
   then runs the dense loss on the same inputs and reports the largest
   difference of the value and of the gradients, relative to the dense
   ones.

Implementations:

- `kdsl`: `kdsl.lower` fused, chunked evaluation (`train.chunk_size` 1024);
- `kdsl-separate`: each term of a multi-term loss compiled on its own, summed;
- `dense`: a plain PyTorch loss over the full (B, T, V) tensors, written here;
- `trl-gkd`: TRL's `GKDTrainer.generalized_jsd_loss` (KL is beta=0, JS[0.5] beta=0.5),
  fed materialised logits in the hidden-state mode;
- `trl-chunked`: TRL's `_chunked_divergence_loss` (DistillationTrainer), hidden states only.

Usage: `python benchmarks/loss_bench.py --quick` for small sizes, or
without `--quick` for the sizes of docs/benchmarks.md (tens of GiB and
long runs: use an otherwise idle machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

FULL_SIZES = [(2048, 32000), (4096, 50257), (1024, 151936)]
FULL_HIDDEN = 1024
QUICK_SIZES = [(1024, 8192), (512, 32768)]
QUICK_HIDDEN = 64
LOSSES = ("kl", "js", "skl", "three")
MODES = ("logits", "hidden")
IMPLEMENTATIONS = ("kdsl", "kdsl-separate", "dense", "trl-gkd", "trl-chunked")
SEQUENCE_LENGTH = 256
PROMPT_FRACTION = 0.1
EPOCH = 0.5  # where the schedule of the three-term loss is evaluated


def applicable(loss: str, mode: str, implementation: str) -> bool:
    """Whether an implementation computes this loss in this input mode."""
    if implementation == "kdsl-separate":
        return loss == "three"
    if implementation == "trl-gkd":
        return loss in ("kl", "js")
    if implementation == "trl-chunked":
        return loss in ("kl", "js") and mode == "hidden"
    return True


# --- Objectives (built by hand, so the benchmark needs no spec parser) -----------------------


def objectives(loss: str):
    """Return the kdsl objectives of a loss: one for `kdsl`, one per term for `kdsl-separate`."""
    import sympy

    from kdsl.objective import (
        EPOCH as EPOCH_SYMBOL, LOG_O_TOKEN, POSITION, DataSource, Divergence, ModelDist, Objective, Scalar, Term,
    )

    o, q = ModelDist("o"), ModelDist("q")
    lam = Scalar(sympy.exp(-POSITION / 256) * (1 - sympy.exp(LOG_O_TOKEN)))
    phi = Scalar(sympy.Rational(1, 2) * (1 + sympy.cos(sympy.pi * EPOCH_SYMBOL / 3)))
    terms = {
        "kl": [Term("KL(o‖q)", Divergence("KL", (o, q)))],
        "js": [Term("JS[0.5](o‖q)", Divergence("JS", (o, q), param=Scalar(sympy.Rational(1, 2))))],
        "skl": [Term("SKL[0.1](o‖q)", Divergence("SKL", (o, q), param=Scalar(sympy.Rational(1, 10))))],
        "three": [
            Term("λ·KL(o‖q)", Divergence("KL", (o, q)), token_weight=lam),
            Term("φ(epoch)·CE", Divergence("CE"), coefficient=phi),
            Term("SKL[0.1](o‖q)", Divergence("SKL", (o, q), param=Scalar(sympy.Rational(1, 10)))),
        ],
    }[loss]

    def make(selected):
        return Objective(terms=selected, groups=[DataSource()], settings={}, source_text=" + ".join(t.name for t in selected))

    return make(terms), [make([term]) for term in terms]


# --- Dense PyTorch reference ------------------------------------------------------------------


def dense_loss(loss: str, student_logits, teacher_logits, labels):
    """Compute the loss the plain PyTorch way: log-softmax over full (B, T, V) tensors, then a masked mean."""
    import torch

    valid = labels != -100
    count = valid.sum().clamp_min(1)
    lq = torch.log_softmax(student_logits.float(), dim=-1)
    lo = torch.log_softmax(teacher_logits.float(), dim=-1)

    def kl(la, lb):
        return (torch.exp(la) * (la - lb)).sum(-1)

    def mix(alpha, la, lb):
        return torch.logaddexp(la + math.log(alpha), lb + math.log(1 - alpha))

    def mean(per_position):
        return torch.where(valid, per_position, 0.0).sum() / count

    if loss == "kl":
        return mean(kl(lo, lq))
    if loss == "js":
        m = mix(0.5, lo, lq)
        return mean(0.5 * kl(lo, m) + 0.5 * kl(lq, m))
    if loss == "skl":
        return mean(kl(lo, mix(0.1, lo, lq)))
    safe = torch.where(valid, labels, 0).unsqueeze(-1)
    position = valid.cumsum(1)
    with torch.no_grad():
        weight = torch.exp(-position / 256) * (1 - torch.exp(lo.gather(-1, safe).squeeze(-1)))
    phi = 0.5 * (1 + math.cos(math.pi * EPOCH / 3))
    ce = -lq.gather(-1, safe).squeeze(-1)
    return mean(weight * kl(lo, lq)) + phi * mean(ce) + mean(kl(lo, mix(0.1, lo, lq)))


# --- One case in a worker process -------------------------------------------------------------


def make_inputs(mode: str, tokens: int, vocab: int, hidden: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    batch = max(1, tokens // SEQUENCE_LENGTH)
    length = tokens // batch
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[:, : int(PROMPT_FRACTION * length)] = -100

    def randn(*shape, scale=1.0):
        tensor = torch.empty(*shape)
        tensor.normal_(0.0, scale, generator=generator)
        return tensor

    if mode == "logits":
        student = randn(batch, length, vocab, scale=2.0).requires_grad_()
        teacher = randn(batch, length, vocab, scale=2.0)
        return {"student_logits": student, "teacher_logits": teacher, "labels": labels}
    scale = 2.0 / math.sqrt(hidden)
    return {
        "student_hidden": randn(batch, length, hidden).requires_grad_(),
        "student_head": randn(vocab, hidden, scale=scale).requires_grad_(),
        "teacher_hidden": randn(batch, length, hidden),
        "teacher_head": randn(vocab, hidden, scale=scale),
        "labels": labels,
    }


def make_step(implementation: str, loss: str, mode: str, chunk_size: int, max_chunk_elements: int | None = None):
    """Return a function of the inputs that computes the loss and its gradients (one fwd+bwd)."""
    import torch

    def gradients(value, inputs):
        wrt = [tensor for tensor in inputs.values() if tensor.requires_grad]
        return value, torch.autograd.grad(value, wrt)

    def logits_of(inputs, side):
        if f"{side}_logits" in inputs:
            return inputs[f"{side}_logits"]
        return inputs[f"{side}_hidden"] @ inputs[f"{side}_head"].T

    if implementation in ("kdsl", "kdsl-separate"):
        from kdsl import ir
        from kdsl.lower import lower

        whole, parts = objectives(loss)
        selected = [whole] if implementation == "kdsl" else parts
        modules = [
            lower(ir.build(objective), objective, chunk_size=chunk_size, max_chunk_elements=max_chunk_elements)
            for objective in selected
        ]

        def step(inputs):
            value = sum(module(**inputs, epoch=EPOCH).loss for module in modules)
            return gradients(value, inputs)

        return step

    if implementation == "dense":
        def step(inputs):
            value = dense_loss(loss, logits_of(inputs, "student"), logits_of(inputs, "teacher"), inputs["labels"])
            return gradients(value, inputs)

        return step

    beta = {"kl": 0.0, "js": 0.5}[loss]
    if implementation == "trl-gkd":
        from trl.experimental.gkd.gkd_trainer import GKDTrainer

        def step(inputs):
            value = GKDTrainer.generalized_jsd_loss(
                logits_of(inputs, "student"), logits_of(inputs, "teacher"), labels=inputs["labels"], beta=beta
            )
            return gradients(value, inputs)

        return step

    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    def step(inputs):
        value, _, _ = _chunked_divergence_loss(
            inputs["student_hidden"], inputs["teacher_hidden"], inputs["student_head"], inputs["teacher_head"],
            inputs["labels"] != -100, beta,
        )
        return gradients(value, inputs)

    return step


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def run_worker(spec: dict, measure: str) -> dict:
    """Run one case and return either its memory (`measure="memory"`) or its time (`measure="time"`)."""
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    inputs = make_inputs(spec["mode"], spec["tokens"], spec["vocab"], spec["hidden"])
    step = make_step(spec["implementation"], spec["loss"], spec["mode"], spec["chunk_size"], spec.get("chunk_elements"))

    if measure == "memory":
        # Peak resident size of the first pass above the resident size just before it.
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        before = _status_kib("VmRSS")
        value, grads = step(inputs)
        peak = _status_kib("VmHWM")
        return {
            "value": float(value.detach()),
            "peak_mib": (peak - before) / 1024,
            "input_mib": sum(t.numel() * t.element_size() for t in inputs.values()) / 2**20,
            "grad_mib": sum(g.numel() * g.element_size() for g in grads) / 2**20,
        }

    step(inputs)  # warm-up
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        value, grads = step(inputs)
        times.append(time.perf_counter() - start)
        if not (spec.get("check") and spec["implementation"].startswith("kdsl")):
            del value, grads
    result = {"median_s": statistics.median(times), "threads_used": torch.get_num_threads()}
    if spec.get("check") and spec["implementation"].startswith("kdsl"):
        result.update(compare_with_dense(spec, inputs, value, grads))
    return result


def compare_with_dense(spec: dict, inputs: dict, value, grads) -> dict:
    """Return the largest differences of a loss value and its gradients from the dense loss, relative to dense."""
    import torch

    dense_value, dense_grads = make_step("dense", spec["loss"], spec["mode"], spec["chunk_size"])(inputs)
    value_error = abs(float(value.detach()) - float(dense_value.detach())) / abs(float(dense_value.detach()))
    grad_error = 0.0
    for grad, dense_grad in zip(grads, dense_grads):
        scale = float(dense_grad.abs().max())
        grad_error = max(grad_error, float((grad - dense_grad).abs().max()) / scale if scale > 0 else 0.0)
    return {"value_error": value_error, "grad_error": grad_error}


# --- The driver ---------------------------------------------------------------------------------


def run_case(spec: dict) -> dict:
    """Measure memory and time of one case, each in a fresh worker process."""
    root = str(Path(__file__).resolve().parents[1])
    base = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # For the memory run, a fixed mmap threshold makes glibc return every freed block of 64 KiB or more
    # to the system, so the peak counts live tensors, not blocks kept for reuse. It slows allocation
    # down, so the timed run keeps the default allocator.
    environments = {"memory": {**base, "MALLOC_MMAP_THRESHOLD_": "65536"}, "time": base}
    result = dict(spec)
    for measure, env in environments.items():
        process = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec), "--measure", measure],
            capture_output=True, text=True, env=env,
        )
        if process.returncode != 0:
            lines = process.stderr.strip().splitlines()
            return {**spec, "error": lines[-1] if lines else f"exit {process.returncode}"}
        result.update(json.loads(process.stdout.strip().splitlines()[-1]))
    return result


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """Parse `N:V,N:V` (tokens and vocabulary size of each case) into a list of pairs."""
    sizes = []
    for item in text.split(","):
        try:
            tokens, vocab = (int(part) for part in item.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid size {item!r}; expected N:V, for example 2048:32000") from None
        sizes.append((tokens, vocab))
    return sizes


def cases(args) -> list[dict]:
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    hidden = QUICK_HIDDEN if args.quick else FULL_HIDDEN
    selected = []
    for mode in args.modes:
        for tokens, vocab in sizes:
            for loss in args.losses:
                for implementation in args.implementations:
                    if applicable(loss, mode, implementation):
                        selected.append({
                            "mode": mode, "tokens": tokens, "vocab": vocab, "hidden": hidden, "loss": loss,
                            "implementation": implementation, "repeats": args.repeats, "threads": args.threads,
                            "chunk_size": args.chunk_size, "chunk_elements": args.chunk_elements, "check": args.check,
                        })
    return selected


def markdown(results: list[dict]) -> str:
    """Format results as a table with time and memory relative to `dense` on the same case."""
    dense = {(r["mode"], r["tokens"], r["vocab"], r["loss"]): r for r in results if r["implementation"] == "dense" and "error" not in r}
    checked = any("grad_error" in r for r in results)
    columns = ["input", "N", "V", "loss", "implementation", "fwd+bwd ms", "× dense", "peak MiB", "× dense",
               "beyond grads MiB", "× dense", "value"]
    if checked:
        columns += ["value Δ vs dense", "grad Δ vs dense"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in results:
        head = f"| {r['mode']} | {r['tokens']} | {r['vocab']} | {r['loss']} | {r['implementation']} "
        if "error" in r:
            lines.append(head + f"| failed: {r['error']} " + "| " * (len(columns) - 6) + "|")
            continue
        base = dense.get((r["mode"], r["tokens"], r["vocab"], r["loss"]))
        beyond = r["peak_mib"] - r["grad_mib"]

        def ratio(value, reference):
            return f"{value / reference:.2f}" if reference and reference > 0 else "n/a"

        line = (
            head + f"| {1000 * r['median_s']:.1f} | {ratio(r['median_s'], base and base['median_s'])} "
            f"| {r['peak_mib']:.0f} | {ratio(r['peak_mib'], base and base['peak_mib'])} "
            f"| {beyond:.0f} | {ratio(beyond, base and base['peak_mib'] - base['grad_mib'])} | {r['value']:.6g} |"
        )
        if checked:
            line += f" {r['value_error']:.1e} | {r['grad_error']:.1e} |" if "grad_error" in r else " | |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (N, V) in " + str(QUICK_SIZES) + f", H={QUICK_HIDDEN}")
    parser.add_argument("--sizes", type=parse_sizes,
                        help="comma-separated N:V pairs to run instead of the default sizes, for example 4096:50257")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward+backward passes per case (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (default 0: torch's default)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="kdsl chunk size in tokens (default 1024)")
    parser.add_argument("--chunk-elements", type=int,
                        help="kdsl max_chunk_elements: logits per chunk, which sets the rows of a chunk to this "
                             "divided by V (default: kdsl's own, 1M logits and at least 32 rows from hidden states)")
    parser.add_argument("--losses", type=lambda s: s.split(","), default=list(LOSSES), help="comma-separated subset of " + ",".join(LOSSES))
    parser.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES), help="comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--implementations", type=lambda s: s.split(","), default=list(IMPLEMENTATIONS),
                        help="comma-separated subset of " + ",".join(IMPLEMENTATIONS))
    parser.add_argument("--check", action="store_true",
                        help="also run the dense loss after each kdsl case and report the relative differences "
                             "of the value and the gradients (max over entries, relative to the largest dense entry)")
    parser.add_argument("--json", type=Path, help="also write the raw results to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=("memory", "time"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker), args.measure)))
        return 0
    for name, chosen, known in (("loss", args.losses, LOSSES), ("mode", args.modes, MODES),
                                ("implementation", args.implementations, IMPLEMENTATIONS)):
        unknown = set(chosen) - set(known)
        if unknown:
            parser.error(f"unknown {name} {', '.join(sorted(unknown))}; expected a subset of {', '.join(known)}")

    results = []
    for spec in cases(args):
        result = run_case(spec)
        results.append(result)
        status = result.get("error") or f"{1000 * result['median_s']:.1f} ms, {result['peak_mib']:.0f} MiB"
        print(f"{spec['mode']} N={spec['tokens']} V={spec['vocab']} {spec['loss']} {spec['implementation']}: {status}",
              file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
