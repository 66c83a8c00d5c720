"""The index build as three resumable steps over one local index folder, and the one-shot form.

    train_step(store, folder)   sample uniformly across all shards, choose + train the index
    add_step(store, folder)     add every embedding shard not yet added, in parallel processes;
                                remove re-embedded and tombstoned ids from earlier index shards
    merge_step(folder)          merge (single | ondisk) or keep the shards, measure recall, tune
                                nprobe/efSearch to a target, write manifest.json last
    build_index(store, folder)  all three in order

Files of an index folder:
    train.json, trained.faiss         the empty trained index and how it was chosen
    state.json                        which runs and index shards the folder holds
    shards/<name>.faiss               one index shard per embedding shard (immutable: a removal
    shards/<name>.ids.parquet         writes a new generation), with its id -> uri table
    index.faiss [+ index.ivfdata]     the merged index (layouts single / ondisk)
    id_map.ids.npy, id_map.arrow      the id-sorted id -> URI/metadata map readers memory-map
    recall_queries.npz                the held-out queries and exact neighbours of the recall
    manifest.json                     written last (DESIGN.md section 4)
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass

import faiss
import numpy as np

from index_builder.add import AddJob, add_shards, ids_path, remove_ids, write_index_atomic
from index_builder.embeddings import (LiveShard, check_store_model, iter_shard_batches, list_runs,
                                      plan_live_shards)
from index_builder.id_map import ID_MAP_IDS, shard_rows, write_id_map
from index_builder.manifest import MANIFEST_NAME, file_entry, write_manifest
from index_builder.merge import LAYOUTS, merge_in_memory, merge_to_ondisk
from index_builder.refine import (REFINE_FILE, RefinedIndex, open_refine_vectors,
                                  write_refine_vectors)
from index_builder.recall import KS, exact_knn_stream, tune_search_params, unmeasured_recall
from index_builder.train import (DEFAULT_CODE_BYTES, ERROR_SAMPLE, check_code_bytes,
                                 check_trainable, choose_factory, coarse_training, error_growth,
                                 held_out_size, make_index, parse_bytes, quantization_error,
                                 reservoir_sample, train_index, training_size)
from remap_store.files import atomic_path, redact, write_json_atomic

INDEX_FILE = "index.faiss"
TRAINED_FILE = "trained.faiss"
TRAIN_JSON = "train.json"
STATE_JSON = "state.json"
RECALL_FILE = "recall_queries.npz"
SHARD_DIR = "shards"
DRIFT_WARN = 1.2  # warn when new data's quantisation error grows by more than 20%


log = logging.getLogger(__name__)


# alpha query expansion that searches of a new index apply by default (manifest `rerank`):
# the top 2 results weighted by score ** 3, as measured in bench/RESULTS.md ("Issue 12":
# remap-lite0-v2 94.5 -> 94.8 mAP on the benchmark, 51.8 -> 54.0 on the held-out views;
# bench/benchmark_models.py and bench/heldout_eval.py --rerank qe). `remap index --qe N` sets
# another default, `remap search --qe 0` (search_vectors(qe=0)) turns it off for one search.
# A manifest without `rerank` (built before) means no expansion.
DEFAULT_QE = 2
DEFAULT_QE_ALPHA = 3.0
# database-side augmentation (`remap index --dba K`): the collection's vectors, each replaced by
# rerank.augment_with_neighbours over its K nearest others (index_builder.knn: exact up to
# knn.EXACT_MAX vectors, IVF-Flat above), sorted by id. On by default (K = DEFAULT_DBA) for a
# collection whose float32 vectors take at most DBA_DEFAULT_MAX_BYTES (2M vectors at 256-D): with
# alpha-QE it measured 94.8 -> 96.2 mAP on the benchmark and 54.0 -> 58.3 on the held-out views
# (bench/RESULTS.md, "The whole map and the final whitening"). Above that the default builds
# without it and says so; `--dba K` asks for it at any size, `--dba 0` turns it off.
DEFAULT_DBA = 2
DBA_DEFAULT_MAX_BYTES = 2 << 30
DBA_JSON, DBA_IDS, DBA_VECTORS = "dba.json", "dba_ids.npy", "dba_vectors.npy"


def _local(folder: str, create: bool = True) -> str:
    """The local index folder `folder` names (created unless `create` is False); refuses a URL,
    and a path that is a file."""
    if "://" in folder and not folder.startswith("file://"):
        raise ValueError(f"the index steps work in a local folder, not {folder}: run "
                         f"`remap index --embeddings STORE --output {folder}` (no step), which "
                         f"builds in a local staging folder and uploads it, manifest.json last; "
                         f"or build locally and upload with index_builder.publish.upload_index")
    folder = folder.removeprefix("file://")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"the index folder {folder} is a file, not a folder; pass --output a "
                         f"folder (it is created if missing)")
    if create:
        try:
            os.makedirs(folder, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as e:
            raise ValueError(f"cannot create the index folder {folder}: {e.strerror} (a part "
                             f"of the path is a file); pass --output a folder path") from None
    return folder


def _read_json(path: str, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is damaged (not valid JSON: {e}); build the index again "
                             f"into this folder with `remap index --embeddings STORE --output "
                             f"{os.path.dirname(path)}`") from None


def _write_json(path: str, obj) -> None:
    write_json_atomic(path, obj)


def augment_collection(store: str, folder: str, k: int, alpha: float = DEFAULT_QE_ALPHA,
                       seed: int = 0, shards: list[LiveShard] | None = None) -> dict:
    """DBA before indexing: every live vector of `store` replaced by
    rerank.augment_with_neighbours over its `k` nearest other vectors (augment_live), written
    to the folder as a table (DBA_IDS, DBA_VECTORS, DBA_JSON) that train, add and merge read in
    place of the embedding shards' vectors. `shards`: the store's live shards when the caller
    has planned them already. -> the table's info (the k-NN search's own under "knn")"""
    folder = _local(folder)
    if shards is None:
        shards, _ = plan_live_shards(list_runs(store))
    info, ids, Xa, _ = augment_live(shards, k, alpha, seed)
    write_dba_table(folder, info, ids, Xa)
    return info


def augment_live(shards: list[LiveShard], k: int, alpha: float = DEFAULT_QE_ALPHA,
                 seed: int = 0) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """The live vectors of `shards`, each replaced by rerank.augment_with_neighbours over its `k`
    nearest other vectors (index_builder.knn: exact up to knn.EXACT_MAX vectors, IVF-Flat
    above, its recall measured), weights score ** alpha. The N x D vectors are held in memory
    (twice, and once more in the approximate search's index). -> (the table's info, ids (N,)
    ascending, their augmented vectors (N, D), the position in `shards` of each row's shard
    (N,) int32: a shard's part of the table is where it equals the shard's position)."""
    from index_builder.knn import nearest_others
    from index_builder.rerank import augment_with_neighbours

    t0 = time.time()
    ids, X, where = [np.zeros(0, np.int64)], [], [np.zeros(0, np.int32)]
    for position, shard in enumerate(shards):
        for bid, bx in _live_batches([shard]):
            ids.append(bid)
            X.append(bx)
            where.append(np.full(len(bid), position, np.int32))
    ids, where = np.concatenate(ids), np.concatenate(where)
    X = np.concatenate(X) if X else np.zeros((0, 1), np.float32)
    order = np.argsort(ids, kind="stable")
    ids, X, where = ids[order], X[order], where[order]
    nn, sims, knn = nearest_others(X, k, seed=seed)
    Xa = augment_with_neighbours(X, nn, sims, alpha)
    del X
    info = {"k": int(k), "alpha": float(alpha), "vectors": int(len(ids)), "knn": knn,
            "seconds": round(time.time() - t0, 3)}
    log.info(f"dba: {len(ids)} vectors augmented with their {k} nearest others "
             f"({knn['knn']} k-NN) in {info['seconds']:.1f}s")
    return info, ids, Xa, where


def write_dba_table(folder: str, info: dict, ids: np.ndarray, vectors: np.ndarray) -> None:
    """Write a DBA table (sorted ids, their augmented vectors, then DBA_JSON last, each file
    atomically) into `folder`, where dba_table reads it."""
    for name, arr in ((DBA_IDS, ids), (DBA_VECTORS, vectors)):
        with atomic_path(os.path.join(folder, name)) as tmp, open(tmp, "wb") as f:
            np.save(f, arr)
    _write_json(os.path.join(folder, DBA_JSON), info)


def default_dba(n: int, dim: int) -> int:
    """The DBA count a build of n vectors of dim floats uses when none is asked for:
    DEFAULT_DBA when they take at most DBA_DEFAULT_MAX_BYTES as float32, else 0 (logged, with
    how to force it)."""
    need = 4 * n * dim
    if need <= DBA_DEFAULT_MAX_BYTES:
        return DEFAULT_DBA
    log.warning(f"dba: skipped: {n} vectors x {dim} floats take {need / 2**30:.1f} GiB, above "
                f"the {DBA_DEFAULT_MAX_BYTES / 2**30:.0f} GiB up to which database-side "
                f"augmentation is on by default (it holds them in memory about three times); "
                f"pass --dba {DEFAULT_DBA} to augment anyway, --dba 0 to silence this")
    return 0


def remove_augmentation(folder: str) -> None:
    """Drop a DBA table of an earlier build from the folder (the next build indexes the shards'
    own vectors)."""
    for name in (DBA_JSON, DBA_IDS, DBA_VECTORS):
        if os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))


def dba_table(folder: str) -> tuple[dict, np.ndarray, np.ndarray] | None:
    """The folder's DBA table (info, sorted ids, vectors; memory-mapped), None without one."""
    info = _read_json(os.path.join(folder, DBA_JSON))
    if info is None:
        return None
    return (info, np.load(os.path.join(folder, DBA_IDS), mmap_mode="r"),
            np.load(os.path.join(folder, DBA_VECTORS), mmap_mode="r"))


