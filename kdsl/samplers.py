"""Batches for each sampling group: `d_data`, `d_o`, `d_q`, mixtures and adaptive SGO with replay.

Every sampler returns a `Batch` laid out for training: prompt and response
concatenated, right-padded, with HF-style labels (the token id on response
positions, -100 on prompt and padding). After the trainer's causal shift,
`logits[:, p]` scores `labels[:, p + 1]`.

Generated responses are labelled exactly like dataset responses. A response
ends after its first EOS, and that EOS is a label. Padding is found from the
response length, never from the token id, so a tokenizer whose pad id equals
its EOS id keeps the EOS. Prompts are left-padded for generation and the
result is laid out again right-padded.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from kdsl.errors import ConfigError
from kdsl.objective import (
    AdaptiveSource,
    DataSource,
    MixtureSource,
    Source,
    StudentSource,
    TeacherSource,
)

IGNORE_INDEX = -100


# --- Examples and batches --------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One tokenised sequence: prompt ids, response ids (scored) and the source that produced it."""

    prompt: tuple[int, ...]
    response: tuple[int, ...]
    source: str


@dataclass
class Batch:
    """A right-padded training batch with HF-style labels (-100 on prompt and padding)."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L), 1 on prompt and response tokens
    labels: torch.Tensor  # (B, L), input_ids on response tokens, -100 elsewhere
    source: str  # the group's source name, or names joined by "+" for a per-sequence mixture
    sequence_sources: tuple[str, ...] = ()  # source of each row
    examples: tuple[Example, ...] = field(default=(), repr=False)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.source,
            self.sequence_sources,
            self.examples,
        )

    def count_targets(self) -> int:
        """Count the scored positions after the causal shift (labels[:, 1:] != -100)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def count_scored_sequences(self) -> int:
        """Count rows with at least one scored position after the causal shift."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).any(dim=1).sum())


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Lay out examples as prompt + response, right-padded, with labels on the response only."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    width = max(len(e.prompt) + len(e.response) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)

    for row, example in enumerate(examples):
        prompt_length = len(example.prompt)
        length = prompt_length + len(example.response)
        input_ids[row, :prompt_length] = torch.tensor(example.prompt, dtype=torch.long)
        input_ids[row, prompt_length:length] = torch.tensor(example.response, dtype=torch.long)
        attention_mask[row, :length] = 1
        labels[row, prompt_length:length] = input_ids[row, prompt_length:length]

    sources = tuple(e.source for e in examples)
    name = "+".join(dict.fromkeys(sources))
    return Batch(input_ids, attention_mask, labels, name, sources, tuple(examples))


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for generation; return input ids and attention mask, both (B, P)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError("cannot generate from an empty prompt: give it at least one token")
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


def cut_completion(tokens: Sequence[int], eos_ids: frozenset[int]) -> tuple[int, ...]:
    """Keep the generated tokens up to and including the first EOS (all of them if none)."""
    for index, token in enumerate(tokens):
        if token in eos_ids:
            return tuple(tokens[: index + 1])
    return tuple(tokens)


# --- Tokenising pairs ------------------------------------------------------------------


@dataclass(frozen=True)
class PairEncoder:
    """Tokenise prompt/response pairs: prompts keep their last tokens, responses their first.

    A response that fits gets the EOS appended, so the model learns to stop.
    An empty prompt becomes the BOS token (or the EOS where there is no BOS),
    because the first response token needs a position before it to be scored.
    With `chat_template`, a prompt becomes one user turn of the tokenizer's
    chat template followed by the generation prompt (the assistant header).
    """

    tokenizer: Any
    max_prompt_tokens: int
    max_response_tokens: int
    chat_template: bool = False

    @property
    def eos_id(self) -> int:
        return eos_token_id(self.tokenizer)

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    def encode_prompt(self, prompt: str) -> tuple[int, ...]:
        if self.chat_template:
            prompt = self.format_chat(prompt)
        # The whole prompt is encoded and then cut, so a prompt longer than the tokenizer's model_max_length
        # is expected here; verbose=False keeps transformers from warning about it.
        ids = self.tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
        ids = ids[-self.max_prompt_tokens :]
        if not ids:
            start = self.tokenizer.bos_token_id
            ids = [start if start is not None else self.eos_id]
        return tuple(ids)

    def format_chat(self, prompt: str) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(
                f"data.chat_template is true but tokenizer {getattr(self.tokenizer, 'name_or_path', '')!r} "
                "has no chat template: set data.chat_template = false or use a chat model's tokenizer"
            )
        messages = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode_response(self, response: str) -> tuple[int, ...]:
        ids = self.tokenizer(response, add_special_tokens=False, verbose=False)["input_ids"]
        return tuple((list(ids) + [self.eos_id])[: self.max_response_tokens])

    def encode(self, prompt: str, response: str, source: str = "d_data") -> Example:
        return Example(self.encode_prompt(prompt), self.encode_response(response), source)


def eos_token_id(tokenizer: Any) -> int:
    """Return the tokenizer's EOS id, or raise a ConfigError with the fix when it has none."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(
            f"tokenizer {type(tokenizer).__name__} has no EOS token: set tokenizer.eos_token "
            "(generated responses end at the EOS and the EOS is scored)"
        )
    return int(eos)


