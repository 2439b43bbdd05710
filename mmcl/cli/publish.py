"""`mmcl export`, `mmcl push` and `mmcl wise-ft`: publishing a trained model, or mixing two."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import trust_backbone_argument


def export(args: argparse.Namespace, extra: list[str]) -> int:
    from ..publish.export import export_model

    report = export_model(args.model_dir, args.out_dir, overwrite=args.overwrite)
    print(f"exported to {args.out_dir}\n{report}")
    return 0


def push(args: argparse.Namespace, extra: list[str]) -> int:
    from ..publish.push import ensure_model_card, plan, push_folder, require_token, select_files

    folder = Path(args.folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such model folder")
    if args.dry_run:  # nothing written, nothing sent, no token needed
        print(plan(folder))
        return 0
    require_token()  # before anything is written or sent
    had_card = (folder / "README.md").is_file()
    card = ensure_model_card(folder, args.repo_id)
    if not had_card:
        print(f"wrote the model card {card}")
    print(f"uploading from {folder}: {', '.join(select_files(folder))}")
    url = push_folder(folder, args.repo_id, private=args.private, revision=args.revision,
                      commit_message=args.commit_message)
    print(f"pushed to {args.repo_id}: {url}")
    return 0


def wise_ft(args: argparse.Namespace, extra: list[str]) -> int:
    from ..apps.wise_ft import parse_alphas, sweep
    from ..apps.wise_ft import wise_ft as mix

    alphas = parse_alphas(args.alpha)
    if args.eval:
        from ..config_loader import load_config

        # the models are the two folders: the config gives the evaluations (its model keys need not be set)
        config = load_config(args.eval, [f"--model.init_from={args.finetuned}", *extra])
        sweep(args.pretrained, args.finetuned, alphas, args.out, config, args.target, args.retention)
        print(f"wrote {args.out}/wise_ft_sweep.json and {args.out}/wise_ft_curve.png")
        return 0
    if len(alphas) > 1 or extra or args.target or args.retention:
        args.parser.error("several alphas, --target, --retention and config overrides need --eval CONFIG, which "
                          "names the evaluations")
    out = mix(args.pretrained, args.finetuned, alphas[0], args.out, overwrite=args.overwrite)
    print(f"wrote {out}: {1 - alphas[0]:g} x {args.pretrained} + {alphas[0]:g} x {args.finetuned}")
    return 0


def register(sub: Any) -> None:
    parser = sub.add_parser("export", help="export a trained model for transformers / sentence-transformers",
                            description="mmcl export MODEL_DIR OUT_DIR: a folder that loads without mmcl, with "
                                        "transformers (when the pooling allows) and sentence-transformers.")
    parser.add_argument("model_dir", help="an mmcl model folder (e.g. runs/NAME/final)")
    trust_backbone_argument(parser)
    parser.add_argument("out_dir", help="the folder to write: new, empty, or an earlier export (replaced)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR even if mmcl did not write it")
    parser.set_defaults(func=export, parser=parser)
    parser = sub.add_parser(
        "push", help="upload a trained model folder to the Hugging Face Hub",
        description="Upload the model files of FOLDER (weights as safetensors, configs, tokenizer and processor, "
                    "sentence-transformers modules, README.md; never pickles, optimizer states, checkpoints or "
                    "logs). Writes a model card first if FOLDER has none. The token comes from HF_TOKEN or "
                    "`hf auth login`.")
    parser.add_argument("folder", help="a model folder, e.g. runs/quickstart/final or an export folder")
    parser.add_argument("--repo-id", required=True, help="user/name or org/name")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", default=None, help="branch to commit to (created if missing)")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--dry-run", action="store_true", help="list what would be sent, with sizes; send nothing")
    parser.set_defaults(func=push, parser=parser)
    wise = sub.add_parser("wise-ft", help="mix a pretrained and a fine-tuned model in weight space (WiSE-FT)",
                          description="mmcl wise-ft PRETRAINED FINETUNED OUT --alpha 0.5: writes (1 - alpha) x "
                                      "PRETRAINED + alpha x FINETUNED as an mmcl model folder. Both are mmcl model "
                                      "folders of one architecture and one tokenizer.")
    wise.add_argument("pretrained", help="the model before fine-tuning (an mmcl model folder)")
    wise.add_argument("finetuned", help="the fine-tuned model (an mmcl model folder)")
    trust_backbone_argument(wise)
    wise.add_argument("out", help="the folder to write: new, empty, or one mmcl wrote (replaced)")
    wise.add_argument("--overwrite", action="store_true", help="replace OUT even if mmcl did not write it")
    wise.add_argument("--alpha", default="0.5", help="the fine-tuned model's weight, 0..1; with --eval, a list "
                                                     "to sweep: 0,0.25,0.5,0.75,1")
    wise.add_argument("--eval", default=None, metavar="CONFIG", help="sweep: evaluate each mix on this mmcl config's "
                      "evaluations (data.validation, eval.sets; --section.key=value overrides follow) and write "
                      "OUT/wise_ft_sweep.json and OUT/wise_ft_curve.png instead of a model")
    wise.add_argument("--target", default=None, help="sweep: the fine-tuning task's metric (default eval.best_metric)")
    wise.add_argument("--retention", default=None, help="sweep: the metric of what the model keeps (default the "
                      "first of eval.retention)")
    wise.set_defaults(func=wise_ft, parser=wise, takes_overrides=True)
