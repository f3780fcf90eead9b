"""The ``proxnets`` command line."""

from __future__ import annotations

import json
import os

# Before torch loads its OpenMP runtime: idle OpenMP threads must sleep rather than spin, or on a
# shared machine they steal the cores the working threads need (measured: a small CapsNet step
# 30x slower with spinning threads under load). The user's own value is kept for `proxnets info`.
_USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY", "")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import shlex
import subprocess
import sys
from pathlib import Path

import click

from proxnets import __version__

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _parse_options(pairs: tuple[str, ...]) -> dict:
    """``key=value`` pairs; values parsed as JSON when possible (numbers, booleans, lists)."""
    out = {}
    for p in pairs:
        if "=" not in p:
            raise click.BadParameter(f"expected key=value, got {p!r}", param_hint="--option")
        k, v = p.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return first or type(e).__name__


class _Main(click.Group):
    """The command group: an exception escaping a command is one line on stderr, exit code 1.

    ``--debug`` (or ``PROXNETS_DEBUG=1``) shows the traceback instead. User mistakes (bad values,
    missing or unwritable files, a run directory that does not fit) read as their message; anything
    else is named an internal error.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            if ctx.params.get("debug") or os.environ.get("PROXNETS_DEBUG"):
                raise
            from proxnets.engine.distributed import collective_failure

            ddp = collective_failure(e) if isinstance(e, RuntimeError) else None
            if ddp is not None:
                raise click.ClickException(ddp) from None
            if isinstance(e, (ValueError, TypeError, OSError, FloatingPointError, RuntimeError)):
                raise click.ClickException(_one_line(e)) from None
            raise click.ClickException(f"internal error {type(e).__name__}: {_one_line(e)} "
                                       f"(rerun with --debug for the traceback)") from None


@click.group(cls=_Main, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="proxnets")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error (default: one line).")
def main(debug: bool) -> None:
    """proxnets: deep learning read as optimization.

    Five methods -- capsule routing (000), convexified CNNs and their dual (001), PMP/bSQH training
    (002), optimization-induced equilibrium nets (003), stable non-expansive nets (004) -- each
    reporting an optimization certificate that the library checks.

    Start with `proxnets reproduce --quick` (the README's run command) or `proxnets info`.
    """


@main.command(context_settings=CONTEXT)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory searched for full datasets (default $PROXNETS_DATA or ~/.cache/proxnets/data).")
def info(data_dir: Path | None) -> None:
    """Version, device, threads, datasets found, experiment suites and models available."""
    import torch

    from proxnets.data.registry import BASES, default_data_dir
    from proxnets.engine.device import select_device
    from proxnets.report.registry import available_suites
    from proxnets.utils.threads import available_cores, thread_warnings

    data_dir = data_dir or default_data_dir()
    click.echo(f"proxnets {__version__}  torch {torch.__version__}  python {sys.version.split()[0]}")
    click.echo(f"device: {select_device('auto')}  (cuda available: {torch.cuda.is_available()})  "
               f"threads: {torch.get_num_threads()} on {available_cores()} core(s)")
    # what a script of the user's would get: their environment, not the one this CLI set for itself
    for w in thread_warnings({**os.environ, "OMP_WAIT_POLICY": _USER_OMP_WAIT_POLICY}):
        click.echo(f"warning: {w}")
    click.echo(f"data dir: {data_dir}")
    for name, kind in BASES.items():
        if kind == "embedded":
            status = "embedded (always available)"
        else:
            folder = data_dir / name
            present = folder.is_dir() and any(folder.iterdir())
            status = f"files {'found' if present else 'missing'} in {folder}"
        click.echo(f"  {name:<14} {status}")
    click.echo("  variants: <base>-rot, -rand, -img, -img-rot of mnist5k / mnist / fashion-mnist")
    click.echo(f"suites: {', '.join(available_suites()) or '(none)'}")
    try:
        from proxnets.models import model_registry

        click.echo(f"models: {', '.join(sorted(model_registry())) or '(none)'}")
    except Exception as e:  # a broken method package must not hide the rest of info
        click.echo(f"models: unavailable ({e})")


@main.command(context_settings=CONTEXT)
@click.argument("methods", nargs=-1)
@click.option("--smoke", "size", flag_value="smoke", help="Seconds per suite (CI).")
@click.option("--quick", "size", flag_value="quick", default=True, help="Embedded data, <= 15 min on 2 CPU cores (default).")
@click.option("--full", "size", flag_value="full", help="Full datasets and the papers' sizes (GPU).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Directory of full datasets.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/reproduce", show_default=True,
              help="Run directory; an interrupted run resumes here.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda[:i] or mps.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Replay a run from its config.toml (other options are then ignored).")
@click.option("--fresh", is_flag=True, help="Re-run every suite even if the run directory has results.")
def reproduce(methods, size, data_dir, out, device, seed, config_path, fresh) -> None:
    """Check every seed's claims and write report.html + results.json.

    METHODS: any of capsules, convex, pmp, opteq, stable (default: all).
    """
    from proxnets.report.runner import ReproduceConfig, load_config, reproduce as run, summary_lines

    try:
        if config_path:
            cfg = load_config(config_path)
        else:
            kwargs = {"methods": list(methods)} if methods else {}
            cfg = ReproduceConfig(size=size, seed=seed, device=device, data_dir=data_dir, out=out, **kwargs)
        results, report = run(cfg, command="proxnets " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                              fresh=fresh, log=lambda m: click.echo(m, err=True))
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    for line in summary_lines(results, report):
        click.echo(line)
    if results["summary"]["suites_failed"]:
        sys.exit(1)


@main.command(context_settings=CONTEXT)
@click.option("--model", "model_name", required=True, help="Model name (see `proxnets info`).")
@click.option("--dataset", default="mnist5k", show_default=True, help="Dataset name (see `proxnets info`).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@click.option("--epochs", type=int, default=None, help="Override the model's default.")
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None, help="Learning rate (models with their own optimizer, e.g. bSQH: use -o).")
@click.option("--device", default=None, help="auto, cpu, cuda[:i], mps.")
@click.option("--seed", type=int, default=None)
@click.option("--checkpoint-every", type=int, default=None, help="Steps between checkpoints (epoch ends always).")
@click.option("--option", "-o", "options", multiple=True, help="Model option key=value (repeatable).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Run directory.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out (refuses changed settings).")
@click.option("--force", is_flag=True, help="Overwrite a run in --out, or --resume with changed settings.")
@click.option("--ddp-timeout", type=float, default=None,
              help="Seconds a rank waits for the others under torchrun before failing (default 300).")
def train(model_name, dataset, data_dir, epochs, batch_size, lr, device, seed, checkpoint_every, options, out, resume,
          force, ddp_timeout) -> None:
    """Train a named model; config.json, metrics.jsonl and checkpoint.pt (the weights) go to --out.

    Works under `torchrun --nproc_per_node=N` for multi-process data parallel training.
    """
    import dataclasses

    from proxnets.data import load_dataset
    from proxnets.engine import TrainConfig, fit, seed_everything, select_device
    from proxnets.engine.rundir import RunDir, TrainingFailed
    from proxnets.utils.convergence import NonConvergenceError

    opts = _parse_options(options)
    if device is not None:
        select_device(device)  # an unknown or absent device fails before any data is loaded
    run = RunDir(Path(out), model={"name": model_name, "options": opts}, dataset=dataset, force=force)
    run.preflight(resume)
    ds = load_dataset(dataset, data_dir=data_dir)
    # seeded before the model is built: its initial weights are part of the run
    seed_everything(seed if seed is not None else TrainConfig.seed)
    trainable = _build_trainable(model_name, ds.input_shape, ds.num_classes, opts)
    if lr is not None and trainable.optimizer is not None:
        raise click.UsageError(f"--lr: expected no value for {model_name!r}, got {lr} (its own optimizer sets the "
                               f"step; set its options with -o)")
    overrides = {k: v for k, v in dict(epochs=epochs, batch_size=batch_size, lr=lr, device=device, seed=seed,
                                        checkpoint_every=checkpoint_every, ddp_timeout=ddp_timeout).items()
                 if v is not None}
    cfg = dataclasses.replace(trainable.config, **overrides)
    run.model = {"name": model_name, "options": opts, "input_shape": list(ds.input_shape),
                 "num_classes": ds.num_classes}
    run.dataset = dataset
    try:
        result = fit(trainable.model, ds, cfg, loss_fn=trainable.loss_fn, predict_fn=trainable.predict_fn,
                     optimizer=trainable.optimizer, augment=trainable.augment, run_dir=run, resume=resume,
                     log=click.echo)
    except (TrainingFailed, FloatingPointError, NonConvergenceError) as e:
        raise click.ClickException(f"training failed: {_one_line(e)}; {run.checkpoint_note()}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        acc = result.final.get("test_acc")
        click.echo(f"run saved in {out} (config.json, metrics.jsonl, checkpoint.pt)"
                   + (f"; test accuracy {acc:.4f}" if acc is not None else ""))


def _option_keys(factory, input_shape, num_classes) -> list[str]:
    """The ``-o`` keys a model factory takes: its keyword parameters and, behind ``**options``, the fields
    of the model's config dataclass and the parameters of its optimizer (found by building it bare)."""
    import dataclasses
    import inspect

    params = list(inspect.signature(factory).parameters.values())[2:]
    keys = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        try:
            bare = factory(tuple(input_shape), num_classes)
            config = getattr(bare.model, "config", None)
            if dataclasses.is_dataclass(config) and not isinstance(config, type):
                keys |= {f.name for f in dataclasses.fields(config)}
            if bare.optimizer is not None:
                opt = bare.optimizer(bare.model.parameters())
                keys |= set(list(inspect.signature(type(opt).__init__).parameters)[2:])
        except Exception:  # listing the keys must not hide the user's mistake behind another error
            pass
    return sorted(keys - {"input_shape", "num_classes"})


def _build_trainable(name: str, input_shape, num_classes: int, opts: dict):
    """Build a named model and its optimizer once, so a wrong ``-o`` fails here in one line."""
    import re

    from proxnets.models import build_model, model_registry

    try:
        trainable = build_model(name, input_shape, num_classes, **opts)
        if trainable.optimizer is not None:  # options reach the optimizer only when it is built
            trainable.optimizer(trainable.model.parameters())
    except TypeError as e:
        bad = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if bad is None:
            raise
        keys = _option_keys(model_registry()[name], input_shape, num_classes)
        raise click.UsageError(f"-o {bad.group(1)}: expected a key among {keys} for {name!r}, got {bad.group(1)!r}") \
            from None
    return trainable


@main.command("eval", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--dataset", default=None, help="Dataset (default: the one it was trained on).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
def evaluate_cmd(run_dir: Path, dataset, data_dir) -> None:
    """Evaluate a model trained by `proxnets train` (accuracy and its certificate, if any)."""
    from proxnets.data import load_dataset
    from proxnets.engine import evaluate
    from proxnets.engine.rundir import RunDir
    from proxnets.models import build_model

    run = RunDir(run_dir)
    model, trained_on = run.identity()
    weights = run.load_weights()
    ds = load_dataset(dataset or trained_on, data_dir=data_dir)
    trainable = build_model(model["name"], tuple(model["input_shape"]), model["num_classes"], **model["options"])
    trainable.model.load_state_dict(weights)
    acc = evaluate(trainable.model, ds.x_test, ds.y_test, trainable.predict_fn)
    click.echo(f"{model['name']} on {ds.name} test ({len(ds.x_test)} images): accuracy {acc:.4f}")
    if trainable.certificate is None:
        raise click.ClickException(f"model {model['name']!r} has no certificate (every named model must have one)")
    for cert in trainable.certificate(trainable.model, ds.x_test[:256]):
        click.echo(f"  certificate {cert.line()}")


def _bench_dir() -> Path:
    for base in (Path.cwd(), *Path.cwd().parents, Path(__file__).resolve().parents[2]):
        if (base / "benchmarks").is_dir() and any((base / "benchmarks").glob("bench_*.py")):
            return base / "benchmarks"
    raise click.ClickException("benchmarks/ not found: run `proxnets bench` from a proxnets source checkout")


@main.command(context_settings=CONTEXT)
@click.argument("names", nargs=-1)
@click.option("--quick", is_flag=True, help="Fewer repeats and sizes.")
def bench(names, quick) -> None:
    """Run benchmarks/bench_<NAME>.py (all by default): ours vs the usual baseline, in one run, with ratios."""
    folder = _bench_dir()
    scripts = {p.stem.removeprefix("bench_"): p for p in sorted(folder.glob("bench_*.py"))}
    chosen = list(names) or list(scripts)
    unknown = [n for n in chosen if n not in scripts]
    if unknown:
        raise click.ClickException(f"names: expected benchmarks among {sorted(scripts)}, got {unknown}")
    failed = 0
    for n in chosen:
        click.echo(f"== bench {n} ==")
        failed += subprocess.call([sys.executable, str(scripts[n])] + (["--quick"] if quick else [])) != 0
    if failed:
        sys.exit(1)


_DENOISER_HELP = ("Denoiser checkpoint written by proxnets.stable.save_denoiser. Default: the one `proxnets reproduce "
                  "stable` leaves at runs/reproduce/stable/averaged_denoiser.pt; without it, pass --train.")
_TRAIN_HELP = ("Train a small averaged denoiser now on the embedded photographs (about 30 s on CPU, with progress) "
               "instead of loading one; --save-model keeps it.")


def _denoiser_for(model_path, train, save_model, firm: bool = False):
    """The denoiser a restoration command uses: trained now (``--train``), loaded, or the default checkpoint."""
    from proxnets.stable.restore import resolve_denoiser, save_denoiser, train_denoiser

    if train and model_path:
        raise click.UsageError("--train and --model: expected one of them, got both")
    if not train:
        return resolve_denoiser(model_path)
    click.echo(f"training a small {'firmly non-expansive (Heun)' if firm else 'averaged'} denoiser on the embedded photographs ...", err=True)
    model = train_denoiser(firm=firm, log=lambda m: click.echo(m, err=True))
    click.echo(f"certified averagedness alpha = {model.averagedness():.4g}", err=True)
    if save_model:
        click.echo(f"saved {save_denoiser(save_model, model)}", err=True)
    return model


def _summary_line(out: dict) -> str:
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items() if not isinstance(v, (list, dict)))


@main.command(context_settings=CONTEXT)
@click.argument("image_in", type=click.Path(dir_okay=False))
@click.argument("image_out", type=click.Path(dir_okay=False))
@click.option("--model", "model_path", default=None, type=click.Path(dir_okay=False), help=_DENOISER_HELP)
@click.option("--train", is_flag=True, help=_TRAIN_HELP)
@click.option("--save-model", type=click.Path(dir_okay=False), default=None, help="With --train: write the trained denoiser here.")
@click.option("--strength", type=float, default=1.0, show_default=True,
              help="theta in (0, 1]: output (1 - theta) y + theta D(y). Grey models denoise colour images channel by channel.")
@click.option("--add-noise", type=float, default=None,
              help="Corrupt the (clean) input with Gaussian noise of this sigma first and report PSNR/SSIM.")
@click.option("--seed", type=int, default=0, show_default=True)
def denoise(image_in, image_out, model_path, train, save_model, strength, add_noise, seed) -> None:
    """Denoise a PNG (grey or RGB) with a trained averaged, non-expansive denoiser."""
    from proxnets.stable.restore import denoise_image

    try:
        model = _denoiser_for(model_path, train, save_model)
        out = denoise_image(image_in, model, image_out, add_noise=add_noise, strength=strength, seed=seed)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(_summary_line(out))
    click.echo(f"written {image_out}")


@main.command(context_settings=CONTEXT)
@click.argument("image_in", type=click.Path(dir_okay=False))
@click.argument("image_out", type=click.Path(dir_okay=False))
@click.option("--model", "model_path", default=None, type=click.Path(dir_okay=False), help=_DENOISER_HELP)
@click.option("--train", is_flag=True, help=_TRAIN_HELP + " With --algorithm drs/admm it trains the firmly non-expansive one.")
@click.option("--save-model", type=click.Path(dir_okay=False), default=None, help="With --train: write the trained denoiser here.")
@click.option("--strength", type=float, default=0.05, show_default=True,
              help="theta in (0, 1]: PnP uses (1 - theta) I + theta D (small: it is applied at every iteration; the default "
                   "improves PSNR on the embedded test photographs, docs/stable.md).")
@click.option("--kernel", type=click.Choice(["gaussian", "motion"]), default="gaussian", show_default=True)
@click.option("--kernel-size", type=int, default=9, show_default=True)
@click.option("--kernel-sigma", type=float, default=1.6, show_default=True, help="Gaussian kernel width.")
@click.option("--angle", type=float, default=0.0, show_default=True, help="Motion kernel angle (degrees).")
@click.option("--boundary", type=click.Choice(["circular", "valid"]), default="circular", show_default=True)
@click.option("--algorithm", type=click.Choice(["fbs", "drs", "admm"]), default="fbs", show_default=True)
@click.option("--max-iter", type=int, default=100, show_default=True)
@click.option("--tol", type=float, default=1e-4, show_default=True, help="Stop when the fixed-point residual is below.")
@click.option("--simulate", is_flag=True, help="Treat the input as clean: blur it, add --noise, then restore and report PSNR.")
@click.option("--noise", type=float, default=0.01, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def deblur(image_in, image_out, model_path, train, save_model, strength, kernel, kernel_size, kernel_sigma, angle, boundary,
           algorithm, max_iter, tol, simulate, noise, seed) -> None:
    """Deblur a PNG (grey or RGB) by Plug-and-Play with a trained denoiser (reports the fixed-point residual)."""
    from proxnets.stable.restore import deblur_image

    try:
        model = _denoiser_for(model_path, train, save_model, firm=algorithm != "fbs")
        out = deblur_image(image_in, model, image_out, kernel=kernel, kernel_size=kernel_size, strength=strength,
                           kernel_sigma=kernel_sigma, angle=angle, boundary=boundary, algorithm=algorithm,
                           max_iter=max_iter, tol=tol, simulate=simulate, noise=noise, seed=seed)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(_summary_line(out))
    click.echo(f"written {image_out}")


@main.command(context_settings=CONTEXT)
@click.argument("name")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
def download(name, data_dir) -> None:
    """Download a full dataset (mnist, fashion-mnist, cifar10) and verify its checksums."""
    from proxnets.data.files import download_dataset
    from proxnets.data.registry import default_data_dir

    try:
        folder = download_dataset(name, Path(data_dir) if data_dir else default_data_dir())
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{name}: files verified in {folder}")


if __name__ == "__main__":
    main()