def pad_token_id(tokenizer: Any) -> int:
    """Return the pad id, falling back to the EOS id (padding is masked by length, not by id)."""
    pad = tokenizer.pad_token_id
    return int(pad) if pad is not None else eos_token_id(tokenizer)


# --- The stream of training pairs ------------------------------------------------------


class PairStream:
    """An endless, seeded, shuffled pass over the training pairs.

    Each epoch uses its own permutation, drawn from (seed, stream id, epoch),
    so every process computes the same one. A draw of `count` pairs consumes
    `count * world_size` positions, and process `rank` takes its own slice.
    The state is the (epoch, offset) position, so a run resumes exactly.
    """

    def __init__(self, pairs: Any, encoder: PairEncoder, *, seed: int, stream_id: int,
                 rank: int = 0, world_size: int = 1):
        if len(pairs) == 0:
            raise ConfigError("the training data has no pairs: check the data setting and data.train_fraction")
        self.pairs = pairs
        self.encoder = encoder
        self.seed = seed
        self.stream_id = stream_id
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.offset = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.stream_id, epoch])
        return rng.permutation(len(self.pairs))

    def next_indices(self, count: int) -> list[int]:
        """Advance the stream by one global draw and return this process's pair indices."""
        positions = []
        for _ in range(count * self.world_size):
            if self.offset == len(self._order):
                self.epoch += 1
                self.offset = 0
                self._order = self._permutation(self.epoch)
            positions.append(int(self._order[self.offset]))
            self.offset += 1
        return positions[self.rank * count : (self.rank + 1) * count]

    def next_examples(self, count: int, source: str = "d_data") -> list[Example]:
        rows = self.pairs[self.next_indices(count)]
        return [self.encoder.encode(p, r, source) for p, r in zip(rows["prompt"], rows["response"])]

    def next_prompts(self, count: int) -> list[tuple[int, ...]]:
        rows = self.pairs[self.next_indices(count)]
        return [self.encoder.encode_prompt(p) for p in rows["prompt"]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])
        self._order = self._permutation(self.epoch)


# --- Generation ------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings for generated responses (the sgo.* settings)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @classmethod
    def from_settings(cls, settings: dict) -> "GenerationSettings":
        return cls(
            max_new_tokens=int(settings.get("sgo.max_new_tokens", 64)),
            temperature=float(settings.get("sgo.temperature", 1.0)),
            top_k=int(settings.get("sgo.top_k", 0)),
            top_p=float(settings.get("sgo.top_p", 1.0)),
        )

    def generate_kwargs(self) -> dict:
        """Keyword arguments for `model.generate`; temperature 0 means greedy decoding."""
        if self.temperature == 0.0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        # top_k=0 is passed explicitly because transformers otherwise applies its default of 50.
        return {
            "do_sample": True,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
        }


@contextlib.contextmanager
def quiet_padding_warning() -> Iterator[None]:
    """Silence transformers' "passing in an attention_mask" warning while kdsl generates.

    kdsl passes the mask, but some decoding steps of `generate` call the
    model without it. With a tokenizer whose pad, BOS and EOS share one id
    (as the builtin tokenizers do), generated EOS ids then trigger it.
    """
    source = logging.getLogger("transformers.modeling_utils")
    level = source.level
    source.setLevel(logging.ERROR)
    try:
        yield
    finally:
        source.setLevel(level)


