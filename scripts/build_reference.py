"""Build builtin:tiny-ref, the reference model of DIMP-weighted distillation (specs/dimp.kd).

The reference has the shape and tokenizer of builtin:tiny-student (GPT-2, 2
layers, width 128, byte-level BPE with 4096 tokens). It is trained with CE on
the response tokens of a small seeded subset of the builtin Shakespeare
training split (500 pairs by default), the way `objective = CE` trains a
student. The held-out response CE is measured every `--eval-every` steps on
the first validation pairs, and the weights with the lowest value are kept,
because many passes over 500 pairs overfit.

The result is written to kdsl/builtins/models/tiny-ref (config.json,
model.safetensors, tokenizer files and build.json with the settings and the
CE curve), through a temporary folder that replaces the old one when complete.
It needs builtin:tiny-student, so run it after `scripts/build_builtins.py`.

    python scripts/build_reference.py --threads 1     # the shipped model: 4 minutes on a busy 2-core CPU
    python scripts/build_reference.py --steps 20 --out /tmp/ref   # a quick trial
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kdsl import builtins, data, models  # noqa: E402
from kdsl.checkpoint import replace_directory  # noqa: E402
from kdsl.samplers import PairEncoder, collate  # noqa: E402

log = logging.getLogger("build_reference")

TARGET = builtins.ROOT / "models" / "tiny-ref"
SHAPE_OF = "builtin:tiny-student"
DATASET = "builtin:shakespeare"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=500, help="clean training pairs the reference sees (default 500)")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps (default 120)")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per step (default 16)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default 1e-3)")
    parser.add_argument("--warmup", type=int, default=20, help="linear warmup steps before the cosine decay (default 20)")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay of weight matrices (default 0.1)")
    parser.add_argument("--eval-every", type=int, default=40, help="steps between held-out CE measurements (default 40)")
    parser.add_argument("--eval-pairs", type=int, default=100, help="validation pairs of each measurement (default 100)")
    parser.add_argument("--max-prompt-tokens", type=int, default=64, help="prompts keep their last N tokens (default 64)")
    parser.add_argument("--max-response-tokens", type=int, default=64, help="responses keep their first N tokens (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pair subset, initialisation and batch order")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=TARGET, help=f"output folder (default {TARGET.relative_to(REPO)})")
    args = parser.parse_args(argv)
    for name in ("pairs", "steps", "batch_size", "eval_every", "eval_pairs", "max_prompt_tokens", "max_response_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0.0 < args.lr < 1.0:
        parser.error(f"--lr must lie in (0, 1), got {args.lr}")
    return args


def clean_subset(count: int, seed: int) -> list[tuple[str, str]]:
    """Return `count` training pairs chosen with a seeded shuffle."""
    pairs = data.load_pairs(DATASET, "train")
    if count > len(pairs):
        raise SystemExit(f"--pairs {count} exceeds the {len(pairs)} training pairs of {DATASET}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    chosen = pairs.select(order[:count])
    return list(zip(chosen["prompt"], chosen["response"]))


def fresh_model(seed: int):
    """Return an untrained model with builtin:tiny-student's config, initialised from `seed`, and its tokenizer."""
    from transformers import AutoModelForCausalLM

    shape = models.load_model(SHAPE_OF)
    tokenizer = models.load_tokenizer(SHAPE_OF)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(shape.config))
    return model, tokenizer


def response_ce(model, encoder: PairEncoder, pairs: list[tuple[str, str]], batch_size: int = 32) -> float:
    """Return the mean CE in nats per response token (EOS included) of `model` on `pairs`."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            batch = collate([encoder.encode(p, r) for p, r in pairs[start : start + batch_size]], encoder.pad_id)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
            labels = batch.labels[:, 1:]
            total += F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    model.train()
    return total / max(count, 1)


def learning_rate(args: argparse.Namespace, step: int) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_optimizer(model, args: argparse.Namespace) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))


def train(args: argparse.Namespace) -> tuple[dict, list[dict], object]:
    """Train the reference; return the model at its best step (with that step, its CE and the time), the CE curve and the tokenizer."""
    model, tokenizer = fresh_model(args.seed)
    encoder = PairEncoder(tokenizer, args.max_prompt_tokens, args.max_response_tokens)
    train_pairs = clean_subset(args.pairs, args.seed)
    validation = data.load_pairs(DATASET, "validation")
    heldout = list(zip(validation["prompt"], validation["response"]))[: args.eval_pairs]
    optimizer = build_optimizer(model, args)
    rng = random.Random(args.seed + 1)
    order: list[int] = []

    curve = [{"step": 0, "validation_ce": response_ce(model, encoder, heldout)}]
    best = (curve[0]["validation_ce"], 0, copy.deepcopy(model.state_dict()))
    log.info("step 0: validation response CE %.4f", curve[0]["validation_ce"])
    model.train()
    started = time.perf_counter()
    for step in range(args.steps):
        if len(order) < args.batch_size:
            order += rng.sample(range(len(train_pairs)), len(train_pairs))  # one more seeded epoch
        indices, order = order[: args.batch_size], order[args.batch_size :]
        batch = collate([encoder.encode(*train_pairs[i]) for i in indices], encoder.pad_id)

        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args, step)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        loss = F.cross_entropy(logits.transpose(1, 2), batch.labels[:, 1:], ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        if done % args.eval_every == 0 or done == args.steps:
            value = response_ce(model, encoder, heldout)
            curve.append({"step": done, "train_loss": loss.item(), "validation_ce": value})
            log.info("step %d: train CE %.4f, validation response CE %.4f (%.0f s)",
                     done, loss.item(), value, time.perf_counter() - started)
            if value < best[0]:
                best = (value, done, copy.deepcopy(model.state_dict()))

    log.info("keeping step %d: validation response CE %.4f", best[1], best[0])
    model.load_state_dict(best[2])
    return {"model": model, "best_step": best[1], "best_ce": best[0], "seconds": time.perf_counter() - started}, curve, tokenizer


def save(result: dict, curve: list[dict], tokenizer, args: argparse.Namespace) -> None:
    """Write the model, tokenizer and build.json to a temporary folder, then move it to `args.out`."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    model = result["model"]
    model.save_pretrained(temporary, safe_serialization=True)
    tokenizer.save_pretrained(temporary)
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items() if key != "out"}
    record = {
        "shape_of": SHAPE_OF,
        "data": f"{DATASET} train, {args.pairs} pairs (seeded shuffle)",
        "settings": settings,
        "best_step": result["best_step"],
        "validation_response_ce": result["best_ce"],
        "train_seconds": round(result["seconds"], 1),
        "curve": curve,
    }
    (temporary / "build.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    for item in temporary.iterdir():
        item.chmod(0o644)
    temporary.chmod(0o755)
    replace_directory(temporary, out)
    log.info("wrote %s", out)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result, curve, tokenizer = train(args)
    save(result, curve, tokenizer, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
