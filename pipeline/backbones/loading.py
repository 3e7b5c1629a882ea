"""Turn a backbone spec string into a loaded :class:`DiffusionBackbone`.

A spec is one of:

- ``"shipped"``: the small category DDPM committed in ``pipeline/assets/``;
- ``"pixels"``: no diffusion model, fixed image descriptors
  (:mod:`pipeline.backbones.pixels`), the image-only reference;
- a local directory: a DDPM (``unet/`` + ``scheduler/``, e.g. written by
  ``uld backbone train``) or a Stable Diffusion pipeline folder (``unet/``,
  ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``);
- the name of a backbone trained in the workspace (``<home>/backbones/<name>``)
  when ``home`` is given;
- a Hugging Face hub id (``owner/model``), loaded with diffusers'
  ``from_pretrained`` (needs network access or a filled local HF cache).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.backbones.base import DiffusionBackbone
from pipeline.errors import BackboneError

SHIPPED = "shipped"
PIXELS = "pixels"
SHIPPED_DIR_NAME = "ddpm-synthetic-64"


def shipped_dir() -> Path:
    """Where the committed default backbone lives (inside the installed package)."""
    return Path(__file__).resolve().parents[1] / "assets" / SHIPPED_DIR_NAME


def detect_layout(path: Path) -> str:
    """``"ddpm"`` or ``"stable-diffusion"`` for a local folder; :class:`BackboneError` otherwise."""
    path = Path(path)
    meta = path / "uld_backbone.json"
    if meta.is_file():
        kind = json.loads(meta.read_text()).get("kind")
        if kind in ("ddpm", "stable-diffusion"):
            return kind
    index = path / "model_index.json"
    if index.is_file():
        cls = str(json.loads(index.read_text()).get("_class_name", ""))
        if "StableDiffusion" in cls:
            return "stable-diffusion"
        if cls in ("DDPMPipeline", "DDIMPipeline"):
            return "ddpm"
    subdirs = {p.name for p in path.iterdir() if p.is_dir()} if path.is_dir() else set()
    if {"unet", "vae", "text_encoder", "tokenizer"} <= subdirs:
        return "stable-diffusion"
    if {"unet", "scheduler"} <= subdirs and not {"vae", "text_encoder"} & subdirs:
        return "ddpm"
    raise BackboneError(
        f"{path} is not a backbone folder I can read",
        where=str(path),
        fix=(
            "expected a DDPM (unet/ + scheduler/, as written by `uld backbone train`) or a Stable "
            "Diffusion pipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        ),
    )


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def _hub_layout(repo_id: str) -> str:
    """Read the hub repo's ``model_index.json`` to choose the class; offline -> BackboneError."""
    try:
        from huggingface_hub import hf_hub_download

        index = json.loads(Path(hf_hub_download(repo_id, "model_index.json")).read_text())
    except Exception as err:  # network, auth, missing repo: all mean "cannot get the weights"
        raise BackboneError(
            f"the weights of {repo_id!r} could not be fetched from the Hugging Face hub ({type(err).__name__})",
            where=f"backbone spec {repo_id!r}",
            fix="download the model on a machine with network access (e.g. `huggingface-cli download "
            f"{repo_id}`) and pass its local directory instead, or use --backbone shipped",
        ) from err
    cls = str(index.get("_class_name", ""))
    if "StableDiffusion" in cls:
        return "stable-diffusion"
    if "unet" in index and "scheduler" in index and "vae" not in index:
        return "ddpm"
    raise BackboneError(
        f"hub model {repo_id!r} is a {cls or 'unknown'} pipeline, not a DDPM or Stable Diffusion one",
        where=f"backbone spec {repo_id!r}",
        fix="use a Stable Diffusion 1.x/2.x id or a diffusers DDPM (UNet2DModel) id",
    )


def resolve_spec(spec: str, home: str | Path | None = None) -> tuple[str, str | Path]:
    """``(kind, source)`` for a spec: kind is ``ddpm`` / ``stable-diffusion`` / ``pixels``; source a dir or hub id."""
    if not spec:
        raise BackboneError("empty backbone spec", where="--backbone", fix="use `shipped`, `pixels`, a folder or a hub id")
    if spec == PIXELS:  # built in, like `shipped`: a folder of that name does not shadow it
        return "pixels", PIXELS
    if spec == SHIPPED:
        path = shipped_dir()
        if not (path / "uld_backbone.json").is_file():
            raise BackboneError(
                "the shipped backbone is missing from this installation",
                where=str(path),
                fix="reinstall the package (`pip install -e .`), or train one with `uld backbone train` and pass its folder",
            )
        return "ddpm", path
    if home is not None:
        from storage.layout import Workspace, check_name

        try:
            candidate = Workspace(Path(home)).backbone_dir(check_name("backbone", spec))
        except Exception:
            candidate = None
        if candidate is not None and candidate.is_dir():
            return detect_layout(candidate), candidate
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BackboneError(f"{path} is a file, not a backbone folder", where=str(path), fix="pass the model's folder")
        return detect_layout(path), path
    if _looks_like_hub_id(spec):
        return _hub_layout(spec), spec
    raise BackboneError(
        f"backbone {spec!r} not found",
        where=str(path.resolve()) if not path.is_absolute() else str(path),
        fix="pass `shipped`, `pixels`, an existing folder (DDPM or Stable Diffusion layout), the name of a backbone "
        "trained in the workspace, or a hub id like owner/model",
    )


def load_backbone(spec: str, device: str = "cpu", home: str | Path | None = None) -> DiffusionBackbone:
    """Load the backbone named by ``spec`` (see the module doc) onto ``device``."""
    kind, source = resolve_spec(spec, home)
    name = backbone_name(spec)
    if kind == "pixels":
        from pipeline.backbones.pixels import PixelFeatures

        return PixelFeatures(device=device, name=name)
    if kind == "ddpm":
        from pipeline.backbones.context_ddpm import is_context_ddpm
        from pipeline.backbones.ddpm import CategoryDDPM

        if is_context_ddpm(Path(source)):  # unet/ + scheduler/ like a DDPM, but a UNet2DConditionModel
            raise BackboneError(
                f"{source} is a context-DDPM (a UNet with cross-attention for StableKeypoints), not a feature backbone",
                where=f"backbone spec {spec!r}",
                fix="use it with `uld train --method stablekeypoints --backbone ...`; for features pass a DDPM or Stable Diffusion folder",
            )

        return CategoryDDPM.from_pretrained(source, device=device, name=name)
    from pipeline.backbones.stable_diffusion import StableDiffusionBackbone

    return StableDiffusionBackbone.from_pretrained(source, device=device, name=name)


def backbone_name(spec: str) -> str:
    """A directory-safe name for a spec: ``shipped``, the folder's name, or the hub id with '/' -> '--'."""
    from storage.layout import check_name

    if spec in (SHIPPED, PIXELS):
        return spec
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")) or "\\" in spec:
        raw = path.resolve().name if path.exists() else path.name
    else:
        raw = spec.replace("/", "--")
    safe = "".join(c if (c.isalnum() or c in "._-") else "_" for c in raw).lstrip("._-") or "backbone"
    return check_name("backbone", safe)
