"""``uld train --method NAME``: one command for every trainable landmark method.

The command parses one set of options (dataset, backbone, K, rounds, steps,
learning rate, run id / resume, feature-store options, ...) and hands them to
the *runner* registered under ``--method``. ``uld duld`` (flows/cli_duld.py) is an
alias of ``uld train --method duld`` built by :func:`alias_command` from the
same option declarations (the alias's signature is the train command's minus
the method-only options), so the two can never drift apart.

Adding a method
---------------
Write a runner that takes a :class:`TrainRequest` and returns the per-round
table (a ``DataFrame`` with ``attrs["run_id"]``) or ``None``, and register it::

    # flows/cli_mymethod.py
    from flows.cli_train import TrainRequest, register_method

    @register_method("mymethod", "One line for --help.", own_options=("m",))
    def run_mymethod(req: TrainRequest):
        from flows.mymethod import train   # heavy imports inside the runner
        return train(req.option("dataset"), k=req.option("k"), home=req.settings.home, **req.params_as(int, "steps"))

then add the module's name to :data:`METHOD_MODULES` (imported before the
command runs, so registration happens on import). ``own_options`` names the
method-only options (default ``None``) the method reads; giving one of them
to a method that does not declare it is an error instead of being ignored.
Settings no option covers go through ``--param KEY=VALUE`` (repeatable),
read with :meth:`TrainRequest.param`; a key no runner reads is reported.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import typer

from flows.cli_options import Box, CropMargin, DaskAddress, DaskWorkers, Layers, Protocol, ReduceChannels, Size, Timesteps, eval_options, feature_spec
from pipeline.errors import ConfigError
from pipeline.settings import Settings

# Modules whose import registers more methods (each calls register_method at import time).
METHOD_MODULES: tuple[str, ...] = ("flows.cli_condgen", "flows.cli_stablekeypoints")

# Options of `uld train` that only some methods read; their default is None ("not given").
# METHOD_PARAMS are the method settings among them (the engine records them in the run's config:
# part of what --resume must match); the Dask options only say where the rounds are computed.
METHOD_PARAMS = ("m", "steps", "q", "proxy_steps", "duld_rounds", "tsc_loss")
METHOD_ONLY_OPTIONS = (*METHOD_PARAMS, "dask_address", "dask_workers")

Runner = Callable[["TrainRequest"], Any]


@dataclass(frozen=True)
class TrainMethod:
    """One registered method: its runner and the method-only options it reads."""

    name: str
    summary: str
    run: Runner
    own_options: frozenset[str] = frozenset()


METHODS: dict[str, TrainMethod] = {}


def register_method(name: str, summary: str, own_options: tuple[str, ...] = ()) -> Callable[[Runner], Runner]:
    """Decorator: make ``runner`` available as ``uld train --method name``."""
    unknown = set(own_options) - set(METHOD_ONLY_OPTIONS)
    if unknown:
        raise ValueError(f"method {name!r} declares unknown method-only options {sorted(unknown)}; add them to METHOD_ONLY_OPTIONS")

    def deco(runner: Runner) -> Runner:
        if name in METHODS and METHODS[name].run is not runner:
            raise ValueError(f"method {name!r} is registered twice")
        METHODS[name] = TrainMethod(name, summary, runner, frozenset(own_options))
        return runner

    return deco


def load_methods() -> dict[str, TrainMethod]:
    """Import :data:`METHOD_MODULES` (registering their methods) and return the registry."""
    import importlib

    for module in METHOD_MODULES:
        importlib.import_module(module)
    return METHODS


@dataclass(frozen=True)
class TrainRequest:
    """What a runner gets: the method, the global settings, every option of the command, ``--param`` pairs."""

    method: str
    settings: Settings
    options: Mapping[str, Any]
    params: Mapping[str, str] = field(default_factory=dict)

    def option(self, name: str) -> Any:
        """The value of option ``name`` (the command's parameter name, e.g. ``steps_per_round``)."""
        return self.options[name]

    def param(self, key: str, cast: Callable[[str], Any] = str, default: Any = None) -> Any:
        """``--param key=value`` converted with ``cast``; ``default`` when not given."""
        if key not in self.params:
            return default
        try:
            return cast(self.params[key])
        except ValueError:
            raise ConfigError(f"--param {key}={self.params[key]!r} is not a valid {getattr(cast, '__name__', 'value')}",
                              where="--param", fix=f"e.g. --param {key}=<{getattr(cast, '__name__', 'value')}>") from None


def parse_params(pairs: list[str] | None) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``; a clear error for anything else."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param expects KEY=VALUE, got {pair!r}", where="--param", fix="e.g. --param steps=500")
        out[key.strip()] = value.strip()
    return out


