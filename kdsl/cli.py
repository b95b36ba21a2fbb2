"""The `kdsl` command line: run, check, latex, graph, explain and eval a spec."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kdsl.errors import ConfigError, KdslError, SpecError

log = logging.getLogger("kdsl.cli")


def parse_assignments(pairs: list[str]) -> dict[str, str]:
    """Turn `--set key=value` arguments into a dict; raise ConfigError on a malformed pair."""
    overrides = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"invalid --set argument {pair!r}: expected key=value, as in --set train.lr=1e-4")
        overrides[key.strip()] = value.strip()
    return overrides


def tokenizers_match(settings: dict) -> bool | None:
    """Return whether teacher and student share a vocabulary, or None when their tokenizers are not available locally."""
    from kdsl.models import load_tokenizer

    try:
        teacher = load_tokenizer(settings["teacher"], trust_remote_code=settings["trust_remote_code"])
        student = load_tokenizer(settings["student"], trust_remote_code=settings["trust_remote_code"])
    except (KdslError, OSError, ValueError) as error:
        log.debug("vocabulary check deferred to run time: %s", error)
        return None
    return teacher.get_vocab() == student.get_vocab()


def load_spec(args):
    """Parse and validate the spec named on the command line, with --set overrides.

    When both tokenizers load locally, the spec is checked knowing whether
    they share a vocabulary, so an unprojected comparison across vocabularies
    is an error here rather than at run time.
    """
    import kdsl

    path = Path(args.spec)
    if not path.is_file():
        raise ConfigError(f"spec file not found: {args.spec!r}; pass the path of a .kd file, e.g. specs/wsgo.kd")
    overrides = parse_assignments(getattr(args, "set", None))
    objective = kdsl.load(path, overrides)
    same_vocab = tokenizers_match(objective.settings)
    if same_vocab is False:
        objective = kdsl.load(path, overrides, same_vocab=False)
    return objective


def print_warnings(objective) -> None:
    for warning in objective.warnings:
        print(warning.render(objective.source_text), file=sys.stderr)


def command_check(args) -> int:
    from kdsl import check

    objective = load_spec(args)
    print_warnings(objective)
    print(check.format_objective(objective, desugar=args.desugar))
    print(f"hash: {check.canonical_hash(objective)}")
    return 0


def command_settings(args) -> int:
    from kdsl.settings import SETTINGS

    for name, setting in SETTINGS.items():
        print(f"{name} = {setting.default!r}  # {setting.help}; {setting.describe_range()}")
    return 0


def command_latex(args) -> int:
    from kdsl import latex

    objective = load_spec(args)
    print(latex.render(objective, standalone=args.standalone))
    return 0


def command_graph(args) -> int:
    from kdsl import ir

    objective = load_spec(args)
    graph = ir.build(objective)
    graph.verify()
    print(graph.format(), end="" if graph.format().endswith("\n") else "\n")
    return 0


def command_explain(args) -> int:
    from kdsl import explain

    objective = load_spec(args)
    shapes = explain.spec_shapes(objective)
    flags = {"batch": args.batch, "length": args.length, "student_vocab": args.student_vocab,
             "teacher_vocab": args.teacher_vocab, "hidden": args.hidden}
    shapes.update({name: value for name, value in flags.items() if value is not None})
    print(explain.explain(objective, **shapes))
    return 0


def command_run(args) -> int:
    from kdsl import train

    objective = load_spec(args)
    print_warnings(objective)
    train.run(objective, out_dir=args.out, resume=args.resume, progress_bar=not args.quiet)
    return 0


def resolve_checkpoint(path: str) -> str:
    """Return the model folder inside a run directory, or the folder itself if it contains a model."""
    folder = Path(path)
    if (folder / "config.json").is_file():
        return str(folder)
    for candidate in ("student", "final", "model"):
        if (folder / candidate / "config.json").is_file():
            return str(folder / candidate)
    if not folder.exists():
        raise ConfigError(f"checkpoint not found: {path!r}; pass a run directory or a saved model folder")
    raise ConfigError(f"no model found in {path!r}: expected config.json there or in its student/ folder")


def run_settings(spec_settings: dict, checkpoint: Path, overrides: dict) -> dict:
    """Return the spec's settings with those a run saved in its settings.json, and --set over both.

    A run directory keeps the settings it trained with, overrides included,
    so evaluating it uses the same models, data limits and evaluation
    settings. A checkpoint folder without settings.json takes the spec's.
    """
    import json

    saved_path = checkpoint / "settings.json"
    if not saved_path.is_file():
        return dict(spec_settings)
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read the run's settings {saved_path}: {error}; pass a run directory written by "
                          "kdsl run, or a model folder") from None
    settings = dict(spec_settings)
    from_run = sorted(key for key, value in saved.items()
                      if key in settings and key not in overrides and settings[key] != value)
    settings.update({key: saved[key] for key in from_run})
    if from_run:
        print(f"using the settings of the run in {checkpoint} where they differ from the spec: {', '.join(from_run)} "
              "(--set still overrides them)")
    return settings


def command_eval(args) -> int:
    from kdsl import evaluate
    from kdsl.data import load_pairs
    from kdsl.models import load_model, load_tokenizer

    objective = load_spec(args)
    settings = run_settings(objective.settings, Path(args.checkpoint[0]), parse_assignments(args.set))
    checkpoints = {Path(p).name or p: resolve_checkpoint(p) for p in args.checkpoint}
    metrics = [metric.name for metric in objective.evals] or None
    trust = settings["trust_remote_code"]
    teacher = load_model(settings["teacher"], trust_remote_code=trust)
    tokenizer = load_tokenizer(settings["student"], trust_remote_code=trust)
    teacher_tokenizer = load_tokenizer(settings["teacher"], trust_remote_code=trust)
    if tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        # The teacher scores other tokens: KL and exposure bias compare the two models token by token.
        needs_teacher = sorted(set(metrics or ()) & {"kl", "exposure_bias"})
        if needs_teacher:
            raise ConfigError(
                f"the spec asks for {', '.join(needs_teacher)}, which compare the teacher {settings['teacher']} and the "
                f"student {settings['student']} token by token, but they use different tokenizers; "
                "ask for ce, bpc and rouge_l, which the student's tokenizer alone defines"
            )
        metrics = metrics or ["ce", "bpc", "rouge_l"]
        print(f"the teacher {settings['teacher']} has its own tokenizer: scoring CE, bits/char and ROUGE-L with the "
              "student's tokenizer (KL and exposure bias need one tokenizer)")
    pairs = load_pairs(settings["data"], args.split, prompt_field=settings["data.prompt_field"],
                       response_field=settings["data.response_field"])
    out_dir = args.out or str(Path(args.checkpoint[0]) / "eval")
    results = evaluate.evaluate_checkpoints(settings, checkpoints, out_dir, teacher=teacher, tokenizer=tokenizer,
                                            pairs=pairs, metrics=metrics)
    print(evaluate.format_table(results))
    print(f"wrote {out_dir}")
    return 0


def positive_int(text: str) -> int:
    """Parse a command-line count that must be at least 1 (argparse reports the error with the flag's name)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a whole number such as 256") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {value}: expected a positive number")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdsl",
        description="Compile and run knowledge-distillation objectives written in the .kd language.",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="log debug messages from kdsl")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, handler, help_text: str, spec: bool = True):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if spec:
            sub.add_argument("spec", help="path of the .kd spec file")
            sub.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                             help="override a setting of the spec, e.g. --set train.max_steps=50 (repeatable)")
        sub.set_defaults(handler=handler)
        return sub

    run = add("run", command_run, "train a student with the spec's objective, evaluate it and write a report")
    run.add_argument("--out", default=None, help="run directory (default: runs/<spec name>-<time>)")
    run.add_argument("--resume", default=None, metavar="DIR", help="resume the run in DIR from its last checkpoint")
    run.add_argument("--quiet", action="store_true", help="no progress bar")

    check = add("check", command_check, "validate the spec and print its normalised objective and hash")
    check.add_argument("--desugar", action="store_true", help="print named divergences as KL over mixtures")

    add("settings", command_settings, "list every setting with its default, range and help", spec=False)

    latex = add("latex", command_latex, "print the objective as LaTeX")
    latex.add_argument("--standalone", action="store_true", help="print a complete, compilable LaTeX document")

    add("graph", command_graph, "print the compiled graph in its stable text form")

    explain = add("explain", command_explain, "dry run: forward passes, generations, samplers and loss memory")
    explain.add_argument("--batch", type=positive_int, default=None, help="sequences per batch (B; default train.batch_size)")
    explain.add_argument("--length", type=positive_int, default=None,
                         help="tokens per sequence (T; default data.max_prompt_tokens + data.max_response_tokens)")
    explain.add_argument("--student-vocab", type=positive_int, default=None,
                         help="student vocabulary size (Vs; default: the student's config where it is local, else 32000)")
    explain.add_argument("--teacher-vocab", type=positive_int, default=None,
                         help="teacher vocabulary size (Vt; default: the teacher's config where it is local, else Vs)")
    explain.add_argument("--hidden", type=positive_int, default=None, help="hidden size H when the loss takes hidden states")

    evaluate = add("eval", command_eval, "evaluate checkpoints: held-out CE, KL to the teacher, ROUGE-L, exposure bias")
    evaluate.add_argument("--checkpoint", action="append", required=True, metavar="DIR",
                          help="a run directory or checkpoint folder (repeatable: curves are overlaid)")
    evaluate.add_argument("--out", default=None, help="folder for the table, CSV/JSON files and the plot "
                          "(default: eval/ inside the first checkpoint)")
    evaluate.add_argument("--split", default="test", choices=("validation", "test"), help="held-out split to evaluate on (default test, which training never reads; "
                          "the report of kdsl run uses validation)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except SpecError as error:
        print(error.render(), file=sys.stderr)
        return 1
    except KdslError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
