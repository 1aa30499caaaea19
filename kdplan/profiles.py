"""Hardware and cluster profiles: find, load, resolve GPU names, rescale to ``--gpus N``."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from .errors import InputError
from .io import load_model
from .schema.cluster import ClusterFile, ClusterProfile, GPUGroup, GPUSpec, HardwareFile


CHECKOUT_PROFILES = Path(__file__).resolve().parent.parent / "profiles"
"""The repository's profiles/, where people edit them."""
INSTALLED_PROFILES = Path(__file__).resolve().parent / "_profiles"
"""The copy an installed wheel carries (made by setup.py's build step)."""


def profiles_dir() -> Path:
    """$KDPLAN_PROFILES, else the checkout's profiles/, else the installed package's copy."""
    env = os.environ.get("KDPLAN_PROFILES")
    if env:
        return Path(env)
    if (CHECKOUT_PROFILES / "clusters").is_dir():
        return CHECKOUT_PROFILES
    return INSTALLED_PROFILES


def hardware_names() -> list[str]:
    return sorted(p.stem for p in (profiles_dir() / "hardware").glob("*.yaml"))


def cluster_names() -> list[str]:
    return sorted(p.stem for p in (profiles_dir() / "clusters").glob("*.yaml"))


@lru_cache(maxsize=64)
def load_hardware(name: str) -> GPUSpec:
    path = profiles_dir() / "hardware" / f"{name}.yaml"
    if not path.exists():
        raise InputError(f"unknown GPU type {name!r}; known: {', '.join(hardware_names())}")
    return load_model(HardwareFile, path).gpu


def _resolve(cf: ClusterFile, path: str) -> ClusterProfile:
    gpus: dict[str, GPUSpec] = dict(cf.gpus)
    for g in cf.groups:
        if g.node.gpu not in gpus:
            try:
                gpus[g.node.gpu] = load_hardware(g.node.gpu)
            except InputError as e:
                raise InputError(f"{path}: field 'groups.node.gpu': {e}") from None
    return ClusterProfile(
        schema_version=cf.schema_version, name=cf.name, description=cf.description, gpus=gpus,
        groups=cf.groups, overheads=cf.overheads, provenance=cf.provenance, shared_storage=cf.shared_storage,
        placeholder=cf.placeholder or any(gpus[g.node.gpu].placeholder for g in cf.groups),
    )


@lru_cache(maxsize=64)
def _load_cluster_file(path: str) -> ClusterProfile:
    return _resolve(load_model(ClusterFile, path), path)


def load_cluster(name_or_path: str, gpus: int | None = None) -> ClusterProfile:
    """A preset name or a cluster YAML path, optionally rescaled to ``gpus`` devices."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise InputError("cluster is empty; give a preset name or a path to a cluster YAML")
    p = Path(name_or_path)
    if p.suffix.lower() in (".yaml", ".yml", ".json") or os.sep in name_or_path:
        cluster = _load_cluster_file(str(p))
    else:
        preset = profiles_dir() / "clusters" / f"{name_or_path}.yaml"
        try:
            known = preset.is_file()
        except OSError:  # a name too long to look up (Python 3.11 raises) is not a preset either
            known = False
        if not known:
            raise InputError(f"unknown cluster preset {name_or_path!r}; known: {', '.join(cluster_names())}"
                             " (or give a path to a cluster YAML)")
        cluster = _load_cluster_file(str(preset))
    return scale_cluster(cluster, gpus) if gpus is not None else cluster


def scale_cluster(cluster: ClusterProfile, gpus: int) -> ClusterProfile:
    """Rescale a cluster to ``gpus`` devices: fewer than a node is one partial node; more must
    be whole nodes. A mixed cluster keeps its proportions and must divide evenly."""
    if gpus < 1:
        raise InputError(f"--gpus must be at least 1, got {gpus}")
    if gpus == cluster.num_gpus:
        return cluster
    if len(cluster.groups) == 1:
        g = cluster.groups[0]
        per = g.node.gpus_per_node
        if gpus <= per:
            node = g.node.model_copy(update={"gpus_per_node": gpus,
                                             "gpus_per_host_link": min(g.node.gpus_per_host_link, gpus)})
            groups = [GPUGroup(node=node, num_nodes=1)]
        elif gpus % per:
            raise InputError(f"--gpus {gpus} is not a whole number of {per}-GPU nodes of {cluster.name}; "
                             f"use a multiple of {per} or at most {per}")
        else:
            groups = [GPUGroup(node=g.node, num_nodes=gpus // per)]
    else:
        total = cluster.num_gpus
        if (gpus * 1.0 / total) * min(g.num_nodes for g in cluster.groups) < 1 or any(
                (g.num_nodes * gpus) % total for g in cluster.groups):
            raise InputError(f"--gpus {gpus} cannot rescale mixed cluster {cluster.name} "
                             f"({total} GPUs in {len(cluster.groups)} groups) evenly")
        groups = [GPUGroup(node=g.node, num_nodes=g.num_nodes * gpus // total) for g in cluster.groups]
    return cluster.model_copy(update={"groups": groups})


DEFAULT_FIDELITY_CURVE = "tiny-cpu"


@lru_cache(maxsize=8)
def load_fidelity_curve(path: str | None = None):
    """The measured fidelity curve (``FidelityCurve``) at ``path``, or profiles/fidelity/<name>.json
    for a bare name (default ``DEFAULT_FIDELITY_CURVE``)."""
    from .schema.compression import FidelityCurve

    name = path or DEFAULT_FIDELITY_CURVE
    p = Path(name)
    if not p.suffix:
        p = profiles_dir() / "fidelity" / f"{name}.json"
    if not p.exists():
        raise InputError(f"fidelity curve {name!r} not found ({p}); measure one with "
                         "benchmarks/compression_quality.py --write")
    return load_model(FidelityCurve, p)
