"""A backbone folder's default feature spec: ``default_layers`` and ``default_timesteps``
in its ``uld_backbone.json``.

``default_layers`` has always been there (CategoryDDPM reads it; an empty
``--layers`` means these layers). ``default_timesteps`` is optional: when a
folder has it, the CLI's ``--timesteps`` default is these timesteps instead of
:class:`FeatureSpec`'s (50, 150); folders without it behave exactly as before.
``uld backbone probe --write-default`` writes both from the best probed spec.

Reading never loads weights and never goes to the network (a hub id simply
has no local defaults), so the CLI can resolve its defaults cheaply.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.backbones.base import FeatureSpec
from pipeline.errors import BackboneError, ConfigError

META_FILE = "uld_backbone.json"


def local_backbone_dir(spec: str, home: str | Path | None = None) -> Path | None:
    """The local folder ``spec`` names (``shipped``, a workspace backbone, a folder), or None (hub id, built-in, unknown)."""
    from pipeline.backbones.loading import SHIPPED, resolve_spec, shipped_dir

    if spec == SHIPPED:
        return shipped_dir()
    local = Path(spec).expanduser().is_dir()
    if home is not None and not local:
        from storage.layout import Workspace

        try:
            local = Workspace(Path(home)).backbone_dir(spec).is_dir()
        except ConfigError:  # not a valid workspace name: a path or a hub id
            local = False
    if not local:
        return None  # resolve_spec would ask the hub for an id: not here
    kind, source = resolve_spec(spec, home)
    # Built-in extractors without a folder (whatever a same-named folder holds) have no defaults file.
    return Path(source) if kind in ("ddpm", "stable-diffusion") and Path(source).is_dir() else None


def read_backbone_meta(spec: str, home: str | Path | None = None) -> dict[str, Any]:
    """The ``uld_backbone.json`` of the backbone ``spec`` names, or {} when it has none locally."""
    folder = local_backbone_dir(spec, home)
    if folder is None or not (folder / META_FILE).is_file():
        return {}
    try:
        return json.loads((folder / META_FILE).read_text())
    except json.JSONDecodeError as err:
        raise BackboneError(f"{META_FILE} is not valid JSON ({err})", where=str(folder / META_FILE),
                            fix="restore the file (e.g. from version control) or re-save the backbone") from None


def default_timesteps(spec: str | None, home: str | Path | None = None) -> tuple[int, ...]:
    """The backbone's ``default_timesteps`` when its folder records them, else FeatureSpec's default."""
    ts = read_backbone_meta(spec, home).get("default_timesteps") if spec else None
    return tuple(int(t) for t in ts) if ts else FeatureSpec().timesteps


# Settings a backbone folder may record for a landmark method (``method_defaults`` in its
# uld_backbone.json), used where the caller leaves them unset: the detector gates that decide
# which keypoints D-ULD clusters and assigns. Measured per category, like the feature spec.
METHOD_DEFAULT_KEYS = {"duld": ("nms_radius", "top_k", "cluster_nms_radius", "threshold", "relative_threshold")}
# Methods that read another method's entry. D-ULD++'s first stage *is* D-ULD (the rounds its proxy
# task and TSC build on), so both share the keypoint rule and an ablation compares like with like.
# Mallis (D) reads only an entry of its own: with the face rule it was worse on MTFL (9.49 vs 8.63).
METHOD_DEFAULT_ENTRY = {"duld++": "duld"}


def method_defaults(spec: str | None, method: str, home: str | Path | None = None) -> dict[str, Any]:
    """``method``'s settings recorded with the backbone ``spec`` (``{}`` when there are none).

    ``uld_backbone.json`` may hold ``"method_defaults": {"duld": {"top_k": 60, ...}, "from": "..."}``
    (``from``: where they were measured). ``method`` reads the entry :data:`METHOD_DEFAULT_ENTRY`
    names for it (its own by default). Only :data:`METHOD_DEFAULT_KEYS` are allowed, so a typo in
    the file is an error, not a silently ignored setting.
    """
    if not spec or not isinstance(spec, str):
        return {}
    method = METHOD_DEFAULT_ENTRY.get(method, method)
    meta = read_backbone_meta(spec, home)
    values = dict((meta.get("method_defaults") or {}).get(method) or {})
    allowed = METHOD_DEFAULT_KEYS.get(method, ())
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise BackboneError(f"uld_backbone.json sets unknown {method} settings {unknown}", where=f"{spec}: method_defaults.{method}",
                            fix=f"use only {', '.join(allowed) or 'none'} (or remove the entry)")
    return values


def is_shipped_dir(folder: str | Path) -> bool:
    """True when ``folder`` is (inside) the package's own assets (the shipped backbone)."""
    from pipeline.backbones.loading import shipped_dir

    assets = shipped_dir().parent.resolve()
    f = Path(folder).expanduser().resolve()
    return f == assets or assets in f.parents


def write_backbone_defaults(
    folder: str | Path,
    layers: Sequence[str],
    timesteps: Sequence[int],
    provenance: dict[str, Any] | None = None,
    allow_shipped: bool = False,
) -> Path:
    """Set ``default_layers`` / ``default_timesteps`` (and ``defaults_from``) in ``folder``'s
    ``uld_backbone.json``, atomically, keeping every other entry. Returns the file.

    Refuses the package's shipped assets unless ``allow_shipped`` (the caller
    named that folder explicitly), and anything but a DDPM folder: Stable
    Diffusion computes its default layers from the architecture.
    """
    from storage.atomic import write_json

    folder = Path(folder).expanduser()
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise BackboneError(f"no {META_FILE} in {folder}", where=str(folder),
                            fix="pass a DDPM backbone folder written by `uld backbone train` (or the shipped one's folder)")
    if is_shipped_dir(folder) and not allow_shipped:
        raise ConfigError(
            "refusing to change the shipped backbone's defaults (they are part of the installed package)",
            where=str(folder),
            fix=f"pass the folder explicitly (--default-dir {folder}) if you mean to change them, "
            "or probe a backbone trained in the workspace",
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") != "ddpm":
        raise BackboneError(f"default layers/timesteps can only be stored for DDPM backbones, this one is {meta.get('kind')!r}",
                            where=str(meta_path), fix="pass --layers/--timesteps explicitly for this backbone")
    if not layers or not timesteps:
        raise ConfigError("default layers and timesteps must not be empty", where="write_backbone_defaults")
    meta["default_layers"] = [str(l) for l in layers]
    meta["default_timesteps"] = [int(t) for t in timesteps]
    if provenance:
        meta["defaults_from"] = provenance
    write_json(meta_path, meta)
    return meta_path