def augmented(table, ids: np.ndarray, X: np.ndarray) -> np.ndarray:
    """X with the rows whose id the DBA table holds replaced by their augmented vectors (rows
    of runs added after the table was made keep their own)."""
    if table is None or not len(ids):
        return X
    _, tids, tvec = table
    pos = np.minimum(np.searchsorted(tids, ids), max(len(tids) - 1, 0))
    hit = (tids[pos] == ids) if len(tids) else np.zeros(len(ids), bool)
    if not hit.any():
        return X
    X = np.array(X, np.float32, copy=True)
    X[hit] = tvec[pos[hit]]
    return X


def _live_batches(shards: list[LiveShard], batch_rows: int = 65_536, table=None):
    for s in shards:
        for ids, X, _ in iter_shard_batches(s.path, batch_rows, drop=s.drop, with_uris=False):
            yield ids, augmented(table, ids, X)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


# --------------------------------------------------------------------------- 1. train

@dataclass
class TrainingPlan:
    """What a training will do, decided (and every refusal made) before anything is read
    beyond the id columns: the live shards, the factory, how many vectors to sample."""
    store: str
    runs: list            # EmbeddingRun, oldest first
    fingerprint: str
    dim: int
    shards: list          # LiveShard, oldest first
    n: int                # live vectors
    factory: str
    size: int             # training vectors
    held: int             # vectors sampled beside them for the quantisation error, never trained on
    budget: int           # --max-index-memory in bytes
    seed: int

    @property
    def run_ids(self) -> list[str]:
        return [r.run_id for r in self.runs]

    def key(self) -> str:
        """Names what the training depends on: a trained index with the same key is the one this
        plan would train (the sample is a function of the live rows and the seed)."""
        import hashlib

        what = json.dumps([self.store, self.run_ids, self.fingerprint, self.dim, self.n,
                           self.factory, self.size, self.held, self.seed])
        return hashlib.sha256(what.encode()).hexdigest()[:16]


