"""Atomic run files and training checkpoints.

Every file of a run directory is written to a temporary name and moved into
place with `os.replace`, so a crash leaves either the old file or the new
one. A checkpoint is a directory written under `<name>.tmp` and renamed once
complete; a directory without the suffix is always complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})$")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def atomic_write_json(path: str | Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSON-lines file; a missing file is empty."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def replace_directory(source: str | Path, target: str | Path) -> None:
    """Move the complete directory `source` to `target`, replacing any previous `target`.

    `os.replace` cannot replace a non-empty directory, so an old target is
    first renamed aside and removed after the new one is in place.
    """
    source, target = Path(source), Path(target)
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(source, target)
    if old.exists():
        shutil.rmtree(old)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """Return the complete checkpoints under `directory` as (step, path), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = CHECKPOINT_PATTERN.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> tuple[int, Path] | None:
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def prune_checkpoints(directory: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints and any leftover temporary ones."""
    directory = Path(directory)
    for _, path in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(path)
    if directory.is_dir():
        for entry in directory.iterdir():
            if entry.name.endswith(".tmp") or entry.name.endswith(".old"):
                shutil.rmtree(entry, ignore_errors=True)


# --- Saving and restoring a trainer ----------------------------------------------------


def save_checkpoint(trainer: Any) -> Path:
    """Write a complete checkpoint of `trainer` to `run_dir/checkpoints/step-NNNNNNNN`.

    accelerate's `save_state` writes the models (safetensors), the optimizer
    and the RNG states of every process. This function adds the scheduler,
    the step counters and each process's sampler state (stream positions,
    adaptive probability, replay buffer). It then renames the directory into
    place and prunes old checkpoints.
    """
    import torch

    accelerator = trainer.accelerator
    directory = trainer.run_dir / "checkpoints"
    final = directory / checkpoint_name(trainer.step)
    temporary = directory / (final.name + ".tmp")
    if accelerator.is_main_process:
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()

    accelerator.save_state(str(temporary), safe_serialization=True)
    rank = accelerator.process_index
    atomic_write_json(temporary / f"samplers_{rank}.json", [s.state_dict() for s in trainer.samplers])
    if accelerator.is_main_process:
        torch.save(trainer.scheduler.state_dict(), temporary / "lr_scheduler.pt")
        atomic_write_json(temporary / "trainer_state.json", {
            "step": trainer.step,
            "tokens": trainer.tokens,
            "train_seconds": trainer.train_seconds,
            "world_size": trainer.world_size,
            "total_steps": trainer.total_steps,
        })
    trainer.metrics.flush()
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        os.replace(temporary, final)
        prune_checkpoints(directory, trainer.config.keep_checkpoints)
    accelerator.wait_for_everyone()
    return final


def restore_checkpoint(trainer: Any) -> int:
    """Restore `trainer` from its newest complete checkpoint; return the step (0 if none)."""
    import torch
    from accelerate.logging import get_logger

    from kdsl.errors import ConfigError

    log = get_logger("kdsl.train")  # logs on the main process only
    found = latest_checkpoint(trainer.run_dir / "checkpoints")
    if found is None:
        log.info("%s: no checkpoint in %s, starting at step 0", trainer.name, trainer.run_dir)
        trainer.metrics.truncate(0)
        return 0
    step, path = found

    state = json.loads((path / "trainer_state.json").read_text())
    if state["world_size"] != trainer.world_size:
        raise ConfigError(
            f"checkpoint {path} was written by {state['world_size']} process(es) but this run has "
            f"{trainer.world_size}: resume with --num_processes {state['world_size']}"
        )
    if state["total_steps"] != trainer.total_steps:
        raise ConfigError(
            f"checkpoint {path} belongs to a run of {state['total_steps']} steps but the settings now give "
            f"{trainer.total_steps}: resume with the same train.* and data settings"
        )

    trainer.accelerator.load_state(str(path))
    trainer.scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", weights_only=True))
    samplers = json.loads((path / f"samplers_{trainer.accelerator.process_index}.json").read_text())
    for sampler, sampler_state in zip(trainer.samplers, samplers):
        sampler.load_state_dict(sampler_state)
    trainer.step = state["step"]
    trainer.tokens = state["tokens"]
    trainer.train_seconds = state["train_seconds"]
    trainer.metrics.truncate(step)
    log.info("%s: resumed from %s at step %d", trainer.name, path, step)
    return step


def load_weights(model: Any, directory: str | Path) -> None:
    """Load a `save_pretrained` safetensors directory (single file or sharded) into `model`."""
    directory = Path(directory)
    if (directory / "model.safetensors.index.json").exists():
        from transformers.modeling_utils import load_sharded_checkpoint

        load_sharded_checkpoint(model, str(directory), strict=False)
        return
    from safetensors.torch import load_model

    load_model(model, str(directory / "model.safetensors"), strict=False)


def load_finished(run_dir: str | Path, student: Any, name: str) -> Any:
    """Return the FitResult of a stage whose student is already saved, or None."""
    from kdsl.train import FitResult

    run_dir = Path(run_dir)
    saved = run_dir / "student"
    if not saved.is_dir():
        return None
    load_weights(student, saved)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r for r in metrics if "loss/total" in r]
    last = steps[-1] if steps else {"step": 0, "tokens": 0}
    return FitResult(name, student, metrics, int(last["step"]), int(last.get("tokens", 0)), run_dir)
