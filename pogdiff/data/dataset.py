"""One dataset, one path: every verb reads a *prepared dataset* and its per-dataset artifacts.

    ds = resolve_dataset(cfg)          # any data.source -> a prepared directory (prepared once, then reused)
    ds.index                            # pogdiff.data.shards.DatasetIndex: memory-mapped columns, shard list
    neighbour_table(cfg, ds)            # Eq. 8 table, built with the FAISS service on first use
    text_density(cfg, ds)               # Eq. 10-11 VAE and the -ELBO of every row
    psi_table_for(cfg, ds)              # Eq. 12 psi per (row, neighbour) for the method's a1, a2, a3

``data.source`` is ``synthetic``, a JSONL/CSV manifest, a Hugging Face imagefolder directory or a
prepared directory. The first three are prepared into ``prepare.output`` (default
``<output_dir>/datasets/<name>-<fingerprint>``); a directory whose dataset.json carries the same
source fingerprint is reused as it is.

Artifacts sit beside the index in ``<dataset>/artifacts/``, written atomically (temp + rename)
and memory-mapped when read (``mmap_mode="c"``: copy-on-write, so torch can wrap them without a
copy and no process holds whole-dataset tensors):

    neighbours-k<k>/ids.npy sims.npy different_identity.npy stats.json
    density-<fp>/density.safetensors nll.npy               (nll = -ELBO per row)
    psi-<fp>.npy  psi-<fp>.json                            ((N, k) fp32 and its head/tail summary)
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pogdiff.config import Config
from pogdiff.data.shards import DatasetIndex, EmbeddingSource
from pogdiff.method.density import TextDensity, fit_text_density, psi_inv_stats
from pogdiff.method.neighbours import NeighbourTable, summarize_psi
from pogdiff.npyrows import NpyRows
from pogdiff.runs import atomic_path, fingerprint, is_uri, write_json

log = logging.getLogger("pogdiff.data")


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / "dataset.json").is_file()


@dataclass
class Dataset:
    root: Path
    uri: Optional[str] = None  # a dataset in object storage: root is this node's cached copy (pogdiff.storage)

    @classmethod
    def at(cls, location: str | Path) -> "Dataset":
        """The prepared dataset at a folder or a URI; of one in object storage, the memory-mapped files are
        cached on this node and the shards streamed from the bucket."""
        if is_uri(str(location)):
            from pogdiff.storage import local_copy

            return cls(local_copy(str(location)), str(location))
        return cls(Path(location).resolve())

    @property
    def location(self) -> str:
        """What names the dataset on every node: its URI, else its folder."""
        return self.uri or str(self.root)

    def publish_artifacts(self) -> None:
        """Artifacts built here go to the bucket, where other nodes fetch them (``Dataset.at``); a
        folder's are already where every node reads them."""
        if self.uri is not None:
            from pogdiff.storage import upload_artifacts

            upload_artifacts(self.artifacts, f"{self.uri}/artifacts")

    @cached_property
    def index(self) -> DatasetIndex:
        return DatasetIndex.load(self.root)

    @property
    def meta(self) -> dict:
        return self.index.meta

    @property
    def model_dir(self) -> str:
        """The diffusers directory whose VAE and text encoder made the shards (and whose UNet trains)."""
        model = self.meta["model"]
        return str((self.root / model).resolve()) if not Path(model).is_absolute() and (self.root / model).exists() \
            else model

    @cached_property
    def heldout(self) -> Optional[DatasetIndex]:
        return DatasetIndex.load(self.root / "heldout") if is_prepared(self.root / "heldout") else None

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def __len__(self) -> int:
        return int(self.meta["num_samples"])


