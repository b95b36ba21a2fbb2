"""The training loop on accelerate.

Each optimizer step evaluates the schedules and learning rate and draws one
batch per sampling group and micro-batch. It counts the scored tokens of the
whole step over all processes, then runs the teacher without gradient, the
student and the compiled loss. Backward with accumulation, clipping, the
optimizer step, logging, evaluation and checkpoints follow. `train()` runs
this loop for the distilled student and, when `train.baseline` is on, for the
same student under CE alone, then writes the report.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from kdsl import checkpoint
from kdsl.errors import ConfigError
from kdsl.objective import (
    LOG_O_SEQ,
    LOG_O_TOKEN,
    LOG_REF_SEQ,
    DataSource,
    Divergence,
    FunctionDef,
    MixtureDist,
    ModelDist,
    Objective,
    ProjectedDist,
    Scalar,
    Term,
)
from kdsl.samplers import (
    AdaptiveSampler,
    Batch,
    DrawPoint,
    PairEncoder,
    Sampler,
    SamplerContext,
    build_samplers,
    collate,
)
from kdsl.settings import SETTINGS
from kdsl.weight_stats import SequenceWeightStats

# accelerate's adapter of logging.getLogger("kdsl.train") that logs on the main process only.
logger = get_logger("kdsl.train")

TRAIN_SETTINGS = (
    "train.seed", "train.epochs", "train.max_steps", "train.batch_size", "train.grad_accum",
    "train.lr", "train.projector_lr", "train.weight_decay", "train.warmup_steps", "train.schedule",
    "train.max_grad_norm", "train.eval_every", "train.save_every", "train.keep_checkpoints",
    "train.baseline", "train.mixed_precision", "data.max_prompt_tokens", "data.max_response_tokens",
    "eval.max_pairs",
)


# --- Configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """The train.* settings the loop reads, checked against the settings registry."""

    seed: int = 0
    epochs: float = 1.0
    max_steps: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    projector_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 0
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    baseline: bool = True
    mixed_precision: str = "no"
    max_prompt_tokens: int = 64
    max_response_tokens: int = 64
    eval_pairs: int = 200

    @classmethod
    def from_settings(cls, settings: dict) -> "TrainConfig":
        values = {}
        for name in TRAIN_SETTINGS:
            value = settings.get(name, SETTINGS[name].default)
            check_setting(name, value)
            field_name = name.split(".", 1)[1]
            values["eval_pairs" if field_name == "max_pairs" else field_name] = value
        if values["max_steps"] == 0 and values["epochs"] == 0:
            raise ConfigError("train.epochs and train.max_steps are both 0: set one of them to train")
        return cls(**values)


def check_setting(name: str, value: Any) -> None:
    """Raise a ConfigError naming the setting, its value and the accepted range if `value` is invalid."""
    setting = SETTINGS[name]
    kind_ok = isinstance(value, setting.kind) or (setting.kind is float and isinstance(value, int))
    if isinstance(value, bool) and setting.kind is not bool:
        kind_ok = False
    if not kind_ok:
        raise ConfigError(f"{name} = {value!r} has type {type(value).__name__}: expected {setting.describe_range()}")
    in_range = (
        (setting.choices is None or value in setting.choices)
        and (setting.minimum is None or value >= setting.minimum)
        and (setting.maximum is None or value <= setting.maximum)
    )
    if not in_range:
        raise ConfigError(f"{name} = {value!r} is out of range: expected {setting.describe_range()}")


# --- What a run returns ----------------------------------------------------------------


@dataclass
class FitResult:
    """One trained student: the model, its per-step metrics and the tokens it saw."""

    name: str
    student: Any
    metrics: list[dict]
    steps: int
    tokens: int
    run_dir: Path


@dataclass
class TrainResult:
    """The run directory, the distilled student, the CE baseline (if trained) and the report."""

    out_dir: Path
    student: Any
    metrics: list[dict]
    steps: int
    baseline: FitResult | None = None
    report: dict | None = None
    distilled: FitResult | None = field(default=None, repr=False)


# --- The loop --------------------------------------------------------------------------


class Trainer:
    """Train one student with one compiled objective; `run()` is the loop."""

    def __init__(self, *, name: str, objective: Objective, compiled: torch.nn.Module, student: Any,
                 teacher: Any, tokenizer: Any, pairs: Any, heldout: Any, config: TrainConfig,
                 accelerator: Any, run_dir: Path, ref: Any = None, progress_bar: bool = True,
                 teacher_tokenizer: Any = None):
        self.name = name
        self.teacher_tokenizer = teacher_tokenizer
        self.projected = hasattr(compiled, "projector")
        self.objective = objective
        self.config = config
        self.accelerator = accelerator
        self.run_dir = Path(run_dir)
        self.tokenizer = tokenizer
        self.heldout = heldout
        self.progress_bar = progress_bar
        self.world_size = accelerator.num_processes
        self.inputs = [group_inputs(compiled, objective, k) for k in range(len(objective.groups))]
        if getattr(compiled, "vocab_size", 0) is None:
            compiled.vocab_size = len(tokenizer)  # score only the rows the tokenizer uses
        missing = {"teacher_logits": teacher, "ref_logits": ref}
        for role, model in missing.items():
            if model is None and any(role in inputs for inputs in self.inputs):
                setting = "teacher" if role == "teacher_logits" else "ref"
                raise ConfigError(f"the objective reads the {setting} model but none is loaded: set {setting} = \"...\"")

        if self.projected and teacher is None:
            raise ConfigError('the objective projects between the teacher and the student (o→q, q→o) but no teacher '
                              'is loaded: set teacher = "..."')
        self.teacher = freeze(teacher).to(accelerator.device) if teacher is not None else None
        self.teacher_positions = position_limit(teacher) if teacher is not None else None
        self.ref = freeze(ref).to(accelerator.device) if ref is not None else None
        self.optimizer = build_optimizer(student, compiled, config)
        self.has_objective_parameters = any(True for _ in compiled.parameters())
        if self.has_objective_parameters:
            student, compiled, self.optimizer = accelerator.prepare(student, compiled, self.optimizer)
        else:
            student, self.optimizer = accelerator.prepare(student, self.optimizer)
            compiled = compiled.to(accelerator.device)
        self.student, self.compiled = student, compiled
        # None unless a term has a sequence weight; a compiled objective with a projector is wrapped for DDP.
        self.weight_stats = SequenceWeightStats.for_module(accelerator.unwrap_model(compiled))

        self.steps_per_epoch, self.total_steps = count_steps(len(pairs), config, self.world_size)
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        self.encoder = PairEncoder(tokenizer, config.max_prompt_tokens, config.max_response_tokens,
                                   bool(objective.settings.get("data.chat_template", False)))
        context = SamplerContext(
            pairs=pairs, encoder=self.encoder, settings=objective.settings, seed=config.seed,
            student=lambda: accelerator.unwrap_model(self.student),
            teacher=lambda: self.teacher,
            rank=accelerator.process_index, world_size=self.world_size, teacher_tokenizer=teacher_tokenizer,
        )
        self.samplers = build_samplers(objective.groups, context)
        self.adaptive = any(contains_adaptive(s) for s in self.samplers)
        if self.adaptive and not config.eval_every:
            logger.warning("%s: train.eval_every is 0, so the adaptive SGO probability never changes; "
                           "set train.eval_every to let validation loss raise it", name)

        self.step = 0
        self.tokens = 0
        self.train_seconds = 0.0
        self.metrics = MetricsLog(self.run_dir, enabled=accelerator.is_main_process)

    # The loop itself.

    def run(self) -> FitResult:
        """Train from the current step to the last one and save the student."""
        bar = tqdm(
            total=self.total_steps, initial=self.step, desc=self.name, dynamic_ncols=True,
            disable=not (self.progress_bar and self.accelerator.is_main_process),
        )
        logger.info("%s: training %d steps (%d per epoch) on %d process(es)",
                    self.name, self.total_steps, self.steps_per_epoch, self.world_size)
        if self.adaptive and self.step == 0:
            self.evaluate(self.point(0))

        # from_pretrained returns models in eval mode; the student trains with its dropout on.
        self.student.train()
        for step in range(self.step, self.total_steps):
            started = time.perf_counter()
            point = self.point(step)
            lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses

            micro_batches = self.draw(point)  # [micro][group]
            num_items = self.count_items(micro_batches)  # one global count per group
            totals, tokens = self.accumulate(micro_batches, num_items, point)
            grad_norm = self.clip()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

            self.step = step + 1
            self.tokens += tokens
            seconds = time.perf_counter() - started
            self.train_seconds += seconds
            record = self.record(point, totals, lr, grad_norm, tokens, seconds, micro_batches)
            self.metrics.append(record)
            bar.update(1)
            bar.set_postfix(progress_postfix(record), refresh=False)

            if self.config.eval_every and self.step % self.config.eval_every == 0 and self.step < self.total_steps:
                self.evaluate(self.point(self.step))
            if self.config.save_every and self.step % self.config.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()

        bar.close()
        self.student.eval()
        self.metrics.flush()
        self.metrics.close()
        student = self.save_student()
        return FitResult(self.name, student, self.metrics.records, self.step, self.tokens, self.run_dir)

    def point(self, step: int) -> DrawPoint:
        return DrawPoint(
            epoch=step / self.steps_per_epoch,
            step=step,
            progress=step / self.total_steps,
            seed=self.config.seed,
        )

    def draw(self, point: DrawPoint) -> list[list[Batch]]:
        """Draw one batch per sampling group for each micro-batch of the step."""
        return [
            [
                sampler.draw(self.config.batch_size, _at(point, micro=micro, group=group))
                for group, sampler in enumerate(self.samplers)
            ]
            for micro in range(self.config.grad_accum)
        ]

    def count_items(self, micro_batches: list[list[Batch]]) -> list[int]:
        """Count each group's scored tokens (or sequences) over the step and all processes."""
        by_sequence = self.objective.reduction == "sequence"
        counts = torch.zeros(len(self.samplers), dtype=torch.long, device=self.accelerator.device)
        for groups in micro_batches:
            for k, batch in enumerate(groups):
                counts[k] += batch.count_scored_sequences() if by_sequence else batch.count_targets()
        if self.world_size > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        return [max(int(c), 1) for c in counts]

    def accumulate(self, micro_batches: list[list[Batch]], num_items: list[int],
                   point: DrawPoint) -> tuple[dict[str, float], int]:
        """Forward and backward every (micro-batch, group) pair; gradients sync on the last one."""
        totals: dict[str, torch.Tensor] = {}
        tokens = 0
        pairs = [(micro, k, batch) for micro, groups in enumerate(micro_batches) for k, batch in enumerate(groups)]
        for index, (micro, k, batch) in enumerate(pairs):
            last = index == len(pairs) - 1
            with self.sync_context(last):
                result = self.forward(batch.to(self.accelerator.device), k, num_items[k], point)
                # DDP averages gradients over processes; each process's loss is already its share
                # of the global mean, so the world size cancels that average.
                self.accelerator.backward(result.loss * self.world_size)
            add_detached(totals, "loss/total", result.loss)
            for term, value in result.terms.items():
                add_detached(totals, f"loss/{term}", value)
            tokens += int(batch.attention_mask.sum())

        names = sorted(totals)
        stacked = torch.stack([totals[n].float() for n in names]) if names else torch.zeros(0)
        token_count = torch.tensor([tokens], device=self.accelerator.device)
        if self.world_size > 1:
            stacked = self.accelerator.reduce(stacked.to(self.accelerator.device), reduction="sum")
            token_count = self.accelerator.reduce(token_count, reduction="sum")
        return dict(zip(names, stacked.tolist())), int(token_count)

    def forward(self, batch: Batch, group: int, num_items: int, point: DrawPoint) -> Any:
        """Teacher forward without gradient, student forward, compiled loss of one group."""
        if self.projected:
            return self.forward_two_streams(batch, group, num_items, point)
        frozen = {}
        for role, model in (("teacher_logits", self.teacher), ("ref_logits", self.ref)):
            if role in self.inputs[group]:
                frozen[role] = frozen_logits(model, batch)
        with self.accelerator.autocast():
            student_logits = self.student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        student_logits = student_logits[:, :-1]  # (B, L-1, Vs)
        labels = batch.labels[:, 1:]  # (B, L-1)
        result = self.compiled(
            student_logits=student_logits, labels=labels, **frozen,
            epoch=point.epoch, step=point.step, progress=point.progress,
            num_items=num_items, group=group,
        )
        if self.weight_stats is not None:
            self.weight_stats.observe(result)
        return result

    def forward_two_streams(self, batch: Batch, group: int, num_items: int, point: DrawPoint) -> Any:
        """Run both models on their own tokens and the projected loss on both streams.

        With different tokenizers the teacher reads the batch re-encoded by its
        own tokenizer (`kdsl.teacher_tokens.teacher_batch`). With one tokenizer
        it reads the student's ids. Position p of either stream predicts token
        p + 1, so ids, hidden states and logits drop their last position and
        labels their first, as in the one-stream forward.
        """
        from kdsl.teacher_tokens import teacher_batch

        if self.teacher_tokenizer is not None:
            stream = teacher_batch(batch.input_ids, batch.attention_mask, batch.labels, self.tokenizer,
                                   self.teacher_tokenizer, max_length=self.teacher_positions)
            teacher_ids, teacher_mask, teacher_labels = stream.input_ids, stream.attention_mask, stream.labels
            student_ends, teacher_ends = stream.student_ends, stream.teacher_ends
        else:
            # One tokenization: position p of both streams has read the same tokens.
            teacher_ids, teacher_mask, teacher_labels = batch.input_ids, batch.attention_mask, batch.labels
            positions = torch.arange(batch.input_ids.shape[1], device=batch.input_ids.device).expand_as(batch.input_ids)
            student_ends = teacher_ends = positions.masked_fill(batch.attention_mask.eq(0), -1)
        with torch.no_grad():
            teacher_out = self.teacher(input_ids=teacher_ids, attention_mask=teacher_mask, output_hidden_states=True)
        with self.accelerator.autocast():
            student_out = self.student(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                       output_hidden_states=True)
        # The reference model reads the student's tokens (ref(w) in a sequence weight).
        ref_logits = frozen_logits(self.ref, batch) if "ref_logits" in self.inputs[group] else None
        student = self.accelerator.unwrap_model(self.student)
        result = self.compiled(
            student_logits=student_out.logits[:, :-1],
            labels=batch.labels[:, 1:],
            teacher_logits=teacher_out.logits[:, :-1],
            teacher_labels=teacher_labels[:, 1:],
            student_hidden=student_out.hidden_states[-1][:, :-1],
            teacher_hidden=teacher_out.hidden_states[-1][:, :-1],
            student_input_ids=batch.input_ids[:, :-1],
            teacher_input_ids=teacher_ids[:, :-1],
            student_embedding=student.get_input_embeddings(),
            teacher_embedding=self.teacher.get_input_embeddings(),
            student_head=student.get_output_embeddings().weight,
            teacher_head=self.teacher.get_output_embeddings().weight,
            student_ends=student_ends[:, :-1], teacher_ends=teacher_ends[:, :-1], ref_logits=ref_logits,
            epoch=point.epoch, step=point.step, progress=point.progress, num_items=num_items, group=group,
        )
        if self.weight_stats is not None:
            self.weight_stats.observe(result)
        return result

    def sync_context(self, last: bool):
        """Skip the gradient all-reduce on every backward of the step but the last."""
        if last or self.world_size == 1:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(self.accelerator.no_sync(self.student))
        if self.has_objective_parameters:
            stack.enter_context(self.accelerator.no_sync(self.compiled))
        return stack

    def clip(self) -> float:
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        norm = self.accelerator.clip_grad_norm_(parameters, max_norm)
        return float(norm) if norm is not None else float("nan")

    # Logging, evaluation and checkpoints.

    def record(self, point: DrawPoint, totals: dict[str, float], lr: float, grad_norm: float, tokens: int,
               seconds: float, micro_batches: list[list[Batch]]) -> dict:
        record: dict[str, Any] = {
            "step": self.step,
            "epoch": round(self.step / self.steps_per_epoch, 6),
            "progress": round(self.step / self.total_steps, 6),
        }
        record.update(totals)
        record.update(schedule_values(self.objective, self.samplers, point))
        record["lr"] = lr
        record["grad_norm"] = grad_norm
        record["tokens"] = self.tokens
        record["tokens_per_s"] = tokens / seconds if seconds > 0 else 0.0
        record["step_seconds"] = seconds
        if self.weight_stats is not None:
            record.update(self.weight_stats.collect(self.accelerator))
        for k, groups in enumerate(zip(*micro_batches)):
            record[f"source/{k}"] = ",".join(dict.fromkeys(b.source for b in groups))
        return record

    def evaluate(self, point: DrawPoint) -> float:
        """Measure the student's held-out CE and pass it to adaptive samplers."""
        if self.heldout is None or len(self.heldout) == 0:
            return float("nan")
        loss = heldout_ce(self.accelerator, self.accelerator.unwrap_model(self.student), self.encoder,
                          self.heldout, self.config.eval_pairs, self.config.batch_size)
        for sampler in self.samplers:
            sampler.observe_validation_loss(loss, point)
        self.metrics.append({"step": point.step, "eval/ce": loss})
        logger.info("%s: step %d held-out CE %.4f", self.name, point.step, loss)
        return loss

    def save_checkpoint(self) -> None:
        checkpoint.save_checkpoint(self)

    def save_student(self) -> Any:
        """Write the student as safetensors into `run_dir/student`, atomically; return the saved model."""
        self.accelerator.wait_for_everyone()
        model = self.accelerator.unwrap_model(self.student)
        if is_peft_model(model):
            # The LoRA adapter goes to adapter/, and student/ contains the merged model that any loader reads.
            if self.accelerator.is_main_process:
                save_directory(model, self.run_dir / "adapter")
            model = model.merge_and_unload()
            state = model.state_dict()
        else:
            state = self.accelerator.get_state_dict(self.student)
        if self.accelerator.is_main_process:
            save_directory(model, self.run_dir / "student", state_dict=state, tokenizer=self.tokenizer)
            if self.projected:
                self.save_projector()
        self.accelerator.wait_for_everyone()
        return model

    def save_projector(self) -> None:
        """Write the trained projector to `run_dir/projector.safetensors` (a `projection.init` file), atomically."""
        projector = self.accelerator.unwrap_model(self.compiled).projector
        target = self.run_dir / "projector.safetensors"
        temporary = target.with_name(target.name + ".tmp")
        projector.save_pretrained(temporary)
        os.replace(temporary, target)