def method_names() -> str:
    return ", ".join(sorted(METHODS)) or "(none registered)"


def run_method(ctx: typer.Context, method: str, options: dict[str, Any]) -> None:
    """Look ``method`` up, check its method-only options, run it and print its table."""
    from flows.cli import settings

    methods = load_methods()
    if method not in methods:
        raise ConfigError(f"unknown method {method!r}", where="--method", fix=f"choose one of: {method_names()}")
    entry = methods[method]
    for name in METHOD_ONLY_OPTIONS:
        if options.get(name) is not None and name not in entry.own_options:
            users = sorted(m for m, e in methods.items() if name in e.own_options)
            raise ConfigError(f"--{name.replace('_', '-')} does not apply to --method {method}", where=f"--{name.replace('_', '-')}",
                              fix=f"drop it (it is read by: {', '.join(users) or 'no method'})")
    params = parse_params(options.pop("param", None))
    s = settings(ctx)
    if s.runs_url is not None and options.get("run_id") is None and not options.get("resume"):
        from flows.results import new_run_id

        options["run_id"] = new_run_id(method)  # the copy at --runs-url needs the id before the run starts
    request = TrainRequest(method=method, settings=s, options=options, params=params)
    t0 = time.perf_counter()
    from flows.run_mirror import mirrored_run

    with mirrored_run(s.home, options.get("run_id"), s.runs_url, bool(options.get("resume"))):
        table = entry.run(request)
    if table is not None:
        from flows.summary import print_summary

        # The summary every method command prints (same columns as `uld zeroshot`), one row per round.
        rid = table.attrs.get("run_id", options.get("run_id"))
        typer.echo(f"\n{method} per-round NME (%), test split:")
        print_summary(request.settings.home, str(rid))
    typer.echo(f"time: {time.perf_counter() - t0:.1f} s")


