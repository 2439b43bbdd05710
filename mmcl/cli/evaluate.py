"""`mmcl eval MODEL --dataset SPEC --task zero_shot|retrieval ...`, `mmcl eval MODEL --suite SUITE.yaml`
and `mmcl plot RUN_DIR`."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from .common import trust_backbone_argument


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from ..artifacts import check_model_reference
    from ..config import EvalConfig, EvalSpec
    from ..config_loader import build_section

    check_model_reference(args.model)  # before the slow imports
    if args.suite:
        return run_suite(args)
    given = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(EvalSpec)}
    spec = build_section(EvalSpec, {k: v for k, v in given.items() if v is not None}, "eval")
    if not spec.dataset:
        args.parser.error("the following arguments are required: --dataset")
    if spec.confusion_matrix:
        from ..evaluation.plots import pyplot

        pyplot()  # matplotlib is there, before the evaluation runs
    cfg = build_section(EvalConfig, {"batch_size": args.batch_size, "chunk_size": args.chunk_size,
                                     "retrieval_ks": args.ks}, "eval")
    from accelerate import PartialState

    from ..evaluation.evaluators import evaluate_model, format_results

    results = evaluate_model(args.model, spec, cfg, cache_dir=args.cache_dir)
    if not PartialState().is_main_process:  # every rank has the gathered results; one reports them
        return 0
    confusion = results.pop("confusion", None)
    print(format_results(f"{spec.task} on {spec.dataset} ({spec.split})", results))
    if spec.confusion_matrix and confusion is not None:
        from ..evaluation.plots import save_confusion_png

        save_confusion_png(confusion, list(results["per_class_accuracy"]), spec.confusion_matrix)
        print(f"confusion matrix: {spec.confusion_matrix}")
    if args.output:
        if args.output_format == "clip_benchmark":
            from ..evaluation.formats import clip_benchmark_record

            record = clip_benchmark_record(args.model, spec.dataset, spec.task, results, args.language)
        else:
            record = {"model": args.model, "eval": dataclasses.asdict(spec), "results": results}
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
        print(f"results ({args.output_format}): {args.output}")
    return 0


def load_suite(path: str) -> dict[str, tuple[str, str | None, Any]]:
    """A suite file: {tasks: {key: {name, main_metric, <EvalSpec keys>}}} -> {key: (name, main metric, spec)}."""
    from pathlib import Path

    import yaml

    from ..config import ConfigError, EvalSpec
    from ..config_loader import build_section

    if not Path(path).is_file():
        raise ConfigError(f"--suite {path}: no such file")
    try:
        tasks = (yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}).get("tasks")
    except (yaml.YAMLError, AttributeError) as err:
        raise ConfigError(f"{path}: not a suite (YAML with a 'tasks' mapping): {err}") from err
    if not isinstance(tasks, dict) or not tasks:
        raise ConfigError(f"{path}: give the tasks as a mapping, e.g. tasks: {{emoji: {{task: zero_shot, "
                          "dataset: 'builtin:emoji', label_column: name}}")
    suite = {}
    for key, values in tasks.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: tasks.{key} must be a mapping of eval options")
        values = dict(values)
        name, main = str(values.pop("name", key)), values.pop("main_metric", None)
        spec = build_section(EvalSpec, values, f"tasks.{key}")
        if not spec.dataset:
            raise ConfigError(f"{path}: tasks.{key} names no dataset")
        suite[key] = (name, main, spec)
    return suite


def run_suite(args: argparse.Namespace) -> int:
    """Every task of the suite on one loaded model; with --output, a folder of CLIP_benchmark files and
    DataComp's eval_results.jsonl (each task's main metric, then their average)."""
    from pathlib import Path

    from accelerate import Accelerator, PartialState

    from ..config import EvalConfig
    from ..config_loader import build_section
    from ..evaluation.evaluators import evaluate_model
    from ..evaluation.formats import clip_benchmark_record, datacomp_average, datacomp_line
    from ..towers.inference import load_encoder

    suite = load_suite(args.suite)
    out = Path(args.output) if args.output else None
    written = [out / f"{key}.json" for key in suite] + [out / "eval_results.jsonl"] if out else []
    there = [p for p in written if p.exists()]
    if there:
        raise FileExistsError(f"{there[0]} is there already (eval never overwrites a file): choose another --output")
    cfg = build_section(EvalConfig, {"batch_size": args.batch_size, "chunk_size": args.chunk_size,
                                     "retrieval_ks": args.ks}, "eval")
    import torch

    accelerator = Accelerator(cpu=not torch.accelerator.is_available())
    bundle = load_encoder(args.model).to(accelerator.device)
    lines, records = [], {}
    for key, (name, main, spec) in suite.items():
        results = evaluate_model(bundle, spec, cfg, cache_dir=args.cache_dir, accelerator=accelerator)
        results.pop("confusion", None)
        lines.append(datacomp_line(key, name, spec.task, results, main))
        records[key] = clip_benchmark_record(args.model, spec.dataset, spec.task, results, args.language)
        if PartialState().is_main_process:
            print(f"{name}: {lines[-1]['metrics']['main_metric']:.4f}", flush=True)
    if not PartialState().is_main_process:
        return 0
    average = datacomp_average(lines)
    print(f"average of {average['metrics']['tasks']} main metrics: {average['metrics']['main_metric']:.4f}")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        for key, record in records.items():
            with open(out / f"{key}.json", "x", encoding="utf-8") as f:
                json.dump(record, f, indent=2)
        with open(out / "eval_results.jsonl", "x", encoding="utf-8") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines + [average])
        print(f"results: {out}/eval_results.jsonl (DataComp) and one CLIP_benchmark file per task")
    return 0


def register(sub: Any) -> None:
    from ..config import EvalSpec

    parser = sub.add_parser("eval", help="zero-shot classification or retrieval of a model on a dataset",
                            description="mmcl eval MODEL --dataset SPEC [--task zero_shot|retrieval] ... or mmcl eval "
                                        "MODEL --suite SUITE.yaml [--output DIR]; MODEL is "
                                        "an mmcl folder or a CLIPModel / SiglipModel / VisionTextDualEncoderModel "
                                        "folder or Hub id.")
    parser.add_argument("model")
    trust_backbone_argument(parser)
    for f in dataclasses.fields(EvalSpec):  # every EvalSpec key is a flag: --label-column, --templates, ...
        if f.name != "every":
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None,
                                help=f"{f.metadata.get('help', '')} (default: {f.default})")
    parser.add_argument("--batch-size", type=int, default=256, help="images or texts embedded at once")
    parser.add_argument("--chunk-size", type=int, default=1024, help="retrieval queries scored at once")
    parser.add_argument("--ks", default="[1, 5, 10]", help="retrieval R@k list")
    parser.add_argument("--cache-dir", default=None, help="where built-in datasets are cached")
    parser.add_argument("--output", default=None, help="write the results as JSON here (with --suite: a folder)")
    parser.add_argument("--suite", default=None, help="a YAML list of evaluations run in turn (e.g. "
                                                      "configs/eval_suites/builtin.yaml); --output gets DataComp's "
                                                      "eval_results.jsonl and a CLIP_benchmark file per task")
    parser.add_argument("--output-format", default="clip_benchmark", choices=["clip_benchmark", "mmcl"],
                        help="clip_benchmark: CLIP_benchmark's result file (its task and metric names; "
                             "`clip_benchmark build` reads it); mmcl: every number, per-class accuracy included")
    parser.add_argument("--language", default="en", help="the captions' and labels' language, as CLIP_benchmark records it")
    parser.set_defaults(func=run, parser=parser)
    plot = sub.add_parser("plot", help="draw a run's training curves and evaluation metrics into one PNG",
                          description="mmcl plot RUN_DIR [--output PNG]: loss, learning rate, temperature, "
                                      "gradient norm, samples/s and every evaluation metric against the step, from "
                                      "RUN_DIR/logs/metrics.jsonl. Needs matplotlib (pip install \"mmcl[plot]\").")
    plot.add_argument("run_dir", help="a train.output_dir")
    plot.add_argument("--output", default=None, help="the PNG (default: RUN_DIR/training_curves.png)")
    plot.set_defaults(func=plot_run, parser=plot)


def plot_run(args: argparse.Namespace, extra: list[str]) -> int:
    from pathlib import Path

    from ..evaluation.plots import read_log, save_training_curves

    output = Path(args.output or Path(args.run_dir) / "training_curves.png")
    series = read_log(args.run_dir)
    save_training_curves(series, output, str(args.run_dir))
    print(f"{len(series)} series from {args.run_dir}: {output}")
    return 0
