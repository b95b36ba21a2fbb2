"""Use a compiled kdsl objective inside a transformers `Trainer`.

The objective replaces the Trainer's loss: `compute_loss` runs the frozen
teacher, shifts the logits against the labels and calls the compiled module.
Dataset batches only (d_data); for student-generated batches use `kdsl run`.

    python examples/hf_trainer.py --objective "JS[0.5](o ‖ q) + 0.5·CE" --max-steps 50
"""

from __future__ import annotations

import argparse

import torch
from transformers import Trainer, TrainingArguments

import kdsl
from kdsl.data import load_pairs
from kdsl.models import load_model, load_tokenizer


class DistillationTrainer(Trainer):
    """A transformers Trainer whose loss is a compiled kdsl objective against a frozen teacher."""

    def __init__(self, *args, teacher: torch.nn.Module, objective: torch.nn.Module, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.objective = objective

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs).logits
        # The logit at position p scores the token at p + 1.
        result = self.objective(
            student_logits=outputs.logits[:, :-1],
            teacher_logits=teacher_logits[:, :-1],
            labels=labels[:, 1:],
            num_items=num_items_in_batch,
            progress=self.state.global_step / max(1, self.state.max_steps),
            step=self.state.global_step,
            epoch=self.state.epoch or 0.0,
        )
        return (result.loss, outputs) if return_outputs else result.loss


def tokenize_pairs(tokenizer, pairs, max_tokens: int):
    """Tokenize prompt + response + EOS with labels of -100 on the prompt, so only the response is scored."""
    rows = []
    for pair in pairs:
        prompt = tokenizer(pair["prompt"], add_special_tokens=False)["input_ids"][-max_tokens:]
        response = tokenizer(pair["response"], add_special_tokens=False)["input_ids"][:max_tokens] + [tokenizer.eos_token_id]
        rows.append({"input_ids": prompt + response, "labels": [-100] * len(prompt) + response})
    return rows


def collate(pad_id: int):
    def pad(rows):
        width = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), width), pad_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    return pad


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objective", default="KL(o ‖ q) + 0.5·CE", help="kdsl objective (text or a .kd path)")
    parser.add_argument("--teacher", default="builtin:tiny-teacher")
    parser.add_argument("--student", default="builtin:tiny-student")
    parser.add_argument("--pairs", type=int, default=256, help="training pairs taken from builtin:shakespeare")
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--out", default="runs/hf_trainer")
    args = parser.parse_args(argv)

    tokenizer = load_tokenizer(args.student)
    teacher, student = load_model(args.teacher), load_model(args.student)
    pairs = load_pairs("builtin:shakespeare", "train").select(range(args.pairs))
    objective = kdsl.compile(args.objective)

    training = TrainingArguments(
        output_dir=args.out, max_steps=args.max_steps, per_device_train_batch_size=8, learning_rate=1e-3,
        logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, remove_unused_columns=False,
    )
    trainer = DistillationTrainer(
        model=student, args=training, train_dataset=tokenize_pairs(tokenizer, pairs, 48),
        data_collator=collate(tokenizer.pad_token_id), teacher=teacher, objective=objective,
    )
    output = trainer.train()
    print(f"final training loss: {output.training_loss:.4f}")
    return output.training_loss


if __name__ == "__main__":
    main()