# ----------------------------------------------------------------------------- the options, once
def train_cmd(
    ctx: typer.Context,
    method: str = typer.Option(..., "--method", help="Which method to train (see `uld train --help` for the registered ones)."),
    dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset with manifests and cached features in the workspace."),
    backbone: str = typer.Option("shipped", "--backbone", "-b", help="Backbone the features were extracted with (as given to `uld features`)."),
    k: int = typer.Option(10, "-k", "--k", help="Number of landmarks K (the clusters the evaluation reads out)."),
    m: Optional[int] = typer.Option(None, "--m", help="mallis-d: over-clustering into M >> K training clusters (default 100, Mallis et al.)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="jakab, c3, stablekeypoints: optimisation steps (default 300; the papers train for many epochs on GPUs)."),
    q: Optional[int] = typer.Option(None, "--q", help="duld++: pose clusters Q of the two-stage clustering (default 5; paper: 10)."),
    proxy_steps: Optional[int] = typer.Option(None, "--proxy-steps", help="duld++: steps of the pose-guided proxy task stage (default: --steps-per-round; paper: 50k)."),
    duld_rounds: Optional[int] = typer.Option(None, "--duld-rounds", help="duld++: D-ULD rounds before the proxy stage (default 2); --rounds then counts the D-ULD++ (TSC) rounds."),
    tsc_loss: Optional[str] = typer.Option(None, "--tsc-loss", help="duld++: the TSC rounds' VAE loss, eq3 (default: Eq. 3 on the encoder, decoder dropped) or elbo (the full VAE with its ELBO: the paper's Table 2 ablation)."),
    rounds: int = typer.Option(3, "--rounds", help="Self-training rounds (each: keypoints -> pseudo-labels -> training -> evaluation)."),
    steps_per_round: int = typer.Option(150, "--steps-per-round", help="Optimisation steps per round (paper: 5000; re-cluster after each round)."),
    bootstrap_steps: int = typer.Option(300, "--bootstrap-steps", help="Self-supervised bootstrapping steps before round 1 (paper: 50000)."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate (paper: 1e-4 over 150k steps; larger for short CPU runs)."),
    batch_size: int = typer.Option(12, "--batch-size", help="Crops per optimisation step (paper: 12)."),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Heatmap/descriptor map size; default crop/4 (at most the largest cached map)."),
    channels: int = typer.Option(64, "--channels", help="Aggregator bottleneck channels (paper: 384)."),
    descriptor_dim: int = typer.Option(32, "--descriptor-dim", help="Descriptor dimension D."),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Run folder name under runs/; default: a fresh <method>-<time>-<hash>."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run --run-id from its last finished round (same options required)."),
    timesteps: Timesteps = None,
    layers: Layers = None,
    size: Size = 64,
    crop_margin: CropMargin = 0.15,
    reduce_channels: ReduceChannels = None,
    store: Optional[str] = typer.Option(None, "--store", help="Read this feature store folder directly (e.g. the demo's) instead of finding it from --backbone and the feature options."),
    roi: bool = typer.Option(True, "--roi/--no-roi", help="Keep keypoints inside each image's object box (as ZeroShot samples only RoI pixels)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    n_views: int = typer.Option(2, "--views", help="Augmented views per training image for bootstrapping (their features are extracted once, next to the feature store); 0 = warp the cached maps instead (the old shortcut, for comparison)."),
    flip: bool = typer.Option(False, "--flip/--no-flip", help="Mirror half of the views. Off by default: on near-frontal faces matching a crop to its mirror teaches left = right (MTFL Hungarian 0.33 -> 0.13); on heads turning through large yaw inside the crop it helps (synthetic 0.45 -> 0.65)."),
    colour_jitter: float = typer.Option(0.0, "--colour-jitter", help="Brightness/contrast/saturation jitter strength of the views (factors in [1-j, 1+j]; 0 = none)."),
    view_seed: Optional[int] = typer.Option(None, "--view-seed", help="Seed of the augmented views (part of the view store's name); default: the global --seed."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Detector gate: keep heatmap maxima above this sigmoid score (default: the method's)."),
    relative_threshold: Optional[float] = typer.Option(None, "--relative-threshold", help="Detector gate: keep maxima of at least this fraction of the image's strongest one (default: the method's)."),
    nms_radius: Optional[int] = typer.Option(None, "--nms-radius", help="Detector: a keypoint must be the maximum of its (2r+1)^2 cells; 0 = every cell is a candidate (SiLK's dense keypoints). Default: the method's."),
    cluster_nms_radius: Optional[int] = typer.Option(None, "--cluster-nms-radius", help="Pseudo-labels: fit the k-means on the keypoints that are maxima of their (2r+1)^2 cells only (each part about once per image), then assign among all keypoints; 0 = fit on every keypoint. Default: the method's."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Detector: at most this many keypoints per image (the strongest). Default: the method's."),
    dask_address: DaskAddress = None,
    dask_workers: DaskWorkers = None,
    threads: int = typer.Option(1, "--threads", help="torch CPU threads. 1 is fastest on a shared 2-core machine (more threads oversubscribe); raise it on an idle multi-core one."),
    protocol: Protocol = "paper",
    box: Box = "landmarks",
    param: Optional[list[str]] = typer.Option(None, "--param", help="Method-specific setting KEY=VALUE (repeatable) for settings no option covers."),
) -> None:
    """Train a landmark method and print its per-round NME (forward / backward, test split).

    Feature-head methods (duld, mallis-d) need `uld features` for the dataset
    first; round 0 is the bootstrapped model, rounds 1..R self-training rounds.
    Everything lands in runs/<run>/ (config.json records the method); an
    interrupted run continues with --run-id <id> --resume.
    """
    options = {name: value for name, value in locals().items() if name not in ("ctx", "method")}
    run_method(ctx, method, options)


def alias_command(method: str, doc: str) -> Callable[..., None]:
    """A command that runs :func:`train_cmd` with ``--method method``: the same option
    declarations (its signature is ``train_cmd``'s), minus ``--method``, ``--param`` and the
    method-only options the method does not read."""
    load_methods()
    if method not in METHODS:
        raise ValueError(f"no method {method!r} registered")
    hidden = {"method", "param", *METHOD_ONLY_OPTIONS} - set(METHODS[method].own_options)
    sig = inspect.signature(train_cmd, eval_str=True)

    def alias_cmd(ctx: typer.Context, **options: Any) -> None:
        for name in hidden - {"method"}:
            options.setdefault(name, None)
        run_method(ctx, method, options)

    # typer reads the parameters from __signature__ (inspect.signature honours it)
    alias_cmd.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if p.name not in hidden])  # type: ignore[attr-defined]
    alias_cmd.__doc__ = doc
    return alias_cmd


def register(app: typer.Typer) -> None:
    """Add ``uld train`` to the ``uld`` app (``uld duld``, its alias, lives in flows.cli_duld)."""
    load_methods()
    listing = "\n\n".join(f"{e.name}: {e.summary}" for e in sorted(METHODS.values(), key=lambda e: e.name))
    app.command("train", help=f"{inspect.cleandoc(train_cmd.__doc__ or '')}\n\nMethods:\n\n{listing}")(train_cmd)


# ----------------------------------------------------------------------------- feature-head methods
def run_feature_heads(req: TrainRequest) -> Any:
    """The self-training engine (flows.duld.duld) with this request's options; ``req.method`` picks the
    pseudo-labeller there (flows.duld.ENGINE_METHODS)."""
    from flows.duld import duld
    from pipeline.datasets.augment_views import ViewAugmentConfig
    from pipeline.settings import resolve_device

    o, s = req.options, req.settings
    if resolve_device(s.device) != "cpu":
        typer.echo("note: the heads train on the CPU in this version; --device is used only to extract the augmented views")
    spec = feature_spec(o["size"], o["timesteps"], o["layers"], o["crop_margin"], o["reduce_channels"], s.seed, backbone=o["backbone"], home=s.home)
    views = None
    if o["n_views"] > 0:
        views = ViewAugmentConfig(n_views=o["n_views"], flip=o["flip"], colour_jitter=o["colour_jitter"], seed=s.seed if o["view_seed"] is None else o["view_seed"])
    return duld(
        o["dataset"], o["backbone"], spec, k=o["k"], rounds=o["rounds"], steps_per_round=o["steps_per_round"], bootstrap_steps=o["bootstrap_steps"],
        lr=o["lr"], batch_size=o["batch_size"], home=s.home, seed=s.seed, run_id=o["run_id"], resume=o["resume"], resolution=o["resolution"],
        channels=o["channels"], descriptor_dim=o["descriptor_dim"], progress=o["progress"], threads=o["threads"], roi=o["roi"], device=s.device,
        views=views, threshold=o["threshold"], relative_threshold=o["relative_threshold"],
        nms_radius=o.get("nms_radius"), top_k=o.get("top_k"), cluster_nms_radius=o.get("cluster_nms_radius"), store_path=o["store"],
        method=req.method, method_params={name: o[name] for name in METHOD_PARAMS if o.get(name) is not None}, runs_url=s.runs_url,
        evaluation=eval_options(o.get("protocol") or "paper", o.get("box") or "landmarks"),
        dask_address=o.get("dask_address"), dask_workers=o.get("dask_workers"),
    )


ENGINE_OPTIONS = ("dask_address", "dask_workers")  # read by every engine method
register_method("duld", "D-ULD (paper 001, Sec 3.2): bootstrapped heads on cached features, k-means (K) pseudo-labels per round.",
                own_options=ENGINE_OPTIONS)(run_feature_heads)
register_method("mallis-d", "Mallis (D) (paper 001, Table 1): the same engine, K clusters over-clustered into --m (default 100) training labels.",
                own_options=("m", *ENGINE_OPTIONS))(run_feature_heads)
register_method("duld++", "D-ULD++ (paper 001, Sec 3.3): the engine's D-ULD rounds (--duld-rounds), a pose-guided proxy task "
                "(pose VAE + ELBO, --proxy-steps), then --rounds rounds of two-stage clustering (--q pose clusters x K) with Eq. 3.",
                own_options=("q", "proxy_steps", "duld_rounds", "tsc_loss", *ENGINE_OPTIONS))(run_feature_heads)