def _encoders_digest(model: Path) -> str:
    """sha256 over the weights of a model directory's VAE and text encoders: two copies of one model
    (another clone's tiny-base, a moved directory) made the same latents and tokens."""
    import hashlib

    model = model.resolve()
    h = hashlib.sha256()
    for f in sorted(p for part in ("vae", "text_encoder", "text_encoder_2") for p in (model / part).glob("*")
                    if p.suffix in (".safetensors", ".bin")):
        h.update(f"{f.parent.name}/{f.name}".encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def check_model_of(cfg: Config, ds: Dataset) -> Dataset:
    """A prepared dataset trains the model whose VAE and text encoder made its latents and tokens:
    ``model.name`` must name that model (``tiny`` names the tiny model a dataset holds inside it)."""
    from pogdiff.data.prepare import PrepareError

    theirs = json.loads((ds.root / "dataset.json").read_text()).get("model")  # not ds.meta: it loads the index
    if theirs is None:  # a dataset written by hand for the index alone
        return ds
    inside = not Path(theirs).is_absolute() and not is_uri(theirs) and (ds.root / theirs).exists()
    mine = cfg.model.name
    same = mine == theirs or (inside if mine == "tiny" else
                              Path(mine).is_dir() and (made_by := ds.root / theirs if inside else Path(theirs)).is_dir()
                              and _encoders_digest(Path(mine)) == _encoders_digest(made_by))
    if not same:
        theirs_name = "tiny (the model inside it)" if inside else f"'{theirs}'"
        raise PrepareError(f"data.source '{cfg.data.source}' was prepared with model {theirs_name}, but "
                           f"model.name='{mine}': its latents only fit the model that made them. Set model.name="
                           f"{'tiny' if inside else theirs}, or prepare the raw data again with this model")
    return ds


def resolve_dataset(cfg: Config, progress: bool = True) -> Dataset:
    """``data.source`` as a prepared dataset: a prepared directory as it is; any other source
    prepared once (``pogdiff prepare``) and reused while its fingerprint holds. In object storage
    (``data.source`` or ``prepare.output`` a URI) it is read through a node-local copy (``Dataset.at``)."""
    from pogdiff.data.prepare import output_dir, output_location, prepare, source_fingerprint

    source = cfg.data.source
    if is_uri(source):
        return check_model_of(cfg, Dataset.at(source))
    if source != "synthetic" and is_prepared(source):
        return check_model_of(cfg, Dataset(Path(source).resolve()))
    if is_uri(location := output_location(cfg)):
        prepare(cfg, progress=progress)  # returns at once when the bucket holds it complete
        return Dataset.at(location)
    out = output_dir(cfg)
    if is_prepared(out) and json.loads((out / "dataset.json").read_text()).get("source_fingerprint") == source_fingerprint(cfg):
        return Dataset(out.resolve())
    prepare(cfg, progress=progress)
    return Dataset(out.resolve())


def _load(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="c")


# --------------------------------------------------------------------------------- neighbours (Eq. 8)

def neighbours_dir(cfg: Config, ds: Dataset) -> Path:
    return ds.artifacts / f"neighbours-k{cfg.method.k}"


def build_neighbours(cfg: Config, ds: Dataset, progress: bool = True) -> dict:
    """The kNN graph of the dataset's image embeddings with the FAISS service (pogdiff.dist.knn_graph)
    -> ``neighbours-k<k>/`` (replaced once complete), written batch by batch into memory-mapped files;
    returns the build's stats."""
    from pogdiff.dist.knn_graph import build_knn_graph

    out = neighbours_dir(cfg, ds)
    _, stats = build_knn_graph(EmbeddingSource(ds.root), cfg.method.k, cfg.index, root=ds.artifacts / "faiss", out=out,
                               progress=progress)
    stats["table"] = str(out)
    write_json(out / "stats.json", stats)  # last: the table is complete
    return stats


def neighbour_table(cfg: Config, ds: Dataset, progress: bool = True) -> NeighbourTable:
    out = neighbours_dir(cfg, ds)
    if not (out / "stats.json").is_file():
        build_neighbours(cfg, ds, progress)
    return NeighbourTable(torch.from_numpy(_load(out / "ids.npy")), torch.from_numpy(_load(out / "sims.npy")),
                          torch.from_numpy(_load(out / "different_identity.npy")))


# ------------------------------------------------------------------------------ density (Eq. 10-11)

def density_dir(cfg: Config, ds: Dataset) -> Path:
    dc = asdict(cfg.density)
    for key in ("form", "anchor_quantile", "temperature", "log_clip"):  # applied when psi_inv is read
        dc.pop(key)
    dc.pop("device"), dc.pop("distributed_min_rows")  # where it is computed, not what
    return ds.artifacts / f"density-{fingerprint(dc, 12)}"


def text_density(cfg: Config, ds: Dataset, progress: bool = True) -> tuple[TextDensity, np.ndarray]:
    """(the fitted text VAE with this config's map to psi_inv (density.form & co), -ELBO of every row (N,),
    memory-mapped)."""
    out = density_dir(cfg, ds)
    if not ((out / "nll.npy").is_file() and (out / "density.safetensors").is_file()):
        out.mkdir(parents=True, exist_ok=True)
        density = fit_text_density(ds.index.pooled, cfg.density, progress=progress, nll_path=out / "nll.npy",
                                   ray_address=cfg.dist.ray_address)
        with atomic_path(out / "density.safetensors") as tmp:  # after nll.npy: the two are complete
            density.save(tmp)
    nll = _load(out / "nll.npy")
    return TextDensity.load(out / "density.safetensors").normalised(cfg.density, str(out / "nll.npy")), nll


# ----------------------------------------------------------------------------------------- psi (Eq. 12)

def psi_path(cfg: Config, ds: Dataset) -> Path:
    m, dc = cfg.method, cfg.density
    key = dict(k=m.k, a1=m.a1, a2=m.a2, a3=m.a3, psi_img=m.psi_img, psi_inv=m.psi_inv, form=dc.form.value,
               anchor_quantile=dc.anchor_quantile, temperature=dc.temperature, log_clip=dc.log_clip, density=density_dir(cfg, ds).name if m.psi_inv else None,
               minority_images=cfg.data.minority_images)
    return ds.artifacts / f"psi-{fingerprint(key, 12)}.npy"


def psi_table_for(cfg: Config, ds: Dataset, progress: bool = True) -> tuple[np.ndarray, dict]:
    """psi per (row, neighbour) (N, k), memory-mapped, and its head/tail summary (built on first use)."""
    path = psi_path(cfg, ds)
    stats_path = path.with_suffix(".json")
    if not stats_path.is_file():
        from pogdiff.method.density import map_row_ranges, psi_rows, rows_output, uses_cluster

        m = cfg.method
        n, k = neighbour_table(cfg, ds, progress).ids.shape
        density = nll = None
        if m.psi_inv:
            density, nll = text_density(cfg, ds, progress)
        ds.artifacts.mkdir(parents=True, exist_ok=True)
        with rows_output(path, (n, k), np.float32) as psi:
            map_row_ranges(psi_rows, n, psi, (str(neighbours_dir(cfg, ds)), m.a1, m.a2, m.psi_img, density, nll, m.a3),
                           distributed=uses_cluster(n, cfg.density, cfg.dist.ray_address),
                           ray_address=cfg.dist.ray_address, progress=progress)
        is_minority = ds.index.is_minority(cfg.data.minority_images)
        stats = summarize_psi(NpyRows(path), is_minority, neighbour_rows(cfg, ds))
        if not any(i >= 0 for i in ds.index.identity_counts()):  # no labels: no neighbour is of another identity
            for key in ("own_identity_share_head", "own_identity_share_tail", "own_identity_mass_head",
                        "own_identity_mass_tail"):
                stats[key] = None
        if density is not None:
            stats.update(psi_inv_stats(density, nll, is_minority, m.a3))
            if stats["psi_inv_clipped_share"]:
                log.warning("psi_inv clipped on %.2f%% of the rows (density.form=%s)",
                            100 * stats["psi_inv_clipped_share"], density.form)
        write_json(stats_path, stats)
        log.info("psi (%s): %s", path.name, json.dumps(stats))
        ratio = stats.get("tail_over_head")
        if ratio is not None and ratio < 1:
            log.warning("E[psi | tail] / E[psi | head] = %.3f < 1: psi weights minority samples below majority "
                        "ones with these settings (method.a1/a2/a3, density.form)", ratio)
    return _load(path), json.loads(stats_path.read_text())


def training_tables(cfg: Config, ds: Dataset) -> tuple[NeighbourTable, NpyRows]:
    """The neighbour table and psi (built on first use) as row readers (pogdiff.npyrows): a training
    step reads its batch's rows from the files, and no memory map keeps the rows read resident."""
    psi_table_for(cfg, ds, progress=False)
    return neighbour_rows(cfg, ds), NpyRows(psi_path(cfg, ds))


def neighbour_rows(cfg: Config, ds: Dataset) -> NeighbourTable:
    """The built neighbour table's columns as row readers."""
    folder = neighbours_dir(cfg, ds)
    return NeighbourTable(*(NpyRows(folder / f"{name}.npy") for name in ("ids", "sims", "different_identity")))


def prepare_artifacts(cfg: Config, ds: Dataset, progress: bool = True) -> dict:
    """What the configured method reads in a training step, built once by the driver (returns psi stats)."""
    from pogdiff.config import Method

    name = cfg.method.name
    stats = {}
    if name == Method.pogdiff:
        stats = psi_table_for(cfg, ds, progress)[1]
    elif name == Method.t2h:
        text_density(cfg, ds, progress)
    ds.publish_artifacts()
    return stats


def clear_artifacts(ds: Dataset) -> None:
    shutil.rmtree(ds.artifacts, ignore_errors=True)