def plan_training(store: str, factory: str | None = None, max_index_memory: str | int = "4GB",
                  train_sample: int | None = None, points_per_centroid: int = 50, seed: int = 0,
                  opq: bool = False, layout: str | None = None,
                  code_bytes: int = DEFAULT_CODE_BYTES) -> TrainingPlan:
    """List the store's runs, plan the live shards, choose (or check) the factory and the sample
    size. Everything that can be refused (the budget, the factory, too few vectors to train it,
    a `layout` it cannot take) is refused here, before anything is sampled or written."""
    budget = parse_bytes(max_index_memory)
    if train_sample is not None and int(train_sample) < 1:
        raise ValueError(f"--train-sample must be at least 1, got {train_sample}")
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    runs = list_runs(store)
    fingerprint, dim = check_store_model(runs)
    shards, _ = plan_live_shards(runs)
    n = sum(s.live_rows for s in shards)
    if n == 0:
        raise ValueError(f"the runs of {store} hold no live vectors (none embedded, or all "
                         f"deleted); nothing to index")
    check_code_bytes(code_bytes)
    factory = factory or choose_factory(n, dim, budget, opq, code_bytes)
    empty = make_index(factory, dim)
    needs_training = not empty.is_trained
    size = training_size(factory, n, dim, points_per_centroid) if train_sample is None \
        else min(int(train_sample), n)
    held = held_out_size(n) if needs_training else 0  # never trained on
    size = min(size, n - held) if needs_training else 0
    check_trainable(factory, empty, size, n)
    if layout == "ondisk" and faiss.try_extract_index_ivf(empty) is None:
        raise ValueError(f"--layout ondisk needs an IVF index and {factory} is not one; use "
                         f"--layout single or shards, or pass --factory IVF<k>,...")
    return TrainingPlan(store, runs, fingerprint, dim, [s for s in shards], n, factory,
                        int(size), int(held), budget, seed)


