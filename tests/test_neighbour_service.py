"""FAISS neighbour service and kNN graph (pogdiff.dist): exactness, sharding, restarts, bad input, recall."""
import json

import numpy as np
import pytest
import torch

from pogdiff.config import ConfigError, IndexConfig, IndexType, load_config
from pogdiff.dist.knn_graph import ArraySource, build_knn_graph, clustered_embeddings
from pogdiff.dist.neighbour_service import GiB, NeighbourService, NodeResources, choose_index, cluster_nodes, plan_shards
from pogdiff.method.neighbours import exact_knn

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    # The test machine's 2 cores are shared: OpenMP spinning over busy cores makes small k-means ~5x slower.
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def ray_local():
    # two logical GPUs: Ray schedules GPU shard actors on them; faiss-cpu inside runs the index on the CPU
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def actor_cfg(name: str, **kw) -> IndexConfig:
    return IndexConfig(name=name, actor_min_n=0, cpus_per_shard=0.5, gpus_per_shard=0, **kw)


def numpy_knn(z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    s = zn @ zn.T
    np.fill_diagonal(s, -np.inf)
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(s, ids, 1)


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.mean([len(np.intersect1d(x, y)) / len(y) for x, y in zip(a.numpy(), b.numpy())]))


def test_flat_graph_equals_numpy_brute_force_and_exact_knn(tmp_path):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(400, 32)).astype(np.float32) * rng.uniform(0.5, 3, size=(400, 1)).astype(np.float32)
    ident = np.arange(400) % 7
    table, stats = build_knn_graph(ArraySource(z, ident), 6, IndexConfig(), root=tmp_path, progress=False)
    assert stats["kind"] == "flat" and not stats["actors"] and "recall_at_k" not in stats
    ids, sims = numpy_knn(z, 6)
    assert (table.ids.numpy() == ids).all()
    np.testing.assert_allclose(table.sims.numpy(), sims, rtol=1e-5, atol=1e-6)
    assert (table.different_identity.numpy() == (ident[ids] != ident[:, None])).all()
    ref = exact_knn(torch.from_numpy(z), 6, torch.from_numpy(ident))
    assert torch.equal(table.ids, ref.ids) and torch.equal(table.different_identity, ref.different_identity)
    # fewer samples than k: padded exactly like exact_knn; unknown identities are never "different"
    small, _ = build_knn_graph(ArraySource(z[:3]), 5, IndexConfig(), progress=False)
    ref = exact_knn(torch.from_numpy(z[:3]), 5)
    assert torch.equal(small.ids, ref.ids) and (small.ids[:, 2:] == -1).all() and (small.sims[:, 2:] == 0).all()
    assert not small.different_identity.any()


def test_dataset_artifact_and_cli_use_the_builder(tmp_path):
    """The neighbour table of a prepared dataset (memory-mapped beside its index) is FAISS's exact
    graph, built by the `index` verb or on first use."""
    from pogdiff.cli import main
    from pogdiff.data.dataset import Dataset, neighbour_table, neighbours_dir
    from pogdiff.data.shards import FORMAT

    n = 90
    emb = torch.randn(n, 24)
    ident = torch.arange(n) // 9
    root = tmp_path / "ds"
    root.mkdir()
    np.save(root / "image_emb.npy", emb.numpy())
    np.save(root / "identities.npy", ident.numpy())
    (root / "dataset.json").write_text(json.dumps({"format": FORMAT, "num_samples": n, "shards": []}))
    cfg = load_config(None, [f"output_dir={tmp_path}", "method.k=4"])
    ds = Dataset(root)
    ref = exact_knn(emb, 4, ident)
    table = neighbour_table(cfg, ds, progress=False)
    assert torch.equal(table.ids, ref.ids) and torch.equal(table.different_identity, ref.different_identity)
    assert isinstance(np.load(neighbours_dir(cfg, ds) / "ids.npy", mmap_mode="r"), np.memmap)
    (neighbours_dir(cfg, ds) / "stats.json").unlink()
    (neighbours_dir(cfg, ds) / "ids.npy").unlink()
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("method:\n  k: 4\n")
    assert main(["index", str(cfg_file), f"data.source={root}"]) == 0
    written = neighbour_table(cfg, ds, progress=False)
    assert torch.equal(written.ids, ref.ids)
    torch.testing.assert_close(written.sims, ref.sims)


def test_table_goes_to_memory_mapped_files_batch_by_batch(tmp_path):
    """With an output folder, the graph's (N, k) columns are never allocated in this process: the
    batches are written into memory-mapped files (tracemalloc sees numpy's allocations, not maps)."""
    import tracemalloc

    n, k = 10_000, 40
    x, labels = clustered_embeddings(n, 8, seed=7)
    src = ArraySource(x, labels)
    table_bytes = n * k * (8 + 4 + 1)
    icfg = IndexConfig(batch_size=100)  # per-batch arrays: ~100 x (k+1) x 8 B, each
    peaks, tables = {}, {}
    for name, out in (("memory", None), ("files", tmp_path / "table")):
        tracemalloc.start()
        tables[name], stats = build_knn_graph(src, k, icfg, root=tmp_path / name, out=out, progress=False)
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert stats["kind"] == "flat"
    assert peaks["memory"] >= table_bytes and peaks["files"] < table_bytes / 4, (peaks, table_bytes)
    for column in ("ids", "sims", "different_identity"):
        assert torch.equal(getattr(tables["memory"], column), getattr(tables["files"], column))
    rows = np.arange(0, n, 50)  # every 50th row against all, by numpy: the exact top-k similarities
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = z[rows] @ z.T
    s[np.arange(len(rows)), rows] = -np.inf
    np.testing.assert_allclose(tables["files"].sims[rows].numpy(), -np.sort(-s, axis=1)[:, :k], atol=1e-5)


def test_missing_faiss_names_the_extras():
    import subprocess
    import sys

    code = "import sys; sys.modules['faiss'] = None\nimport pogdiff.dist.neighbour_service"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "FAISS is not installed: pip install 'pogdiff[cpu]', or 'pogdiff[gpu]'" in out.stderr


def test_index_choice_follows_faiss_guidelines():
    icfg = IndexConfig()
    assert choose_index(50_000, 768, icfg, gpu=False).factory == "Flat"
    ivf = choose_index(500_000, 768, icfg, gpu=False)
    assert ivf.factory == "IVF4096,Flat" and ivf.train_size == 40 * 4096  # 4*sqrt(N) -> 2829 -> 2^12
    assert choose_index(10_000_000, 768, icfg, gpu=True).factory == "IVF16384,Flat"  # 4*sqrt(1e7) = 12649
    assert choose_index(300_000_000, 768, icfg, gpu=False).factory == "IVF131072_HNSW32,Flat"
    assert choose_index(300_000_000, 768, icfg, gpu=True).factory == "IVF131072,Flat"
    pq = choose_index(20_000_000, 768, IndexConfig(memory_gb=16), num_shards=2, gpu=True)  # 28.6 GiB per shard
    assert pq.factory == "IVF32768,PQ96np" and pq.kind == IndexType.ivfpq
    assert choose_index(1000, 768, IndexConfig(type=IndexType.ivf, nlist=256)).factory == "IVF25,Flat"  # >= 39 per list


# made-up clusters: Ray's logical CPUs and GPUs per node, its schedulable memory, each GPU's memory
def gpu_node(gpus: int = 8, gpu_gib: float = 80, cpus: int = 64, gib: float = 900) -> NodeResources:
    return NodeResources(cpus=cpus, gpus=gpus, memory=gib * GiB, gpu_memory=gpu_gib * GiB)


def cpu_node(cpus: int = 32, gib: float = 200) -> NodeResources:
    return NodeResources(cpus=cpus, gpus=0, memory=gib * GiB)


def fits(plan, nodes) -> bool:
    """Whether the plan's actors can all be placed: per node, how many fit by each resource (the reference)."""
    per_node = [min(nd.gpus // plan.gpus if plan.gpus else 10**9, nd.cpus // plan.cpus if plan.cpus else 10**9,
                    nd.memory // plan.memory) for nd in nodes]
    return sum(per_node) >= plan.shards


def test_shards_follow_the_gpus_each_node_has():
    n, dim = 10**8, 768
    four_by_eight = [gpu_node() for _ in range(4)]
    plan = plan_shards(four_by_eight, n, dim, IndexConfig())
    assert (plan.shards, plan.gpus, plan.cpus) == (4, 8, 64) and fits(plan, four_by_eight)
    # 10^8 x 768 over 4 shards of 8 x 80 GiB GPUs: full vectors (2.5e7 x 3080 B = 72 GiB) fit: IVF
    assert plan.index.kind == IndexType.ivf and plan.memory >= plan.index.bytes_per_shard
    # one actor per node at most 8 GPUs, whatever the cluster's total (32)
    assert plan_shards(four_by_eight, n, dim, IndexConfig(shards=1)).gpus == 8
    six = plan_shards(four_by_eight, n, dim, IndexConfig(shards=6))
    assert (six.shards, six.gpus, six.cpus) == (6, 4, 32) and fits(six, four_by_eight)
    # mixed nodes: parts as large as the smallest GPU node; a CPU-only node takes no GPU shard
    mixed = [gpu_node(8), gpu_node(4, cpus=16), cpu_node()]
    plan = plan_shards(mixed, 10**6, dim, IndexConfig())
    assert (plan.shards, plan.gpus, plan.cpus) == (3, 4, 16) and fits(plan, mixed)
    # more shards than GPUs: they share GPUs in fractions Ray accepts
    shared = plan_shards([gpu_node(2)], 10**5, dim, IndexConfig(shards=3))
    assert shared.shards == 3 and shared.gpus == 0.5 and fits(shared, [gpu_node(2)])
    # CPU nodes: one shard per node; CPU shards on GPU nodes when asked (a service beside training)
    cpu = plan_shards([cpu_node(32), cpu_node(32)], 10**6, dim, IndexConfig())
    assert (cpu.shards, cpu.gpus, cpu.cpus) == (2, 0, 32)
    beside = plan_shards(four_by_eight, 10**6, dim, IndexConfig(gpus_per_shard=0, cpus_per_shard=4))
    assert (beside.shards, beside.gpus, beside.cpus) == (4, 0, 4)
    uneven = [cpu_node(32), cpu_node(4)]
    plan = plan_shards(uneven, 10**6, dim, IndexConfig())
    assert plan.shards == 2 and fits(plan, uneven) and plan.cpus == 16  # both on the big node beats 4 CPUs each


def test_index_type_follows_the_memory_a_shard_has():
    n, dim = 10**8, 768
    one_node = [gpu_node(8, gpu_gib=40)]  # 320 GiB of GPU memory < 10^8 x 768 fp32 (286 GiB) / 0.75
    plan = plan_shards(one_node, n, dim, IndexConfig())
    assert plan.index.kind == IndexType.ivfpq and plan.index.factory.endswith(",PQ96np")
    assert plan.index.bytes_per_shard == pytest.approx(n * (96 + 8), rel=0.03)  # codes and ids: ~10 GB
    big_cpu = [cpu_node(64, gib=256)]
    assert plan_shards(big_cpu, n, dim, IndexConfig()).index.kind == IndexType.ivfpq
    small = plan_shards(big_cpu, 20_000, dim, IndexConfig())
    assert small.index.kind == IndexType.flat and small.memory < GiB  # the actor reserves what its index needs
    assert plan_shards(big_cpu, 10**6, dim, IndexConfig()).index.kind == IndexType.ivf  # 2.9 GiB fits


def test_requests_larger_than_the_nodes_are_config_errors():
    nodes = [gpu_node() for _ in range(4)]
    n, dim = 10**6, 768
    with pytest.raises(ConfigError, match=r"index\.gpus_per_shard=16 is more GPUs than any node has \(4 alive nodes: 4 x \(8 GPUs"):
        plan_shards(nodes, n, dim, IndexConfig(gpus_per_shard=16))
    with pytest.raises(ConfigError, match=r"index\.cpus_per_shard=128 is more CPUs than any node has .*64 CPUs"):
        plan_shards(nodes, n, dim, IndexConfig(cpus_per_shard=128))
    with pytest.raises(ConfigError, match=r"index\.shards=5, index\.gpus_per_shard=8: 5 shard actors .* which take 4"):
        plan_shards(nodes, n, dim, IndexConfig(shards=5, gpus_per_shard=8))
    with pytest.raises(ConfigError, match=r"index\.memory_gb=2000 is more than a shard has"):
        plan_shards(nodes, n, dim, IndexConfig(memory_gb=2000))
    with pytest.raises(ConfigError, match=r"index\.type=flat does not fit"):
        plan_shards([cpu_node(gib=8)], 10**7, dim, IndexConfig(type=IndexType.flat))
    with pytest.raises(ConfigError, match=r"even as IVF-PQ codes"):
        plan_shards([cpu_node(gib=1)], 10**9, dim, IndexConfig())


def test_cluster_nodes_read_the_embedded_ray_and_a_gpu_shard_actor_builds(tmp_path, ray_local):
    """The nodes as Ray reports them (2 logical GPUs declared here), and a build whose shard actor
    asks for those GPUs: scheduled, and the same graph as in-process."""
    (node,) = cluster_nodes()
    assert (node.cpus, node.gpus) == (2, 2) and node.memory == ray.nodes()[0]["Resources"]["memory"]
    x, labels = clustered_embeddings(1500, 16, seed=6)
    planned, st = build_knn_graph(ArraySource(x, labels), 5, IndexConfig(name="nb-gpu", actor_min_n=0), root=tmp_path / "gpu",
                                  progress=False)
    assert st["actors"] and st["shards"] == 1 and st["gpus"] == 2 and st["kind"] == "flat"
    assert torch.equal(planned.ids, exact_knn(torch.from_numpy(x), 5).ids)
    with pytest.raises(ConfigError, match=r"index\.gpus_per_shard=4 is more GPUs than any node has \(1 alive node: 1 x \(2 GPUs"):
        build_knn_graph(ArraySource(x, labels), 5, IndexConfig(name="nb-gpu", actor_min_n=0, gpus_per_shard=4),
                        root=tmp_path / "gpu", progress=False)


def test_ivf_recall_meets_target_on_clustered_data(tmp_path):
    # the benchmark's data (d=768, spread 2: top-10 cosine ~0.3) at a small N
    x, labels = clustered_embeddings(8000, 768, spread=2.0, seed=1)
    table, stats = build_knn_graph(ArraySource(x, labels), 10, IndexConfig(type=IndexType.ivf), root=tmp_path,
                                   progress=False)
    assert stats["index"] == "IVF205,Flat" and stats["nprobe"] == 16  # 4*sqrt(N) lists, capped at N/39
    ref = exact_knn(torch.from_numpy(x), 10)
    full = overlap(table.ids, ref.ids)
    assert full >= 0.95, full
    assert abs(stats["recall_at_k"] - full) < 0.02  # the printed sample estimate agrees with the full graph
    z = torch.nn.functional.normalize(torch.from_numpy(x))
    torch.testing.assert_close(table.sims, (z[:, None, :] * z[table.ids]).sum(-1), atol=1e-5, rtol=0)


def test_stored_index_is_reused_only_for_the_same_data(tmp_path):
    x, labels = clustered_embeddings(2000, 32, seed=5)
    first, st1 = build_knn_graph(ArraySource(x, labels), 5, IndexConfig(type=IndexType.ivf, nprobe=2), root=tmp_path,
                                 progress=False)
    again, st2 = build_knn_graph(ArraySource(x, labels), 5, IndexConfig(type=IndexType.ivf, nprobe=51), root=tmp_path,
                                 progress=False)  # nprobe is a search-time setting: 51 = every list, exact
    assert not st1["reused"] and st2["reused"] and st2["nprobe"] == 51
    assert torch.equal(again.ids, exact_knn(torch.from_numpy(x), 5).ids) and st2["recall_at_k"] == 1.0
    _, st3 = build_knn_graph(ArraySource(x[::-1].copy(), labels), 5, IndexConfig(type=IndexType.ivf), root=tmp_path,
                             progress=False)
    assert not st3["reused"]


def test_ivfpq_builds_and_ranks(tmp_path):
    x, labels = clustered_embeddings(12_000, 32, seed=2)
    table, stats = build_knn_graph(ArraySource(x, labels), 10, IndexConfig(type=IndexType.ivfpq), root=tmp_path,
                                   progress=False)
    assert stats["index"].endswith(",PQ4np")
    assert stats["recall_at_k"] > 0.3  # 4 bytes per vector: approximate, but far above chance (10/12000)
    assert (table.ids != torch.arange(len(x))[:, None]).all()  # never itself


def test_sharded_equals_unsharded(tmp_path, ray_local):
    x, labels = clustered_embeddings(3000, 32, seed=3)
    src = ArraySource(x, labels)
    for kind in (IndexType.flat, IndexType.ivf):
        one, st1 = build_knn_graph(src, 8, IndexConfig(type=kind), root=tmp_path / f"one-{kind.value}", progress=False)
        table = tmp_path / f"table-{kind.value}"
        three, st3 = build_knn_graph(src, 8, actor_cfg("nb-sharded", type=kind, shards=3, batch_size=700),
                                     root=tmp_path / f"three-{kind.value}", out=table, progress=False)
        assert not st1["actors"] and st3["actors"] and st3["shards"] == 3
        # written into the table's files (temp names renamed), and read back memory-mapped
        assert sorted(p.name for p in table.iterdir()) == ["different_identity.npy", "ids.npy", "sims.npy"]
        assert isinstance(np.load(table / "ids.npy", mmap_mode="r"), np.memmap)
        assert torch.equal(three.ids, one.ids), kind
        torch.testing.assert_close(three.sims, one.sims)
        assert torch.equal(three.different_identity, one.different_identity)
    assert sorted(p.name for p in (tmp_path / "three-flat").iterdir()) == ["shard-0", "shard-1", "shard-2"]


def test_service_online_add_restart_and_bad_queries(tmp_path, ray_local):
    x, labels = clustered_embeddings(2000, 48, seed=4)
    icfg = actor_cfg("nb-test", shards=2, type=IndexType.flat)
    build_knn_graph(ArraySource(x, labels), 5, icfg, root=tmp_path, progress=False)
    svc = NeighbourService.start(tmp_path, icfg)  # loads the shards the build wrote
    try:
        assert [i["ntotal"] for i in svc.info()] == [1000, 1000]
        ids, sims, idents = svc.search(x[:50], 5, exclude=np.arange(50))
        ref, ref_sims = numpy_knn(x, 5)
        assert (ids == ref[:50]).all() and (idents == labels[ids]).all()
        np.testing.assert_allclose(sims, ref_sims[:50], rtol=1e-5, atol=1e-6)

        # online: a training worker finds the live service by name, adds new samples, looks them up
        @ray.remote(num_cpus=0.5)
        def worker(vectors, ident):
            client = NeighbourService.connect("nb-test", "pogdiff")
            new = client.add(vectors, ident)
            return new, client.search(vectors, 3, exclude=new)

        new_vecs = x[[7, 1500]] + 0.01 * np.random.default_rng(0).standard_normal((2, 48)).astype(np.float32)
        new_ids, (nids, _, nident) = ray.get(worker.remote(new_vecs, [123, 456]))
        assert new_ids.tolist() == [2000, 2001]
        assert nids[:, 0].tolist() == [7, 1500] and nident[:, 0].tolist() == labels[[7, 1500]].tolist()
        ids_with_new, _, idents_new = svc.search(x[[7]], 2, exclude=[7])
        assert ids_with_new[0, 0] == 2000 and idents_new[0, 0] == 123

        # a killed shard is restarted by Ray and reloads its index (and the online additions) from disk
        before = svc.search(x[100:140], 5)
        for shard in svc.shards:
            ray.kill(shard, no_restart=False)
        after = svc.search(x[100:140], 5)
        for a, b in zip(before, after):
            np.testing.assert_array_equal(a, b)
        assert svc.search(x[[7]], 2, exclude=[7])[0][0, 0] == 2000
        assert [i["ntotal"] for i in svc.info()] == [1000, 1002]

        # bad query vectors: a clear ValueError at the caller, and the service keeps answering
        bad = x[:4].copy()
        bad[2, 5] = np.nan
        with pytest.raises(ValueError, match=r"rows \[2\]"):
            svc.search(bad, 3)
        with pytest.raises(ValueError, match=r"dimension 47, expected 48"):
            svc.search(x[:3, :47], 3)
        with pytest.raises(ValueError, match=r"row 1 has shape \(47,\), expected \(48,\)"):
            svc.search([x[0], x[1, :47]], 3)
        with pytest.raises(ValueError, match=r"added vectors has NaN"):
            svc.add(bad)
        assert np.array_equal(svc.search(x[100:140], 5)[0], before[0])
    finally:
        svc.shutdown()
    with pytest.raises(ValueError, match="no neighbour service 'nb-test'"):
        NeighbourService.connect("nb-test", "pogdiff")


@pytest.mark.slow
def test_shard_actors_killed_from_outside_mid_build_and_mid_search_change_nothing(tmp_path, ray_local):
    """SIGKILL, from outside, to a shard actor's process while it fills its index and to another
    while it answers the graph's queries: Ray restarts each (it reloads its saved index) and retries
    the call; the graph equals an uninterrupted build's."""
    from faults import always, killing

    x, labels = clustered_embeddings(120_000, 64, seed=8)
    here, _ = build_knn_graph(ArraySource(x, labels), 5, actor_cfg("nb-straight", shards=2, type=IndexType.ivf),
                              root=tmp_path / "straight", progress=False)
    with killing({"ray::ShardIndex.build": always, "ray::ShardIndex.search_rows_in_parts": always}) as killed:
        there, stats = build_knn_graph(ArraySource(x, labels), 5, actor_cfg("nb-kill", shards=2, type=IndexType.ivf),
                                       root=tmp_path / "ray", progress=False)
    assert stats["actors"] and stats["shards"] == 2 and not stats["reused"]
    assert set(killed) == {"ray::ShardIndex.build", "ray::ShardIndex.search_rows_in_parts"}, killed
    for name in ("ids", "sims", "different_identity"):
        torch.testing.assert_close(getattr(there, name), getattr(here, name))


def test_an_ivf_shard_takes_the_bytes_of_its_rows_not_a_grown_vector_of_them():
    """Its lists are sized before the rows go in, so the shard fits the memory its plan asks Ray for
    (without: 1.5x the rows' bytes here)."""
    import ctypes

    import psutil

    from pogdiff.dist.neighbour_service import ShardIndex, index_spec

    def resident_after_freeing() -> int:  # what the process holds, not what glibc keeps for reuse
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return psutil.Process().memory_info().rss

    n, dim = 150_000, 64
    x, labels = clustered_embeddings(n, dim, seed=5)
    source = ArraySource(x, labels)
    spec = index_spec(IndexType.ivf, n, dim, IndexConfig(nlist=512))
    shard = ShardIndex(None)
    trained = shard.train(source, spec)
    before = resident_after_freeing()
    shard.build(source, 0, n, spec, trained)
    grown = resident_after_freeing() - before
    data = n * (dim * 4 + 8)  # vectors and ids: 38 MB
    assert grown < 1.15 * data, f"{grown / 2**20:.0f} MB for {data / 2**20:.0f} MB of lists"
    _, ids, _ = shard.search(x[:50], 5)
    assert (ids[:, 0] == np.arange(50)).all()  # each vector finds itself first