def save_directory(model: Any, target: Path, *, state_dict: dict | None = None, tokenizer: Any = None) -> None:
    """Write `model.save_pretrained` (safetensors) to `target` through a temporary directory."""
    temporary = target.with_name(target.name + ".tmp")
    if temporary.exists():
        shutil.rmtree(temporary)
    model.save_pretrained(temporary, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(temporary)
    checkpoint.replace_directory(temporary, target)


def is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def add_lora(student: Any, settings: dict, seed: int) -> Any:
    """Wrap the student with LoRA adapters (peft) when lora.r > 0; the adapters start from `seed`."""
    rank = int(settings.get("lora.r", 0))
    if rank == 0:
        return student
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("lora.r is set but peft is not installed: pip install peft, or set lora.r = 0") from None
    targets = [t.strip() for t in str(settings.get("lora.target_modules", "")).split(",") if t.strip()]
    config = LoraConfig(
        r=rank, lora_alpha=float(settings.get("lora.alpha", 16.0)), lora_dropout=float(settings.get("lora.dropout", 0.0)),
        target_modules=targets or None, task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    try:
        return get_peft_model(student, config)
    except ValueError as error:
        raise ConfigError(f"cannot add LoRA adapters to the student: {error}; set lora.target_modules") from None


def _at(point: DrawPoint, *, micro: int, group: int) -> DrawPoint:
    return DrawPoint(point.epoch, point.step, point.progress, micro, group, point.seed)


def add_detached(totals: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    value = value.detach().float()
    totals[name] = totals[name] + value if name in totals else value


def progress_postfix(record: dict) -> dict[str, str]:
    postfix = {"loss": f"{record['loss/total']:.4f}"}
    for name, value in record.items():
        if name.startswith("loss/") and name != "loss/total":
            postfix[name[5:]] = f"{value:.4f}"
    postfix["tok/s"] = f"{record['tokens_per_s']:.0f}"
    return postfix


def contains_adaptive(sampler: Sampler) -> bool:
    if isinstance(sampler, AdaptiveSampler):
        return True
    return any(contains_adaptive(s) for s in getattr(sampler, "components", []))


# --- Parts of the loop -----------------------------------------------------------------


def frozen_logits(model: Any, batch: Batch) -> torch.Tensor:
    """Run a frozen model on the batch without gradient; return (B, L-1, V) logits, position p scoring token p+1."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return logits[:, :-1]


def freeze(model: Any) -> Any:
    """Put the teacher in eval mode with no parameter requiring gradient."""
    model.eval()
    model.requires_grad_(False)
    return model


def build_optimizer(student: Any, compiled: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW: student weights with decay, biases and norms without, the objective's own parameters at projector_lr."""
    decay, no_decay = [], []
    for name, parameter in student.named_parameters():
        if not parameter.requires_grad:
            continue
        (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay, "lr": config.lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": config.lr},
    ]
    objective_parameters = [p for p in compiled.parameters() if p.requires_grad]
    if objective_parameters:
        groups.append({"params": objective_parameters, "weight_decay": config.weight_decay, "lr": config.projector_lr})
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError("the student has no trainable parameters: check that it is not frozen")
    return torch.optim.AdamW(groups, lr=config.lr)


def build_scheduler(optimizer: Any, config: TrainConfig, total_steps: int) -> Any:
    """Linear warmup over train.warmup_steps, then cosine, linear or constant to the last step."""
    from transformers import get_scheduler

    names = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
    warmup = min(config.warmup_steps, total_steps)
    return get_scheduler(names[config.schedule], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def count_steps(num_pairs: int, config: TrainConfig, world_size: int) -> tuple[int, int]:
    """Return (optimizer steps per epoch, total optimizer steps)."""
    per_step = config.batch_size * config.grad_accum * world_size
    steps_per_epoch = max(1, math.ceil(num_pairs / per_step))
    if config.max_steps > 0:
        return steps_per_epoch, config.max_steps
    return steps_per_epoch, max(1, math.ceil(config.epochs * steps_per_epoch))


def group_inputs(compiled: torch.nn.Module, objective: Objective, group: int) -> frozenset[str]:
    """Return the input roles (`teacher_logits`, `ref_logits`, ...) the terms of one group read.

    A kdsl `CompiledObjective` carries its graph, and its input nodes list the
    roles exactly. For any other module the roles are read off the objective's terms.
    """
    graph = getattr(compiled, "graph", None)
    if graph is not None and hasattr(graph, "term_nodes"):
        roles = set()
        for term in graph.term_nodes(group):
            for node in graph.ancestors(term.name):
                if node.op == "input":
                    roles.add(node.attr("role"))
        return frozenset(roles)
    roles = {"labels", "student_logits"}
    for term in objective.terms_of_group(group):
        if any(dist_reads(d, "o") for d in term.loss.args):
            roles.add("teacher_logits")
        for weight in (term.token_weight, term.sequence_weight):
            if weight is not None and weight.roles & {LOG_O_TOKEN, LOG_O_SEQ}:
                roles.add("teacher_logits")
            if weight is not None and LOG_REF_SEQ in weight.roles:
                roles.add("ref_logits")
    return frozenset(roles)


def dist_reads(dist: Any, model: str) -> bool:
    """Return whether a distribution expression reads `model` ("o" or "q")."""
    if isinstance(dist, ModelDist):
        return dist.model == model
    if isinstance(dist, ProjectedDist):
        return True
    if isinstance(dist, MixtureDist):
        return any(dist_reads(d, model) for _, d in dist.components)
    return False


def schedule_values(objective: Objective, samplers: list[Sampler], point: DrawPoint) -> dict[str, float]:
    """Return `sched/<name>` for schedule definitions, scheduled coefficients and mixture probabilities."""
    values = {}
    at = {"epoch": point.epoch, "step": point.step, "progress": point.progress}
    for name, definition in objective.definitions.items():
        if definition.kind == "schedule":
            values[f"sched/{name}"] = Scalar(definition.body).evaluate(**at)
    for term in objective.terms:
        if term.coefficient.is_schedule:
            values[f"sched/{term.name}"] = term.coefficient.evaluate(**at)
    for sampler in samplers:
        for name, value in sampler.schedule_values(point).items():
            values[f"sched/{name}"] = value
    return values


def heldout_ce(accelerator: Any, model: Any, encoder: PairEncoder, heldout: Any, max_pairs: int,
               batch_size: int) -> float:
    """Mean CE (nats per response token) of `model` on the first `max_pairs` held-out pairs.

    Each process scores its own share of the pairs; the sums are all-reduced.
    """
    count = min(max_pairs, len(heldout))
    indices = list(range(accelerator.process_index, count, accelerator.num_processes))
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            rows = heldout[indices[start : start + batch_size]]
            examples = [encoder.encode(p, r) for p, r in zip(rows["prompt"], rows["response"])]
            batch = collate(examples, encoder.pad_id).to(accelerator.device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
            labels = batch.labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="sum"
            )
            totals[0] += nll.double()
            totals[1] += (labels != -100).sum()
    model.train(was_training)
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    return float(totals[0] / totals[1].clamp(min=1))


class MetricsLog:
    """Per-step metrics: kept in memory, rewritten atomically to metrics.jsonl, mirrored to TensorBoard."""

    flush_seconds = 5.0

    def __init__(self, run_dir: Path, enabled: bool):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.records: list[dict] = []
        self.writer = None
        self.last_flush = time.monotonic()
        self.tensorboard_dir = Path(run_dir) / "tensorboard"

    def open(self, resume_step: int = 0) -> None:
        """Start the TensorBoard writer; events after `resume_step` from an earlier attempt are dropped."""
        if not self.enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            logger.warning("tensorboard is not installed: metrics go to metrics.jsonl only")
            return
        self.writer = SummaryWriter(str(self.tensorboard_dir), purge_step=resume_step + 1 if resume_step else None)

    def append(self, record: dict) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        if self.writer is not None:
            for name, value in record.items():
                if "/" in name or name in ("lr", "grad_norm", "tokens_per_s"):
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        self.writer.add_scalar(name, value, record["step"])
        if time.monotonic() - self.last_flush > self.flush_seconds:
            self.flush()

    def truncate(self, step: int) -> None:
        """Keep only records up to `step` (the step of the checkpoint a run resumes from)."""
        self.records = [r for r in checkpoint.read_jsonl(self.path) if r["step"] <= step]
        self.flush()

    def flush(self) -> None:
        if self.enabled:
            checkpoint.atomic_write_jsonl(self.path, self.records)
            if self.writer is not None:
                self.writer.flush()
        self.last_flush = time.monotonic()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# --- Loading and the run directory -----------------------------------------------------


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "accelerate", "datasets", "tokenizers", "safetensors", "lark", "sympy", "peft"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        versions[name] = getattr(module, "__version__", "unknown")
    try:
        from importlib.metadata import version

        versions["kdsl"] = version("kdsl")
    except Exception:  # kdsl run from a checkout without installation metadata
        versions["kdsl"] = "checkout"
    return versions


def write_run_files(out_dir: Path, objective: Objective) -> None:
    """Write the spec text, resolved settings and library versions into the run directory."""
    checkpoint.atomic_write_text(out_dir / "spec.kd", objective.source_text)
    checkpoint.atomic_write_json(out_dir / "settings.json", jsonable(objective.settings))
    checkpoint.atomic_write_json(out_dir / "versions.json", library_versions())


def multi_process_cpu() -> bool:
    """Return whether this is one of several processes on a machine without CUDA.

    accelerate sets up the gloo process group for such a launch (torchrun,
    mpirun) only when asked for the CPU explicitly.
    """
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def jsonable(settings: dict) -> dict:
    return {k: v if isinstance(v, (str, int, float, bool)) or v is None else str(v) for k, v in settings.items()}


def teacher_dtype(name: str) -> torch.dtype | None:
    """Resolve train.teacher_dtype; auto picks bf16 on GPUs and CPUs with native bf16 support."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if name == "float16":
        return torch.float16
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.float32
    return torch.bfloat16 if ("amx_bf16" in flags or "avx512_bf16" in flags) else torch.float32


@dataclass
class Parts:
    """The models and data of a run."""

    student: Any
    teacher: Any
    tokenizer: Any
    pairs: Any
    heldout: Any
    ref: Any = None
    teacher_tokenizer: Any = None  # None when the teacher reads the student's tokens


def load_parts(settings: dict, config: TrainConfig, given: Parts) -> Parts:
    """Load whatever the caller did not pass, from the resolved settings."""
    trust = bool(settings.get("trust_remote_code", False))
    parts = copy.copy(given)
    if parts.tokenizer is None or parts.student is None or parts.teacher is None or (parts.ref is None and settings.get("ref")):
        from kdsl import models

        if parts.tokenizer is None:
            parts.tokenizer = models.load_tokenizer(settings["student"], trust_remote_code=trust)
        if parts.student is None:
            parts.student = models.load_model(settings["student"], trust_remote_code=trust)
        dtype = teacher_dtype(settings.get("train.teacher_dtype", "auto"))
        if parts.teacher is None:
            parts.teacher = models.load_model(settings["teacher"], dtype=dtype, trust_remote_code=trust)
        if parts.ref is None and settings.get("ref"):
            parts.ref = models.load_model(settings["ref"], dtype=dtype, trust_remote_code=trust)
    parts.teacher_tokenizer = own_teacher_tokenizer(settings, parts, teacher_loaded=given.teacher is None)
    if parts.pairs is None or parts.heldout is None:
        from kdsl import data

        fields = {
            "prompt_field": settings.get("data.prompt_field", "prompt"),
            "response_field": settings.get("data.response_field", "response"),
        }
        if parts.pairs is None:
            parts.pairs = data.load_pairs(settings["data"], "train", fraction=settings.get("data.train_fraction", 1.0),
                                          seed=config.seed, **fields)
        if parts.heldout is None:
            parts.heldout = load_heldout(data, settings["data"], config.seed, fields)
        if parts.heldout is None:
            parts.pairs, parts.heldout = split_heldout(parts.pairs, config.eval_pairs, config.seed)
            logger.info("%s has no validation or test split: holding out %d of its training pairs",
                        settings["data"], len(parts.heldout))
    return parts


def own_teacher_tokenizer(settings: dict, parts: Parts, *, teacher_loaded: bool) -> Any:
    """Return the teacher's tokenizer when its vocabulary differs from the student's, else None.

    A tokenizer passed in `parts.teacher_tokenizer` wins. A teacher loaded
    from the `teacher` setting (`teacher_loaded`) comes with that setting's
    tokenizer when it is available locally. A teacher model passed without a
    tokenizer, or whose tokenizer cannot be found, reads the student's tokens.
    """
    from kdsl import models

    tokenizer = parts.teacher_tokenizer
    if tokenizer is None and teacher_loaded and parts.teacher is not None and settings.get("teacher"):
        try:
            tokenizer = models.load_tokenizer(settings["teacher"], trust_remote_code=bool(settings.get("trust_remote_code")))
        except (ConfigError, OSError, ValueError) as error:
            logger.info("tokenizer of teacher %s not found (%s), so the teacher reads the student's tokens",
                        settings["teacher"], error)
            return None
    if tokenizer is None or tokenizer.get_vocab() == parts.tokenizer.get_vocab():
        return None
    return tokenizer


def check_cross_vocab(objective: Objective, compiled: torch.nn.Module, parts: Parts) -> None:
    """Reject what a run with two tokenizers cannot do, naming the fix."""
    if parts.teacher_tokenizer is None:
        return
    student_name = objective.settings.get("student", "the student")
    teacher_name = objective.settings.get("teacher", "the teacher")
    if not hasattr(compiled, "projector") and "teacher_logits" in set().union(*(group_inputs(compiled, objective, k)
                                                             for k in range(len(objective.groups)))):
        raise ConfigError(
            f"the teacher {teacher_name} and the student {student_name} use different tokenizers, but the objective "
            "compares their distributions position by position; project one side into the other's vocabulary "
            "(KL(o→q ‖ q), KL(o ‖ q→o)) or choose a teacher with the student's tokenizer"
        )


def split_heldout(pairs: Any, max_pairs: int, seed: int) -> tuple[Any, Any]:
    """Hold out a seeded tenth of the pairs (at most `max_pairs`, at least one) for evaluation."""
    if len(pairs) < 2:
        raise ConfigError(f"the data has {len(pairs)} pair(s): at least 2 are needed to hold one out for evaluation")
    count = min(max_pairs, max(1, len(pairs) // 10))
    split = pairs.train_test_split(test_size=count, seed=seed, shuffle=True)
    return split["train"], split["test"]


def load_heldout(data: Any, name: str, seed: int, fields: dict) -> Any:
    """Load the validation split, else the test split; return None when the data has neither."""
    for split in ("validation", "test"):
        try:
            return data.load_pairs(name, split, fraction=1.0, seed=seed, **fields)
        except ConfigError as error:
            if "no split" not in str(error):
                raise
    return None


def position_limit(model: Any) -> int | None:
    """Return how many positions the model's position table holds, or None when it sets no limit."""
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def check_lengths(model: Any, config: TrainConfig, settings: dict, role: str) -> None:
    """Reject prompt and response lengths the model's position table cannot hold."""
    limit = position_limit(model)
    if limit is None:
        return
    response = max(config.max_response_tokens, int(settings.get("sgo.max_new_tokens", 64)))
    needed = config.max_prompt_tokens + response
    if needed > limit:
        raise ConfigError(
            f"data.max_prompt_tokens + max(data.max_response_tokens, sgo.max_new_tokens) = {needed} "
            f"exceeds the {role}'s {limit} positions: lower those settings so they sum to at most {limit}"
        )


def baseline_objective(objective: Objective) -> Objective:
    """Build the CE-only objective under d_data with the run's settings (the report's baseline)."""
    ce = Term(name="CE", loss=Divergence("CE"), group=0)
    return Objective(
        terms=[ce], groups=[DataSource()], settings=dict(objective.settings),
        reduction=objective.reduction, path="<baseline>", source_text="objective = CE\n",
    )


def compile_objective(objective: Objective, student: Any = None, teacher: Any = None) -> torch.nn.Module:
    """Compile a checked objective into its torch module.

    An objective with o→q or q→o gets a projector sized for `student` and
    `teacher`, started from `projection.init` when that setting names a file.
    """
    from kdsl.ir import build
    from kdsl.lower import lower
    from kdsl.projected import has_projection

    graph = build(objective)
    if not has_projection(graph):
        return lower(graph, objective)
    if student is None or teacher is None:
        raise ConfigError("this objective projects between vocabularies (o→q, q→o): compile it with the student and "
                          "the teacher loaded (compile_objective(objective, student, teacher)) so the projector fits them")
    from kdsl.projected import build_projector
    from kdsl.projection import model_hidden_size
    from kdsl.settings import defaults

    settings = {**defaults(), **objective.settings}
    sizes = (model_hidden_size(student, "student"), model_hidden_size(teacher, "teacher"))
    projector = build_projector(settings, sizes, None)
    init = settings.get("projection.init") or ""
    if init:
        if not Path(init).is_file():
            raise ConfigError(f"projection.init = {init!r}: file not found; pass a projector saved by kdsl run "
                              "(RUN_DIR/projector.safetensors) or DSKD's projector.pt, or leave the setting empty")
        ignored = projector.load_pretrained(init)
        if ignored:
            logger.warning("projection.init: ignored keys %s", ", ".join(ignored))
    return lower(graph, objective, projector=projector)


# --- The public entry point ------------------------------------------------------------


def train(objective: Objective, compiled: torch.nn.Module | None, *, out_dir: str | Path, student: Any = None,
          teacher: Any = None, tokenizer: Any = None, pairs: Any = None, heldout: Any = None, ref: Any = None,
          teacher_tokenizer: Any = None, baseline_compiled: torch.nn.Module | None = None, resume: bool = False,
          progress_bar: bool = True) -> TrainResult:
    """Distil `teacher` into `student` with `compiled`, train the CE baseline, write the report.

    Models, tokenizers and data not passed are loaded from the objective's
    settings. `compiled=None` compiles the objective once the models are
    loaded (an objective with o→q or q→o needs them for its projector). When
    the teacher's tokenizer (`teacher_tokenizer`, else the teacher setting's)
    has another vocabulary than the student's, the teacher reads every batch
    re-encoded by its own tokenizer. `out_dir` receives spec.kd, settings.json, versions.json,
    metrics.jsonl, tensorboard/, checkpoints/, student/, baseline/ and
    report.json. With `resume=True`, each stage restarts from its newest
    checkpoint, or is skipped when its student is already saved. A resumed
    call must pass the same initial student as the first attempt did.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    config = TrainConfig.from_settings(objective.settings)
    out_dir = Path(out_dir)
    # With train.mixed_precision at its default "no", the launcher's setting (accelerate config) applies.
    precision = None if config.mixed_precision == "no" else config.mixed_precision
    accelerator = Accelerator(mixed_precision=precision, cpu=multi_process_cpu())
    if not resume and (out_dir / "metrics.jsonl").exists():
        raise ConfigError(
            f"{out_dir} already contains a run: resume it (kdsl run SPEC --resume {out_dir}) "
            "or choose an empty output directory"
        )
    accelerator.wait_for_everyone()  # every process checks before the main process writes
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_run_files(out_dir, objective)

    set_seed(config.seed)
    parts = load_parts(objective.settings, config,
                       Parts(student, teacher, tokenizer, pairs, heldout, ref, teacher_tokenizer))
    if compiled is None:
        compiled = compile_objective(objective, parts.student, parts.teacher)
    check_cross_vocab(objective, compiled, parts)
    check_lengths(parts.student, config, objective.settings, "student")
    if parts.teacher_tokenizer is None:
        # With its own tokenizer the teacher's rows are cut to its positions (kdsl.teacher_tokens).
        check_lengths(parts.teacher, config, objective.settings, "teacher")
    initial = copy.deepcopy(parts.student)  # the report's "student (initial)" row and the baseline's start
    stages = [("distilled", objective, compiled, parts.student, out_dir)]
    if config.baseline:
        ce = baseline_objective(objective)
        stages.append(("baseline", ce, baseline_compiled or compile_objective(ce), copy.deepcopy(initial),
                       out_dir / "baseline"))

    fits: dict[str, FitResult] = {}
    for name, stage_objective, stage_compiled, stage_student, run_dir in stages:
        fits[name] = fit_stage(
            name, stage_objective, stage_compiled, stage_student, parts, config, accelerator, run_dir,
            resume=resume, progress_bar=progress_bar,
        )
        accelerator.free_memory()

    from kdsl.report import run_report

    report = run_report(
        accelerator=accelerator, out_dir=out_dir, settings=objective.settings, tokenizer=parts.tokenizer,
        teacher=parts.teacher, initial=initial, distilled=fits["distilled"], baseline=fits.get("baseline"),
        heldout=parts.heldout, print_table=progress_bar, teacher_tokenizer=parts.teacher_tokenizer,
    )
    distilled = fits["distilled"]
    return TrainResult(out_dir, distilled.student, distilled.metrics, distilled.steps,
                       fits.get("baseline"), report, distilled)


def fit_stage(name: str, objective: Objective, compiled: torch.nn.Module, student: Any, parts: Parts,
              config: TrainConfig, accelerator: Any, run_dir: Path, *, resume: bool,
              progress_bar: bool) -> FitResult:
    """Train one stage, resuming from its newest checkpoint or loading its finished student."""
    from accelerate.utils import set_seed

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    if resume:
        finished = checkpoint.load_finished(run_dir, student, name)
        if finished is not None:
            logger.info("%s: already finished in %s, not training again", name, run_dir)
            return finished

    set_seed(config.seed)
    student = add_lora(student, objective.settings, config.seed)
    trainer = Trainer(
        name=name, objective=objective, compiled=compiled, student=student, teacher=parts.teacher,
        tokenizer=parts.tokenizer, pairs=parts.pairs, heldout=parts.heldout, config=config,
        accelerator=accelerator, run_dir=run_dir, ref=parts.ref, progress_bar=progress_bar,
        teacher_tokenizer=parts.teacher_tokenizer,
    )
    if resume:
        checkpoint.restore_checkpoint(trainer)
    trainer.metrics.open(trainer.step)
    return trainer.run()


def run(objective: Objective, *, out_dir: str | Path | None = None, resume: str | Path | None = None,
        progress_bar: bool = True) -> TrainResult:
    """Compile `objective` and train it: the `kdsl run` command.

    `resume` names the run directory to continue; otherwise `out_dir` (default
    runs/<spec name>-<UTC time>) must not hold a run yet.
    """
    if resume is not None:
        if out_dir is not None and Path(out_dir).resolve() != Path(resume).resolve():
            raise ConfigError(f"--out {out_dir} and --resume {resume} name different directories: pass only --resume")
        if not Path(resume).is_dir():
            raise ConfigError(f"cannot resume: run directory {resume} does not exist")
        out_dir = resume
    elif out_dir is None:
        stem = Path(objective.path).stem if objective.path and not objective.path.startswith("<") else "run"
        out_dir = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    # train() compiles once the models are loaded, because a projector is sized by their hidden states.
    return train(objective, None, out_dir=out_dir, resume=resume is not None, progress_bar=progress_bar)