def train_on_sample(plan: TrainingPlan, sample: np.ndarray, folder: str,
                    sample_seconds: float = 0.0, started: float | None = None) -> dict:
    """Train plan.factory on a sample drawn for the plan ((held + size, D): the first `held`
    rows measure the quantisation error, the rest train), write trained.faiss + train.json
    into the local `folder`. -> train.json's content"""
    started = started or time.time()
    held = plan.held
    t0 = time.time()
    index = train_index(plan.factory, sample[held:], verbose=False)
    train_seconds = time.time() - t0
    errors = quantization_error(index, sample[:held]) if held else {}
    write_index_atomic(index, os.path.join(folder, TRAINED_FILE))
    info = {"factory": plan.factory, "dimension": plan.dim, "model": plan.fingerprint,
            "collection_size": plan.n, "max_index_memory": plan.budget,
            "training_sample": int(plan.size), "quantization_error": errors,
            "coarse_training": _coarse_training(index),
            "error_sample": int(held), "seed": plan.seed, "plan_key": plan.key(),
            "sample_seconds": round(sample_seconds, 3), "train_seconds": round(train_seconds, 3),
            "source_runs": plan.run_ids, "source_store": plan.store,
            "model_uri": plan.runs[-1].summary.get("model_uri"),
            "trained_at": _now(), "seconds": round(time.time() - started, 3)}
    _write_json(os.path.join(folder, TRAIN_JSON), info)
    log.info(f"train: done in {info['seconds']:.1f}s (sample {sample_seconds:.1f}s, "
             f"train {train_seconds:.1f}s); quantisation error {errors or 'n/a (exact storage)'}")
    return info


def _coarse_training(index: faiss.Index) -> str | None:
    ivf = faiss.try_extract_index_ivf(index)
    return coarse_training(ivf.nlist) if ivf is not None else None


def train_step(store: str, folder: str, factory: str | None = None,
               max_index_memory: str | int = "4GB", train_sample: int | None = None,
               points_per_centroid: int = 50, seed: int = 0, opq: bool = False,
               layout: str | None = None, code_bytes: int = DEFAULT_CODE_BYTES,
               plan: TrainingPlan | None = None) -> dict:
    """Choose (or take) the factory, sample the collection uniformly at random across all
    shards (streamed), train, write trained.faiss + train.json. Existing index shards of an
    earlier training are dropped from state.json: re-add them with add_step.

    Everything that can be refused (the folder, the budget, the factory, too few vectors to
    train it, a `layout` it cannot take) is refused before anything is sampled or written.
    `plan`: plan_training's result for these arguments, when the caller has made it already."""
    folder = _local(folder, create=False)
    started = time.time()
    if plan is None:
        plan = plan_training(store, factory, max_index_memory, train_sample,
                             points_per_centroid, seed, opq, layout, code_bytes)
    if os.path.exists(os.path.join(folder, MANIFEST_NAME)):
        log.info(f"train: {folder} holds an index; training anew (it is replaced at the merge)")
    folder = _local(folder)
    log.info(f"train: {plan.n} vectors of dim {plan.dim} in {len(plan.shards)} shards -> "
             f"{plan.factory}; sampling {plan.size} (+{plan.held} held out for the "
             f"quantisation error)")
    t0 = time.time()
    if plan.size + plan.held:
        _, sample = reservoir_sample(_live_batches(plan.shards, table=dba_table(folder)),
                                     plan.size + plan.held, seed)
    else:
        sample = np.zeros((0, plan.dim), np.float32)
    info = train_on_sample(plan, sample, folder, time.time() - t0, started)
    old = _read_json(os.path.join(folder, STATE_JSON))
    if old and old.get("shards"):
        log.info(f"train: the {len(old['shards'])} index shards of the previous training no "
                 f"longer match; state reset, run `remap index add` to add every run again")
    _write_json(os.path.join(folder, STATE_JSON),
                {"trained_at": info["trained_at"], "runs_added": [], "shards": [],
                 "generation": (old or {}).get("generation", 0) + 1})
    return info


# --------------------------------------------------------------------------- 2. add

