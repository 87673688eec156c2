"""``pneumoscope``: the command line.

This module owns the data/train/evaluate commands. Other packages plug their commands in through
the ``pneumoscope.commands`` entry-point group (``pipeline`` from ``pipelines``, ``serve`` and
``predict`` from ``serving``), so ``model`` never imports kfp or kserve.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

log = logging.getLogger("pneumoscope")

#: Errors that mean "the input is wrong": one line, exit 2, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


class CommandError(Exception):
    """Raised by commands for a one-line, user-facing failure."""


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage mistakes end in ONE line that says what is wrong (``--help`` shows the usage)."""

    subcommands = None  # the subparsers action, once added: {name: parser} in its ``choices``

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def add_subparsers(self, **kwargs):
        self.subcommands = super().add_subparsers(**kwargs)
        return self.subcommands


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("matplotlib", "PIL", "urllib3", "alembic", "botocore", "s3fs", "aiobotocore"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _user_errors() -> tuple[type[BaseException], ...]:
    from model.bundle import BundleError
    from model.data import DataError
    from model.errors import InvalidImageError
    from model.kept_registration import KeptRegistrationError
    from model.registry import RegistryError

    return USER_ERRORS + (CommandError, DataError, RegistryError, BundleError, InvalidImageError, KeptRegistrationError)


# ----------------------------------------------------------------------------------------------
# data prepare

def cmd_data_prepare(args) -> int:
    from model.data import SplitFractions, prepare, resolve_source
    from model.profiles import get_profile
    from model.settings import SHARED_DATA, Settings

    settings = Settings()
    source = resolve_source(args.data or settings.data, settings.home / "downloads", SHARED_DATA)
    image_size = args.image_size or get_profile(args.profile).image_size
    out = args.out or settings.home / "cache" / f"{image_size}px"
    result = prepare(source, out, image_size, SplitFractions(args.val_fraction, args.holdout_fraction, args.seed),
                     workers=args.workers or settings.workers, limit_per_class=args.limit_per_class,
                     exclude_blurred=args.exclude_blurred, mask_text=args.mask_text, resize_mode=args.resize,
                     lung_model=args.lung_model, lung_crop=args.lung_crop, lung_margin=args.lung_margin)
    quality = result.summary["quality"]
    print(json.dumps({"cache": str(result.out_dir), "kept": result.summary["kept"],
                      "excluded": result.summary["excluded"], "splits": result.summary["splits"],
                      "quality": {k: quality[k] for k in ("sharpness_cutoff", "blurred", "text_overlay",
                                                          "excluded_blurred", "masked_text")},
                      "manifest_sha256": result.manifest_sha256}))
    return 0


def cmd_train(args) -> int:
    from model.profiles import Profile, customise, get_profile
    from model.settings import Settings
    from model.training import train

    settings = Settings()
    overrides = dict(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, image_size=args.image_size,
                     erase_borders=args.erase_borders, field_mask=args.field_mask, augment=args.augment,
                     sync_bn=args.sync_bn or None,
                     num_workers=args.workers if args.workers is not None else settings.workers)
    if args.profile_file:  # a resolved profile handed over by `model.training.launch` (torchrun)
        profile = customise(Profile(**json.loads(Path(args.profile_file).read_text())), **overrides)
    else:
        profile = get_profile(args.profile or settings.profile, **overrides)
    if not Path(args.cache).is_dir():
        raise CommandError(f"cache folder not found: {args.cache} (run `pneumoscope data prepare` first)")
    seed = args.seed if args.seed is not None else settings.seed
    if args.folds:
        from model.folds import cross_validate

        report = cross_validate(args.cache, args.out, profile, k=args.folds, seed=seed, device=args.device,
                                pretrained=args.pretrained, resume=not args.no_resume)
        if report:  # rank 0 under torchrun
            print(json.dumps(_finite({"cv": str(Path(args.out) / "cv.json"), "k": report["k"],
                                      "mean_sd": report["mean_sd"],
                                      "abstention_coverage": report["abstention"]["coverage_mean"],
                                      "sanity": {k: report["sanity"].get(k) for k in
                                                 ("n", "auc", "sensitivity", "specificity", "ece")}})))
        return 0
    result = train(args.cache, args.out, profile, pretrained=args.pretrained, seed=seed,
                   resume=not args.no_resume, device=args.device)
    if os.environ.get("RANK", "0") == "0":  # one answer per torchrun job
        print(json.dumps({"checkpoint": str(result.checkpoint), "best_epoch": result.best_epoch,
                          "best_val_auc": result.best_val_auc,
                          "images_per_second": round(result.images_per_second, 2),
                          "seconds": round(result.seconds, 1)}))
    return 0


def cmd_evaluate(args) -> int:
    import tempfile

    from model.evaluation import evaluate_folder
    from model.registry import fetch_model

    with tempfile.TemporaryDirectory() as tmp:
        bundle, info = fetch_model(args.model, tmp, args.mlflow_uri)
        result = evaluate_folder(bundle, args.data, args.split, args.precision, args.bootstrap)
    result.update(model_uri=info["uri"], model_version=info["version"])
    if args.json:
        print(json.dumps(_finite(result)))
    else:
        print(f"{info['uri']} on {args.split} (n={result['n']}): AUC {result['auc']:.4f}  accuracy {result['accuracy']:.4f}  "
              f"sensitivity {result['sensitivity']:.4f}  specificity {result['specificity']:.4f}  ECE {result['ece']:.4f}  "
              f"threshold {result['threshold']:.4f}")
    return 0


def cmd_register(args) -> int:
    from model.kept_registration import kept_root, list_kept, retry
    from model.registry import RegistryError
    from model.settings import Settings

    home = Settings().home.resolve()
    if args.list:
        for item in list_kept(home):
            print(json.dumps(item))
        return 0
    try:
        with contextlib.redirect_stdout(sys.stderr):  # MLflow prints "View run ... at: URL"; stdout is the JSON
            registration = retry(home, args.retry, args.mlflow_uri)
    except RegistryError as exc:
        raise CommandError(f"{exc}; the registration stays kept in {kept_root(home) / args.retry}") from None
    print(json.dumps(registration.to_dict()))
    return 0


def cmd_pretrain(args) -> int:
    from model.pretraining import PretrainSettings, pretrain

    if not Path(args.cache).is_dir():
        raise CommandError(f"cache folder not found: {args.cache} (run `pneumoscope data prepare` first)")
    overrides = {k: v for k, v in dict(image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size,
                                       seed=args.seed, max_steps_per_epoch=args.max_steps).items() if v is not None}
    report = pretrain(args.cache, args.out, PretrainSettings(**overrides), device=args.device)
    print(json.dumps({"backbone": report["backbone"], "seconds": report["seconds"],
                      "loss": [r["loss"] for r in report["history"]]}))
    return 0


def cmd_lungs_train(args) -> int:
    from model.lung_segmentation import LungTrainSettings, train_lung_model

    overrides = {k: v for k, v in dict(epochs=args.epochs, size=args.size, seed=args.seed, limit=args.limit,
                                       batch_size=args.batch_size).items() if v is not None}
    overrides["finish_only"] = args.finish
    info = train_lung_model(args.data, args.out, LungTrainSettings(**overrides))
    print(json.dumps(_finite({"lung_model": str(args.out), "dice": info["dice"]})))
    return 0


def _finite(value):
    """JSON has no NaN: undefined metrics (one class only) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from model.profiles import PROFILES

    parser = OneLineErrorParser(prog="pneumoscope", description="Pneumonia detection on chest X-rays: "
                                     "data, training, evaluation, pipelines and serving.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    profiles = ", ".join(f"{p.name} ({p.description})" for p in PROFILES.values())

    data = commands.add_parser("data", help="data ingest").add_subparsers(dest="data_command", required=True)
    prep = data.add_parser("prepare", help="quality-gate, split by patient and cache a data set",
                           description="Decode, quality-gate, deduplicate and split images by patient; write a "
                                       "uint8 cache and the split manifest.")
    prep.add_argument("--data", help="Kaggle-layout folder, class folders, MedMNIST .npz folder, or s3:// URL "
                                     "(default: $PNEUMOSCOPE_DATA, then ../shared/data/chest_xray_224)")
    prep.add_argument("--out", type=Path, help="cache folder (default: $PNEUMOSCOPE_HOME/cache/<size>px)")
    prep.add_argument("--profile", default="demo", choices=list(PROFILES), help="takes the image size from a profile")
    prep.add_argument("--image-size", type=int, help="cache resolution in pixels (overrides the profile)")
    prep.add_argument("--val-fraction", type=float, default=0.15, help="share of patients for validation")
    prep.add_argument("--holdout-fraction", type=float, default=0.10, help="share of patients held out for reporting")
    prep.add_argument("--seed", type=int, default=42)
    prep.add_argument("--workers", type=int, help="decode processes (default: all cores)")
    prep.add_argument("--limit-per-class", type=int, help="keep only about this many training images per class")
    prep.add_argument("--exclude-blurred", action="store_true",
                      help="leave training films out whose sharpness (variance of the Laplacian) lies far below "
                           "the training distribution (they are always reported)")
    prep.add_argument("--mask-text", action="store_true",
                      help="paint detected burned-in text and markers over in the cached training pixels "
                           "(serving reports them, it does not mask: pair with `train --erase-borders`)")
    prep.add_argument("--resize", choices=["squash", "pad"], default="squash",
                      help="squash to a square (default, like the public 224 px copies) or keep the aspect ratio "
                           "and pad; it travels with the model")
    prep.add_argument("--lung-crop", choices=["none", "box", "mask", "box+mask"], default="none",
                      help="candidate: crop each film to its lungs' bounding box (box), blank what lies outside the "
                           "dilated lungs (mask), or both; it travels with the model and the predictor does the same")
    prep.add_argument("--lung-model", help="lung segmentation model folder (`pneumoscope lungs train`), needed by "
                                           "--lung-crop; copied into the cache and, at evaluation, into the bundle")
    prep.add_argument("--lung-margin", type=float, default=0.1,
                      help="--lung-crop box: margin around the lungs' box, as a share of its height/width")
    prep.set_defaults(func=cmd_data_prepare)

    tr = commands.add_parser("train", help="train ResNet-50 on a prepared cache",
                             description=f"Train a ResNet-50 (several GPUs: `torchrun --nproc-per-node N -m "
                                         f"model.cli train ...`). Profiles: {profiles}.")
    tr.add_argument("--cache", required=True, help="folder written by `data prepare`")
    tr.add_argument("--out", required=True, help="checkpoint folder (resumed if it holds last.pt)")
    tr.add_argument("--profile", choices=list(PROFILES), help="training budget (default: $PNEUMOSCOPE_PROFILE or demo)")
    tr.add_argument("--epochs", type=int)
    tr.add_argument("--lr", type=float)
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--image-size", type=int)
    tr.add_argument("--pretrained", help="ImageNet ResNet-50 weights file (torchvision state dict)")
    tr.add_argument("--seed", type=int)
    tr.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    tr.add_argument("--no-resume", action="store_true", help="start over even if last.pt exists")
    tr.add_argument("--folds", type=int, metavar="K",
                    help="patient-grouped stratified K-fold cross-validation of the recipe on the training pool "
                         "(out-of-fold calibration, thresholds and refer band; the sanity set every time); writes "
                         "OUT/cv.json and one model per fold")
    tr.add_argument("--erase-borders", type=float, metavar="P",
                    help="candidate: erase random patches in the border band (markers, text) with probability P")
    tr.add_argument("--field-mask", choices=["none", "ellipse"],
                    help="candidate: blank everything outside a fixed elliptical lung-field prior (train + serve)")
    tr.add_argument("--augment", choices=["standard", "acquisition"],
                    help="candidate: 'acquisition' adds gamma, contrast, blur/resolution, noise, crops and rescales "
                         "and AP/PA-like geometry to the standard augmentation")
    tr.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs under torchrun (CUDA only)")
    tr.add_argument("--workers", type=int, help="DataLoader workers per process (default: from the cores)")
    tr.add_argument("--profile-file", help="a resolved profile as JSON (written by the pipeline for torchrun)")
    tr.set_defaults(func=cmd_train)

    ev = commands.add_parser("evaluate", help="score a registered or local model on a data split",
                             description="Score MODEL on one split of a Kaggle-layout folder with the threshold "
                                         "stored with the model.")
    ev.add_argument("model", metavar="MODEL", help="models:/NAME/VERSION, models:/NAME@ALIAS, or a bundle folder")
    ev.add_argument("data", metavar="DATA", help="Kaggle-layout folder ({train,val,test}/{NORMAL,PNEUMONIA})")
    ev.add_argument("--split", default="test", help="split folder to score (default: test)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--precision", default="fp32", choices=["fp32", "int8", "auto"])
    ev.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (0: none)")
    ev.add_argument("--mlflow-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, then local SQLite)")
    ev.set_defaults(func=cmd_evaluate)

    reg = commands.add_parser("register", help="finish a registration that MLflow could not take",
                              description="When the pipeline's register step cannot reach MLflow (or its artifact "
                                          "store), the model, its metrics and report are kept under "
                                          "$PNEUMOSCOPE_HOME/registrations/RUN. --retry RUN registers them (once: a "
                                          "retry after a partial attempt does not make a second version); --list "
                                          "shows what is kept.")
    action = reg.add_mutually_exclusive_group(required=True)
    action.add_argument("--retry", metavar="RUN", help="finish the kept registration RUN")
    action.add_argument("--list", action="store_true", help="list the kept registrations as JSON lines")
    reg.add_argument("--mlflow-uri", help="register there instead of the MLflow the run was meant for")
    reg.set_defaults(func=cmd_register)

    pre = commands.add_parser("pretrain", help="self-supervised pretraining of the ResNet-50 (SimCLR)",
                              description="SimCLR (lightly's NT-Xent loss and projection head) on the cache's "
                                          "training films only; writes OUT/backbone.pt for `train --pretrained`. "
                                          "Resumes from OUT/last_pretrain.pt.")
    pre.add_argument("--cache", required=True, help="folder written by `data prepare`")
    pre.add_argument("--out", required=True, type=Path)
    pre.add_argument("--image-size", type=int, help="view size in pixels (default 96)")
    pre.add_argument("--epochs", type=int, help="default 3")
    pre.add_argument("--batch-size", type=int, help="films per batch (two views each; default 64)")
    pre.add_argument("--seed", type=int)
    pre.add_argument("--max-steps", type=int, help="at most this many steps per epoch (smoke runs)")
    pre.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    pre.set_defaults(func=cmd_pretrain)

    lungs = commands.add_parser("lungs", help="the lung segmentation model").add_subparsers(dest="lungs_command",
                                                                                          required=True)
    lt = lungs.add_parser("train", help="train the lung U-Net on frontal films with lung masks",
                          description="Train MONAI's 2-D U-Net on images/ + masks/ + sources.csv (split by "
                                      "patient), report the test patients' Dice, export lung.onnx + lung.json: "
                                      "the folder a bundle carries (evaluate --lung-model, data prepare "
                                      "--lung-model).")
    lt.add_argument("--data", default="../shared/data/lung_masks_256", help="folder with images/, masks/ and "
                                                                              "sources.csv")
    lt.add_argument("--out", required=True, type=Path, help="output folder (lung.onnx, lung.json)")
    lt.add_argument("--epochs", type=int)
    lt.add_argument("--size", type=int, help="segmentation input side in pixels (default 128)")
    lt.add_argument("--batch-size", type=int)
    lt.add_argument("--seed", type=int)
    lt.add_argument("--limit", type=int, help="first N image/mask pairs only (smoke runs)")
    lt.add_argument("--finish", action="store_true", help="train no further: score and export the best weights "
                                                          "so far (OUT/lung.pt) of a run that was stopped")
    lt.set_defaults(func=cmd_lungs_train)

    for plugin in sorted(entry_points(group="pneumoscope.commands"), key=lambda e: e.name):
        try:
            add_commands = plugin.load()
        except ModuleNotFoundError as exc:
            # Each image installs one part (the web image has no pipelines/): its commands are absent.
            if exc.name != plugin.module.partition(".")[0]:
                raise
            continue
        add_commands(commands)
    return parser


def handler_of(*words: str):
    """The function behind ``pneumoscope WORDS...``, as the plugins registered it. One package hands a
    command over to another's this way, without importing it: ``serve --traffic-split`` runs
    ``rollout serve-local`` (serving sits below rollout, which builds on it)."""
    parser = build_parser()
    for word in words:
        commands = parser.subcommands.choices if parser.subcommands else {}
        if word not in commands:
            raise CommandError(f"`pneumoscope {' '.join(words)}` is not installed here (its package is missing)")
        parser = commands[word]
    return parser.get_default("func")


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """``parser``: another command tree run with the same error handling (``python -m gateway`` runs its one
    command this way, without the entry points an installed package registers)."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("pneumoscope: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        log.debug("details", exc_info=True)
        message = str(exc).strip() or exc.__class__.__name__
        print(f"pneumoscope: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # `python -m model.cli` runs this file as __main__; the commands raise model.cli.CommandError, which
    # only the imported module's main() catches.
    from model.cli import main as _main

    sys.exit(_main())