def generate_examples(model: Any, prompts: Sequence[Sequence[int]], *, pad_id: int,
                      eos_ids: frozenset[int], settings: GenerationSettings, source: str) -> list[Example]:
    """Generate one response per prompt with the model's KV-cache `generate`.

    The model runs in eval mode without gradient and goes back to its former
    mode afterwards. Sampling uses the global torch RNG, which the trainer
    seeds and checkpoints.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(prompts, pad_id)  # (B, P)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), quiet_padding_warning():
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                pad_token_id=pad_id,
                eos_token_id=sorted(eos_ids),
                **settings.generate_kwargs(),
            )
    finally:
        model.train(was_training)

    completions = output[:, input_ids.shape[1] :].tolist()  # (B, N), padded after each EOS
    return [
        Example(tuple(prompt), cut_completion(completion, eos_ids), source)
        for prompt, completion in zip(prompts, completions)
    ]


@dataclass(frozen=True)
class TokenBridge:
    """Carry generation across two tokenizers: student prompts to the generating model and its text back.

    A model whose tokenizer differs from the student's (a teacher under
    `d_o`) reads each prompt decoded from the student's ids and encoded
    with its own tokenizer. What it generates is decoded and encoded again
    with the student's tokenizer (`kdsl.projection.retokenize`), so the
    student batch has student ids that spell the generated text, and a
    generated EOS becomes the student's EOS.
    """

    student_tokenizer: Any
    model_tokenizer: Any

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.model_tokenizer)

    @property
    def eos_ids(self) -> frozenset[int]:
        return frozenset({eos_token_id(self.model_tokenizer)})

    def prompt(self, student_ids: Sequence[int]) -> list[int]:
        """Return the prompt in the generating model's tokens; an empty text becomes its BOS (or EOS)."""
        text = self.student_tokenizer.decode(list(student_ids), skip_special_tokens=True)
        ids = list(self.model_tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]) if text else []
        if not ids:
            bos = self.model_tokenizer.bos_token_id
            ids = [int(bos) if bos is not None else eos_token_id(self.model_tokenizer)]
        return ids

    def response(self, model_prompt: Sequence[int], completion: Sequence[int]) -> tuple[int, ...]:
        """Return a completion of the generating model in student tokens, read after its prompt."""
        from kdsl.projection import retokenize

        if not completion:
            return ()
        aligned = retokenize(list(completion), self.model_tokenizer, self.student_tokenizer,
                             context_ids=list(model_prompt))
        return tuple(aligned.teacher_ids)


# --- Samplers --------------------------------------------------------------------------


@dataclass(frozen=True)
class DrawPoint:
    """Training position of a draw (epoch, step, progress, micro-batch, group), read by schedules and coin flips."""

    epoch: float = 0.0
    step: int = 0
    progress: float = 0.0
    micro: int = 0  # micro-batch index within the optimizer step
    group: int = 0
    seed: int = 0

    def generator(self, path: tuple[int, ...]) -> torch.Generator:
        """Return a generator seeded from this point and a node path; equal on every process."""
        entropy = [self.seed, self.group, self.step, self.micro, *path]
        seed = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)
        return torch.Generator().manual_seed(seed)