def add_step(store: str, folder: str, workers: int | None = None,
             memory_budget: str | int | None = None, batch_rows: int = 65_536,
             seed: int = 0, progress: bool = True) -> dict:
    """Add the shards of every run of `store` that the folder does not hold yet. A URI that a new
    run re-embeds or tombstones is removed from the earlier index shards (written as a new
    generation: published files never change). Warns when the new data's quantisation error has
    grown past the training sample's (retraining is the explicit `remap index train`)."""
    folder = _local(folder, create=False)
    started = time.time()
    train = _read_json(os.path.join(folder, TRAIN_JSON))
    if train is None:
        raise FileNotFoundError(f"{folder} has no trained index; run `remap index train "
                                f"--embeddings {store} --output {folder}` first")
    state = _read_json(os.path.join(folder, STATE_JSON))
    done = set(state["runs_added"])
    runs = list_runs(store)
    new_runs = [r for r in runs if r.run_id not in done]
    if not new_runs:
        log.info(f"add: every run of {redact(store)} is already in {folder}; nothing to add")
        return {"runs": [], "added": 0, "removed": 0, "seconds": 0.0}
    if any(r.shard_paths for r in new_runs):  # a run may hold only tombstones
        check_store_model(new_runs, expect=train["model"])
    shards, touched = plan_live_shards(new_runs)
    gen = state["generation"]

    # earlier index shards: drop ids the new runs re-embedded or deleted
    removed_total, kept = 0, []
    trained_index = None          # read once, if a shard holding only inverted lists needs it
    for entry in state["shards"]:
        have = _read_ids(os.path.join(folder, entry["index"]))
        gone = np.intersect1d(have, touched)
        if len(gone):
            new_name = index_shard_name(entry["source_run"], entry["source"], gen)
            if trained_index is None:
                trained_index = faiss.read_index(os.path.join(folder, TRAINED_FILE))
            removed, left = remove_ids(os.path.join(folder, entry["index"]), gone,
                                       os.path.join(folder, new_name), trained_index)
            removed_total += removed
            entry = {**entry, "index": new_name, "ids": ids_path(new_name), "vectors": left}
        kept.append(entry)

    # drift check on a uniform sample of the new data
    drift = {}
    if train["quantization_error"]:
        _, xs = reservoir_sample(_live_batches(shards, table=dba_table(folder)), ERROR_SAMPLE,
                                 seed)
        trained = faiss.read_index(os.path.join(folder, TRAINED_FILE))
        new_err = quantization_error(trained, xs)
        drift = {"error": new_err, "growth": error_growth(train["quantization_error"], new_err)}
        grown = {k: g for k, g in drift["growth"].items() if g > DRIFT_WARN}
        if grown:
            log.warning("the new data's quantisation error has grown since training (" +
                        ", ".join(f"{k} x{g:.2f}" for k, g in grown.items()) + "); the "
                        "codebooks fit it worse and recall will drop: retrain with `remap index "
                        "train` then `remap index add`")

    dba = folder if os.path.exists(os.path.join(folder, DBA_JSON)) else None
    jobs = [AddJob(s.path, os.path.join(folder, index_shard_name(s.run_id, s.path, gen)), s.drop,
                   dba) for s in shards if s.live_rows > 0]
    results = add_shards(os.path.join(folder, TRAINED_FILE), jobs, workers,
                         parse_bytes(memory_budget, "--add-memory") if memory_budget else None,
                         batch_rows, progress)
    for s, r in zip([s for s in shards if s.live_rows > 0], results):
        kept.append({"source": s.path, "source_run": s.run_id,
                     "index": os.path.relpath(r.output, folder),
                     "ids": os.path.relpath(r.ids_file, folder), "vectors": r.vectors})
    state = {**state, "runs_added": state["runs_added"] + [r.run_id for r in new_runs],
             "shards": [e for e in kept if e["vectors"] > 0], "generation": gen + 1,
             "updated_at": _now()}
    _write_json(os.path.join(folder, STATE_JSON), state)
    added = sum(r.vectors for r in results)
    summary = {"runs": [r.run_id for r in new_runs], "added": added, "removed": removed_total,
               "index_shards": len(state["shards"]), "drift": drift,
               "peak_worker_rss_bytes": max([r.peak_rss_bytes for r in results] or [0]),
               "seconds": round(time.time() - started, 3)}
    log.info(f"add: {added} vectors from {len(jobs)} shards of {len(new_runs)} runs, "
             f"{removed_total} removed (re-embedded or deleted), {len(state['shards'])} index "
             f"shards, {summary['seconds']:.1f}s")
    return summary


def adopt_shards(folder: str, run_ids: list[str], entries: list[dict]) -> dict:
    """Record index shards added elsewhere (by the Beam job's workers) as the state of a freshly
    trained local folder: what add_step would have written after adding `run_ids` whole.
    `entries`: {"source", "source_run", "index", "ids", "vectors"} in the order to merge."""
    train = _read_json(os.path.join(folder, TRAIN_JSON))
    if train is None:
        raise FileNotFoundError(f"{folder} has no trained index to adopt index shards into")
    state = {"trained_at": train["trained_at"], "runs_added": list(run_ids),
             "shards": [e for e in entries if e["vectors"] > 0], "generation": 2,
             "updated_at": _now()}
    _write_json(os.path.join(folder, STATE_JSON), state)
    return state


