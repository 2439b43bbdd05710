"""The `mmcl` command. Heavy libraries are imported inside the subcommands, so `mmcl --help`
answers at once."""

from __future__ import annotations

import argparse
import sys


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    from .config import load_config

    config = load_config(args.config, overrides)
    from .train import train

    metrics = train(config)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print({k: round(v, 4) for k, v in metrics.items() if "R@" in k or "top" in k or k.endswith("wall_s")})
    return 0


def _eval(args: argparse.Namespace, overrides: list[str]) -> int:
    import dataclasses
    import json

    from .config import DataConfig, EvalConfig, EvalSpec, build_section

    if overrides:
        raise SystemExit(f"mmcl eval: unknown arguments {overrides}; see mmcl eval --help")
    given = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(EvalSpec)}
    given = {k: v for k, v in given.items() if v is not None}
    spec = build_section(EvalSpec, given, "eval")
    cfg = build_section(EvalConfig, {"batch_size": args.batch_size, "chunk_size": args.chunk_size,
                                "retrieval_ks": args.ks}, "eval")
    from .evaluation import evaluate_model, format_results

    results = evaluate_model(args.model, spec, cfg, DataConfig(cache_dir=args.cache_dir))
    from accelerate import PartialState

    if not PartialState().is_main_process:  # every rank has the gathered results; one reports them
        return 0
    confusion = results.pop("confusion", None)
    print(format_results(f"{spec.task} on {spec.dataset} ({spec.split})", results))
    if spec.confusion_matrix and confusion is not None:
        from .plots import save_confusion_png

        save_confusion_png(confusion, list(results["per_class_accuracy"]), spec.confusion_matrix)
        print(f"confusion matrix: {spec.confusion_matrix}")
    if args.output:
        record = {"model": args.model, "eval": dataclasses.asdict(spec), "results": results}
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
        print(f"results: {args.output}")
    return 0


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    import dataclasses

    from .config import EvalSpec

    parser = sub.add_parser("eval", help="zero-shot classification or retrieval of a model on a dataset",
                            description="mmcl eval MODEL --dataset SPEC [--task zero_shot|retrieval] ...; MODEL is an "
                                        "mmcl folder or a CLIPModel / SiglipModel / VisionTextDualEncoderModel folder or Hub id.")
    parser.add_argument("model")
    for f in dataclasses.fields(EvalSpec):  # every EvalSpec key is a flag: --label-column, --templates, ...
        if f.name != "every":
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, help=f"(default: {f.default})")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--ks", default="[1, 5, 10]", help="retrieval R@k list")
    parser.add_argument("--cache-dir", default=None, help="where built-in datasets are cached")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.set_defaults(func=_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmcl", description="Train and evaluate CLIP-style image–text models.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a dual encoder",
                           description="mmcl train [CONFIG.yaml] [--section.key=value ...]; "
                                       "with no config, configs/quickstart.yaml (built-in emoji data).")
    train.add_argument("config", nargs="?", default=None, help="YAML config (default: the quickstart)")
    train.set_defaults(func=_train)
    _add_eval_parser(sub)
    from .predict import add_predict_parsers
    from .hub import add_push_parser

    from .datacli import add_data_parser
    from .export import add_export_parser

    add_predict_parsers(sub)
    add_push_parser(sub)
    add_data_parser(sub)
    add_export_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = build_parser().parse_known_args(argv)
    from .config import ConfigError

    try:
        return args.func(args, overrides)
    except ConfigError as err:
        print(f"mmcl: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