class Sampler:
    """Base class: draw `count` examples for one process at a point of training."""

    name: str = "sampler"

    def draw_examples(self, count: int, point: DrawPoint) -> list[Example]:
        raise NotImplementedError

    def draw(self, count: int, point: DrawPoint) -> Batch:
        return collate(self.draw_examples(count, point), self.pad_id)

    def schedule_values(self, point: DrawPoint) -> dict[str, float]:
        """Return the sampler's schedule values at `point` (mixture probabilities), for logging."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def observe_validation_loss(self, loss: float, point: DrawPoint) -> None:
        """Receive a validation loss (adaptive samplers react to it, others ignore it)."""


class DataSampler(Sampler):
    """`d_data`: dataset pairs, teacher-forced."""

    def __init__(self, stream: PairStream, name: str = "d_data"):
        self.stream = stream
        self.name = name
        self.pad_id = stream.encoder.pad_id

    def draw_examples(self, count: int, point: DrawPoint) -> list[Example]:
        return self.stream.next_examples(count, self.name)

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])


class GenerationSampler(Sampler):
    """`d_q` or `d_o`: a model generates responses to dataset prompts; only the response is scored.

    With a `bridge` the model has its own tokenizer: it reads the prompts
    in its tokens and its responses come back in the student's.
    """

    def __init__(self, stream: PairStream, model: Callable[[], Any], settings: GenerationSettings, name: str,
                 bridge: TokenBridge | None = None):
        self.stream = stream
        self.model = model  # returns the (unwrapped) model to generate with at call time
        self.settings = settings
        self.name = name
        self.bridge = bridge
        self.pad_id = stream.encoder.pad_id
        self.eos_ids = frozenset({stream.encoder.eos_id})

    def draw_examples(self, count: int, point: DrawPoint) -> list[Example]:
        prompts = self.stream.next_prompts(count)
        if self.bridge is None:
            return generate_examples(
                self.model(), prompts, pad_id=self.pad_id, eos_ids=self.eos_ids,
                settings=self.settings, source=self.name,
            )
        model_prompts = [self.bridge.prompt(prompt) for prompt in prompts]
        generated = generate_examples(
            self.model(), model_prompts, pad_id=self.bridge.pad_id, eos_ids=self.bridge.eos_ids,
            settings=self.settings, source=self.name,
        )
        return [Example(tuple(prompt), self.bridge.response(example.prompt, example.response), self.name)
                for prompt, example in zip(prompts, generated)]

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])


class MixtureSampler(Sampler):
    """A mixture of samplers whose probabilities may be schedules of epoch, step and progress.

    Per batch, one coin flip picks the component of the whole batch; per
    sequence, each row gets its own flip. Flips come from a generator seeded by
    the draw point, so every process makes the same choices.
    """

    def __init__(self, components: list[tuple[Any, Sampler]], per: str, path: tuple[int, ...] = ()):
        if per not in ("batch", "sequence"):
            raise ConfigError(f"mixture.per is {per!r}: expected 'batch' or 'sequence'")
        self.coefficients = [c for c, _ in components]
        self.components = [s for _, s in components]
        self.per = per
        self.path = path
        self.name = " + ".join(f"{c}·{s.name}" for c, s in components)
        self.pad_id = self.components[0].pad_id

    def probabilities(self, point: DrawPoint) -> list[float]:
        values = [c.evaluate(epoch=point.epoch, step=point.step, progress=point.progress) for c in self.coefficients]
        for coefficient, value in zip(self.coefficients, values):
            if not (-1e-9 <= value <= 1 + 1e-9) or math.isnan(value):
                raise ConfigError(
                    f"mixture coefficient {coefficient} is {value} at step {point.step} "
                    f"(epoch {point.epoch:.3f}): expected a probability in [0, 1]"
                )
        total = sum(values)
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(
                f"mixture coefficients of {self.name} sum to {total} at step {point.step}: expected 1"
            )
        return [min(max(v, 0.0), 1.0) for v in values]

    def draw_examples(self, count: int, point: DrawPoint) -> list[Example]:
        weights = torch.tensor(self.probabilities(point), dtype=torch.float64)
        generator = point.generator(self.path)
        if self.per == "batch":
            choice = int(torch.multinomial(weights, 1, generator=generator))
            return self.components[choice].draw_examples(count, point)

        choices = torch.multinomial(weights, count, replacement=True, generator=generator).tolist()
        drawn = {
            k: iter(self.components[k].draw_examples(choices.count(k), point))
            for k in sorted(set(choices))
        }
        return [next(drawn[k]) for k in choices]

    def schedule_values(self, point: DrawPoint) -> dict[str, float]:
        values = {}
        for component, probability in zip(self.components, self.probabilities(point)):
            values[f"mix{''.join(map(str, self.path))}/{component.name}"] = probability
        for component in self.components:
            values.update(component.schedule_values(point))
        return values

    def state_dict(self) -> dict:
        return {"components": [s.state_dict() for s in self.components]}

    def load_state_dict(self, state: dict) -> None:
        for sampler, sub in zip(self.components, state["components"]):
            sampler.load_state_dict(sub)

    def observe_validation_loss(self, loss: float, point: DrawPoint) -> None:
        for sampler in self.components:
            sampler.observe_validation_loss(loss, point)


# --- Adaptive SGO with a replay buffer (DistiLLM) -------------------------------------


@dataclass(frozen=True)
class AdaptiveSettings:
    """The adaptive.* settings, with the spec's `adaptive(..., name=value)` arguments applied."""

    init_prob: float = 0.0
    max_prob: float = 0.5
    step: float = 0.1
    threshold: float = 0.0
    replay_capacity: int = 1000
    replay_ratio: float = 0.5
    fresh_schedule: str = "decreasing"

    @classmethod
    def from_source(cls, source: AdaptiveSource, settings: dict) -> "AdaptiveSettings":
        values = {}
        for name in cls.__dataclass_fields__:
            key = f"adaptive.{name}"
            if key in settings:
                values[name] = settings[key]
        for name, value in source.params:
            short = name.removeprefix("adaptive.")
            if short not in cls.__dataclass_fields__:
                known = ", ".join(cls.__dataclass_fields__)
                raise ConfigError(f"adaptive() has no parameter {name!r}: expected one of {known}")
            values[short] = value
        config = cls(**values)
        if config.init_prob > config.max_prob:
            raise ConfigError(
                f"adaptive.init_prob is {config.init_prob} but adaptive.max_prob is {config.max_prob}: "
                "the initial probability must not exceed the maximum"
            )
        if config.fresh_schedule not in ("decreasing", "constant", "increasing"):
            raise ConfigError(
                f"adaptive.fresh_schedule is {config.fresh_schedule!r}: "
                "expected 'decreasing', 'constant' or 'increasing'"
            )
        return config

    def fresh_share(self, progress: float) -> float:
        """Return the share of student-generated draws that generate afresh rather than replay."""
        if self.fresh_schedule == "decreasing":
            return 1.0 - progress
        if self.fresh_schedule == "increasing":
            return progress
        return 1.0 - self.replay_ratio