def index_shard_name(run_id: str, source: str, gen: int) -> str:
    """The index shard of one embedding shard, relative to the index folder: deterministic, so
    an add redone after a killed or retried worker overwrites its own file (no duplicates)."""
    stem = os.path.basename(source).rsplit(".", 1)[0]
    return f"{SHARD_DIR}/{run_id}-{stem}-g{gen}.faiss"


def _read_ids(index_path: str) -> np.ndarray:
    import pyarrow.parquet as pq

    return pq.read_table(ids_path(index_path), columns=["id"]).column("id").to_numpy()


# --------------------------------------------------------------------------- 3. merge

def merge_step(folder: str, layout: str = "single", target_recall: float = 0.95,
               tune_at: int = 10, recall_queries: int = 1000, seed: int = 0,
               source_store: str | None = None, started: float | None = None,
               qe: int | None = None, refine: int = 0) -> dict:
    """Make the searchable index from the folder's shards, measure recall against exact search on
    held-out queries, tune search parameters to `target_recall` (recall@`tune_at`), and write
    the manifest last. `qe`: the query expansion searches use by default (manifest `rerank`;
    None: DEFAULT_QE). `refine` K > 0: also store the vectors as float16 beside the id map and
    re-rank K x k candidates on them at search time (index_builder.refine; recall is measured
    and tuned with it); 0: no such file."""
    from index_builder.search import read_faiss_index

    folder = _local(folder, create=False)
    started = started or time.time()
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if refine < 0:
        raise ValueError(f"refine must be >= 0 (0: no re-ranking on stored vectors), got {refine}")
    train = _read_json(os.path.join(folder, TRAIN_JSON))
    state = _read_json(os.path.join(folder, STATE_JSON))
    if not train or not state or not state["shards"]:
        raise FileNotFoundError(f"{folder} has no index shards; run `remap index train` and "
                                f"`remap index add` first")
    shard_paths = [os.path.join(folder, e["index"]) for e in state["shards"]]
    t0 = time.time()
    trained_path = os.path.join(folder, TRAINED_FILE)
    shared = None      # the trained index that IVF shards share (layout shards)
    if layout == "single":
        index = merge_in_memory(shard_paths, trained_path)
        write_index_atomic(index, os.path.join(folder, INDEX_FILE))
        del index
        index_files = [file_entry(folder, INDEX_FILE)]
    elif layout == "ondisk":
        ivfdata = merge_to_ondisk(os.path.join(folder, TRAINED_FILE), shard_paths,
                                  os.path.join(folder, INDEX_FILE))
        index_files = [file_entry(folder, INDEX_FILE),
                       file_entry(folder, os.path.basename(ivfdata))]
    else:
        index_files = [file_entry(folder, e["index"]) for e in state["shards"]]
        if faiss.try_extract_index_ivf(faiss.read_index(trained_path)) is not None:
            shared = TRAINED_FILE       # the quantizer + codebooks, once for every shard
            index_files.insert(0, file_entry(folder, TRAINED_FILE))
    merge_seconds = time.time() - t0
    manifest = {
        "model": train["model"], "model_uri": train.get("model_uri"),
        "dimension": train["dimension"], "metric": "inner_product",
        "factory": train["factory"], "layout": layout, "search_params": {},
        "index_files": index_files,
        "id_files": [file_entry(folder, e["ids"]) for e in state["shards"]],
        "id_map": _write_id_map(folder, state),
        "num_vectors": int(sum(e["vectors"] for e in state["shards"])),
        "training_sample": train["training_sample"],
        "rerank": {"qe": DEFAULT_QE if qe is None else int(qe), "qe_alpha": DEFAULT_QE_ALPHA,
                   "dba": 0},
    }
    table = dba_table(folder)
    if table is not None:     # the stored vectors are DBA'd (`remap index --dba K`)
        manifest["rerank"].update({"dba": table[0]["k"], "dba_alpha": table[0]["alpha"],
                                   "dba_vectors": table[0]["vectors"],
                                   "dba_knn": table[0].get("knn")})
    if shared:
        manifest["quantizer_file"] = shared
    index = read_faiss_index(folder, manifest, folder)
    # each embedding shard and the ids indexed from it, read once for every pass below
    sources = [(e["source"], _read_ids(p)) for e, p in zip(state["shards"], shard_paths)]
    if refine:
        t1 = time.time()
        ids_sorted = np.load(os.path.join(folder, ID_MAP_IDS), mmap_mode="r")
        name = write_refine_vectors(folder, ids_sorted, int(train["dimension"]),
                                    _indexed_batches(sources, table))
        manifest["refine"] = {"file": file_entry(folder, name), "dtype": "float16",
                              "k_factor": int(refine)}
        log.info(f"merge: refine vectors written in {time.time() - t1:.1f}s "
                 f"({manifest['refine']['file']['bytes'] / 2**20:.1f} MB)")
        index = RefinedIndex(index, ids_sorted, open_refine_vectors(folder), refine)
    ntotal = int(index.ntotal)
    t0 = time.time()
    if ntotal < 2:  # leave-one-out: a query needs another vector to find
        log.info(f"merge: {layout} index of {ntotal} vector in {merge_seconds:.1f}s; recall not "
                 f"measured (a held-out query needs at least one other vector to find)")
        params, recall = unmeasured_recall(
            index, f"the index holds {ntotal} vector: leave-one-out recall needs at least 2",
            target_recall, tune_at)
        if os.path.exists(os.path.join(folder, RECALL_FILE)):
            os.remove(os.path.join(folder, RECALL_FILE))
    else:
        params, recall = _measure_recall(folder, index, sources, recall_queries,
                                         merge_seconds, layout, target_recall, tune_at, seed,
                                         table)
    recall_seconds = time.time() - t0
    manifest.update({
        "search_params": params, "recall": recall,
        "build_seconds": round(time.time() - started, 3),
        "merge_seconds": round(merge_seconds, 3), "recall_seconds": round(recall_seconds, 3),
        "built_at": _now(), "source_runs": state["runs_added"],
        "source_store": source_store or train.get("source_store"),
        "train": {k: train[k] for k in ("collection_size", "quantization_error",
                                        "train_seconds", "trained_at", "max_index_memory")},
    })
    write_manifest(folder, manifest)
    _remove_unreferenced(folder, manifest, state)
    log.info(f"merge: {manifest['num_vectors']} vectors, {manifest['factory']} ({layout}), "
             f"search {params or 'exact'}: " + (
                 ", ".join(f"{k} {v:.3f}" for k, v in recall.items() if k.startswith("recall@")) +
                 f", {recall['queries_per_second']} q/s" if recall["measured"]
                 else f"recall not measured ({recall['reason']})"))
    return manifest


def _indexed_batches(sources: list[tuple[str, np.ndarray]], table=None):
    """(ids, X) batches of the indexed vectors, read back from the embedding shards: `sources`
    (shard, ids indexed from it); DBA'd when the build augmented them."""
    for source, keep in sources:
        for ids, X, _ in iter_shard_batches(source, keep=keep, with_uris=False):
            yield ids, augmented(table, ids, X)


def _write_id_map(folder: str, state: dict) -> list[dict]:
    """The id-sorted id -> URI/metadata map readers memory-map (index_builder.id_map)."""
    t0 = time.time()
    names = write_id_map(folder, [shard_rows(os.path.join(folder, e["ids"]), e["source"])
                                  for e in state["shards"]])
    log.info(f"merge: id map written in {time.time() - t0:.1f}s")
    return [file_entry(folder, n) for n in names]


def _measure_recall(folder: str, index, sources: list[tuple[str, np.ndarray]],
                    recall_queries: int, merge_seconds: float, layout: str,
                    target_recall: float, tune_at: int, seed: int,
                    table=None) -> tuple[dict, dict]:
    """Recall against exact search on held-out queries (a uniform sample of the indexed
    vectors, each left out of its own results), search parameters tuned to the target; the
    queries and their exact neighbours saved to recall_queries.npz. -> (params, recall)"""
    ntotal = int(index.ntotal)

    def batches():  # the indexed vectors, read back from the embedding shards
        return _indexed_batches(sources, table)

    nq = min(recall_queries, ntotal)
    log.info(f"merge: {layout} index of {ntotal} vectors in {merge_seconds:.1f}s; measuring recall "
             f"on {nq} held-out queries" +
             (f" (not {recall_queries}: the index holds {ntotal} vectors)" if nq < recall_queries
              else ""))
    qids, xq = reservoir_sample(batches(), nq, seed + 1)
    kmax = min(max(KS), ntotal - 1)
    _, true = exact_knn_stream(xq, batches(), kmax, exclude=qids)
    params, recall = tune_search_params(index, xq, qids, true, target_recall, tune_at)
    if not recall["target_met"]:
        log.warning(f"no search setting reached recall@{tune_at} {target_recall} "
                    f"(best {recall.get(f'recall@{tune_at}')}, with {params}); the index is too "
                    f"compressed for this target: pass a larger --max-index-memory or --factory"
                    + ("" if isinstance(index, RefinedIndex) else
                       ", or --refine 10 to re-rank candidates on stored vectors"))
    # a file object: np.savez would append ".npz" to a temporary name
    with atomic_path(os.path.join(folder, RECALL_FILE)) as tmp, open(tmp, "wb") as f:
        np.savez(f, ids=qids, vectors=xq, true=true)
    return params, {**recall, "measured": True,
                    "method": "leave-one-out: queries are uniformly sampled indexed vectors; "
                              "each query's own id is excluded from exact and approximate "
                              "results",
                    "queries_file": file_entry(folder, RECALL_FILE)}