class ReplayBuffer:
    """A FIFO buffer of generated sequences, reused off-policy; the oldest are evicted first."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.items: deque[Example] = deque(maxlen=capacity) if capacity > 0 else deque(maxlen=0)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def is_full(self) -> bool:
        return len(self.items) >= self.capacity

    def add(self, examples: Sequence[Example]) -> None:
        self.items.extend(examples)

    def sample(self, count: int, generator: torch.Generator) -> list[Example]:
        """Draw `count` distinct sequences uniformly; the buffer must hold at least `count`."""
        order = torch.randperm(len(self.items), generator=generator)[:count].tolist()
        return [Example(self.items[i].prompt, self.items[i].response, "replay") for i in order]

    def state_dict(self) -> dict:
        return {"items": [[list(e.prompt), list(e.response), e.source] for e in self.items]}

    def load_state_dict(self, state: dict) -> None:
        self.items.clear()
        for prompt, response, source in state["items"]:
            self.items.append(Example(tuple(prompt), tuple(response), source))


class AdaptiveSampler(Sampler):
    """DistiLLM's adaptive off-policy student generation.

    Each batch flips a coin r ~ U(0, 1) against the current probability p:

    - r < p · fresh_share(progress), or r < p while the buffer is not full:
      the student generates afresh and the sequences enter the buffer;
    - otherwise r < p: the batch is replayed from the buffer (the teacher is
      run again on the replayed tokens by the trainer);
    - otherwise: a dataset batch.

    p starts at `init_prob` and rises by `step` (capped at `max_prob`) each time
    the validation loss exceeds the last reference loss by at least
    `threshold`. The loss that caused the rise becomes the new reference.
    """

    def __init__(self, student: GenerationSampler, data: Sampler, config: AdaptiveSettings,
                 path: tuple[int, ...] = ()):
        self.student = student
        self.data = data
        self.config = config
        self.path = path
        self.name = f"adaptive({student.name}, {data.name})"
        self.pad_id = data.pad_id
        self.probability = config.init_prob
        self.reference_loss: float | None = None
        self.buffer = ReplayBuffer(config.replay_capacity)

    def draw_examples(self, count: int, point: DrawPoint) -> list[Example]:
        generator = point.generator(self.path)
        coin = float(torch.rand((), generator=generator, dtype=torch.float64))
        p = self.probability
        fresh = coin < p * self.config.fresh_share(point.progress)
        if fresh or (coin < p and (not self.buffer.is_full or len(self.buffer) < count)):
            examples = self.student.draw_examples(count, point)
            self.buffer.add(examples)
            return examples
        if coin < p:
            return self.buffer.sample(count, generator)
        return self.data.draw_examples(count, point)

    def observe_validation_loss(self, loss: float, point: DrawPoint) -> None:
        if self.reference_loss is None:
            self.reference_loss = loss
        elif loss >= self.reference_loss + self.config.threshold and loss > self.reference_loss:
            self.probability = min(self.probability + self.config.step, self.config.max_prob)
            self.reference_loss = loss
        self.data.observe_validation_loss(loss, point)

    def schedule_values(self, point: DrawPoint) -> dict[str, float]:
        return {
            "adaptive/prob": self.probability,
            "adaptive/fresh_share": self.config.fresh_share(point.progress),
            "adaptive/buffer": float(len(self.buffer)),
        }

    def state_dict(self) -> dict:
        return {
            "probability": self.probability,
            "reference_loss": self.reference_loss,
            "buffer": self.buffer.state_dict(),
            "student": self.student.state_dict(),
            "data": self.data.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.probability = float(state["probability"])
        self.reference_loss = state["reference_loss"]
        self.buffer.load_state_dict(state["buffer"])
        self.student.load_state_dict(state["student"])
        self.data.load_state_dict(state["data"])


# --- Building samplers from sampling groups --------------------------------------------


@dataclass
class SamplerContext:
    """Inputs of the samplers: data, tokenizer, models and the process layout."""

    pairs: Any  # datasets.Dataset with `prompt` and `response` columns
    encoder: PairEncoder
    student: Callable[[], Any]  # returns the unwrapped student at call time
    teacher: Callable[[], Any]
    settings: dict
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    teacher_tokenizer: Any = None  # set when the teacher's tokenizer differs from the student's
    _streams: int = 0

    def new_stream(self) -> PairStream:
        """Return a fresh pair stream; each leaf sampler of a run gets its own stream id."""
        stream = PairStream(
            self.pairs, self.encoder, seed=self.seed, stream_id=self._streams,
            rank=self.rank, world_size=self.world_size,
        )
        self._streams += 1
        return stream


def build_sampler(source: Source, context: SamplerContext, path: tuple[int, ...] = ()) -> Sampler:
    """Build the sampler tree of one sampling group."""
    generation = GenerationSettings.from_settings(context.settings)
    if isinstance(source, DataSource):
        return DataSampler(context.new_stream(), source.name)
    if isinstance(source, StudentSource):
        return GenerationSampler(context.new_stream(), context.student, generation, source.name)
    if isinstance(source, TeacherSource):
        bridge = None
        if context.teacher_tokenizer is not None:
            bridge = TokenBridge(context.encoder.tokenizer, context.teacher_tokenizer)
        return GenerationSampler(context.new_stream(), context.teacher, generation, source.name, bridge)
    if isinstance(source, MixtureSource):
        # The spec's own choice wins; the mixture.per setting applies where the spec left the default.
        per = source.per if source.per != "batch" else context.settings.get("mixture.per", "batch")
        components = [
            (coefficient, build_sampler(component, context, path + (index,)))
            for index, (coefficient, component) in enumerate(source.components)
        ]
        return MixtureSampler(components, per, path)
    if isinstance(source, AdaptiveSource):
        student = build_sampler(source.student, context, path + (0,))
        data = build_sampler(source.data, context, path + (1,))
        if not isinstance(student, GenerationSampler):
            raise ConfigError(
                f"adaptive() takes a generated source first (d_q or d_o), got {student.name}: "
                "write adaptive(d_q, d_data)"
            )
        return AdaptiveSampler(student, data, AdaptiveSettings.from_source(source, context.settings), path)
    raise ConfigError(f"unknown sampling source {source!r}")


def build_samplers(groups: Sequence[Source], context: SamplerContext) -> list[Sampler]:
    """Build one sampler per sampling group, in group order."""
    return [build_sampler(source, context, (index,)) for index, source in enumerate(groups)]