def _remove_unreferenced(folder: str, manifest: dict, state: dict) -> None:
    """Delete index-shard generations neither the state nor the new manifest names, and the
    temporary files of writers that were killed (the merge runs after every add worker is done:
    no temporary file there belongs to a live writer)."""
    keep = {e["path"] for e in manifest["index_files"] + manifest["id_files"]}
    keep |= {e["index"] for e in state["shards"]} | {e["ids"] for e in state["shards"]}
    shard_dir = os.path.join(folder, SHARD_DIR)
    for name in os.listdir(shard_dir) if os.path.isdir(shard_dir) else []:
        rel = f"{SHARD_DIR}/{name}"
        if rel not in keep:
            os.remove(os.path.join(shard_dir, name))
    if manifest["layout"] != "ondisk" and os.path.exists(os.path.join(folder, "index.ivfdata")):
        os.remove(os.path.join(folder, "index.ivfdata"))
    if manifest["layout"] == "shards" and os.path.exists(os.path.join(folder, INDEX_FILE)):
        os.remove(os.path.join(folder, INDEX_FILE))
    if not manifest.get("refine") and os.path.exists(os.path.join(folder, REFINE_FILE)):
        os.remove(os.path.join(folder, REFINE_FILE))


# --------------------------------------------------------------------------- one shot

def build_index(store: str, output: str, factory: str | None = None,
                train_sample: int | None = None, recall_queries: int = 1000, seed: int = 0,
                max_index_memory: str | int = "4GB", layout: str = "single",
                target_recall: float = 0.95, workers: int | None = None,
                progress: bool = True, opq: bool = False,
                add_memory: str | int | None = None, qe: int | None = None,
                dba: int | None = None, refine: int = 0, code_bytes: int = DEFAULT_CODE_BYTES
                ) -> dict:
    """Train, add and merge in one go (a fresh folder, or a full rebuild of an existing one).

    `dba` K > 0: database-side augmentation before the codes are trained and added: each stored
    vector is replaced by the score**3-weighted sum of itself and its K nearest other vectors
    (augment_collection: all-kNN over the collection, exact up to knn.EXACT_MAX vectors,
    approximate above; N x D floats in memory), recorded in the manifest's `rerank`. None
    (default): default_dba (K = DEFAULT_DBA up to DBA_DEFAULT_MAX_BYTES of vectors, else none).
    0: the embeddings as they are. `refine`: see merge_step.

    A build that fails removes the folder if it created it; an existing folder (and an index
    already in it) is left in place. Refusals (bad factory, budget, too few vectors, ...) come
    before anything is written."""
    started = time.time()
    folder = _local(output, create=False)
    if os.path.exists(os.path.join(folder, MANIFEST_NAME)):
        log.info(f"index: rebuilding {output} from scratch")
    created = _first_missing(folder)  # the top folder this build creates, if any
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if dba is not None and dba < 0:
        raise ValueError(f"dba must be >= 0 (0: no database-side augmentation), got {dba}")
    try:
        # planned once, so that every refusal (factory, budget, layout) comes before the DBA
        # table is written or removed
        plan = plan_training(store, factory, max_index_memory, train_sample, seed=seed, opq=opq,
                             layout=layout, code_bytes=code_bytes)
        if dba is None:
            dba = default_dba(plan.n, plan.dim)
        if dba:
            augment_collection(store, folder, dba, seed=seed, shards=plan.shards)
        elif os.path.isdir(folder):
            remove_augmentation(folder)
        train_step(store, folder, factory, max_index_memory, train_sample, seed=seed, opq=opq,
                   layout=layout, code_bytes=code_bytes, plan=plan)
        add_step(store, folder, workers, add_memory, seed=seed, progress=progress)
        return merge_step(folder, layout, target_recall, recall_queries=recall_queries,
                          seed=seed, source_store=store, started=started, qe=qe, refine=refine)
    except BaseException:
        if created and os.path.isdir(created):
            shutil.rmtree(created, ignore_errors=True)
        raise


def _first_missing(folder: str) -> str | None:
    """The outermost missing folder on the way to `folder` (None when it exists)."""
    path, missing = os.path.abspath(folder), None
    while not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing

