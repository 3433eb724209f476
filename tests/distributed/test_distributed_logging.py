"""Real 2-process gloo groups on the CPU against the single-process run, and the bad-input cases.

Equal "to 1e-5": logs compared by id, curvature statistics (K-FAC factors and eigenvalues, EK-FAC
corrected eigenvalues, the raw Fisher), and influence scores (full matrix by id, top-k by id and
score), all with atol=rtol=1e-5. Sharded scoring must also equal the same store scored by one rank.
"""

import json

import pytest
import torch
from distributed_helpers import (
    BATCH,
    PROJECTS,
    N,
    errors,
    log_project,
    loss_fn,
    make_data,
    make_model,
    query,
    run_group,
    worker_dies,
    worker_disagree,
    worker_equivalence,
)

from analog import AnaLog
from analog.hessian import CurvatureError
from analog.storage import LogStore, LogWriter, StoreError

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """The 2-process DDP run of every project (one process group, ~10 s)."""
    tmp = tmp_path_factory.mktemp("ddp")
    codes = run_group(worker_equivalence, tmp, root=str(tmp / "logs"))
    assert codes == [0, 0], f"exit codes {codes}\n{errors(tmp)}"
    results = [torch.load(tmp / f"result_rank{r}.pt", weights_only=False) for r in range(2)]
    return tmp / "logs", results


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The same projects logged by one process, batches of the same examples."""
    root = tmp_path_factory.mktemp("single")
    batches = [list(range(i, i + BATCH)) for i in range(0, N, BATCH)]
    out = {}
    for name in PROJECTS:
        model = make_model()
        run = log_project(model, batches, root, name)
        q = query(run, model)
        out[name] = {"run": run, "full": run.influence.compute_influence_all(q, progress=False),
                     "top": run.influence.compute_influence_all(q, topk=5, progress=False)}
    return root, out


def _by_id(scores):
    order = sorted(range(len(scores.train_ids)), key=lambda j: scores.train_ids[j])
    return scores.scores[:, order]


@pytest.mark.parametrize("name", list(PROJECTS))
def test_logs_by_id_equal_single_process(ddp_run, single_run, name):
    ddp_store = LogStore(ddp_run[0] / name / "logs")
    one_store = LogStore(single_run[0] / name / "logs")
    assert json.loads((ddp_run[0] / name / "logs" / "store.json").read_text())["world_size"] == 2
    assert sorted(ddp_store.ids) == sorted(one_store.ids) == list(range(N))
    assert ddp_store.ids[: N // 2] == list(range(0, N, 2)), "rank 0's shard reads first, then rank 1's"
    if PROJECTS[name]["compression"].get("init") == "pca":
        return  # PCA eigenvectors may differ in sign from the single-process fit: compared through scores
    for i in range(N):
        a = ddp_store.rows(ddp_store.position(i), ddp_store.position(i) + 1)
        b = one_store.rows(one_store.position(i), one_store.position(i) + 1)
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("name", list(PROJECTS))
def test_projection_and_statistics_equal(ddp_run, single_run, name):
    r0, r1 = ddp_run[1][0][name], ddp_run[1][1][name]
    single = single_run[1][name]["run"]
    assert r0["modules"] == r1["modules"] == sorted(single.modules) == ["0", "2"], "no 'module.' prefix"
    assert r0["fingerprint"] == r1["fingerprint"], "projections identical on every rank"
    assert r0["n_samples"] == r1["n_samples"] == N
    for key in r0["state"]:
        torch.testing.assert_close(r0["state"][key], r1["state"][key], atol=0, rtol=0)  # same on each rank
    if PROJECTS[name]["compression"].get("init") != "pca":
        assert r0["fingerprint"] == single.projector.fingerprint()
    state, ref = r0["state"], single.curvature.state
    for m in ["0", "2"]:
        if name in ("kfac", "ekfac"):
            for key in ("A", "S", "eA", "eS"):
                torch.testing.assert_close(state[f"{m}/{key}"], ref[f"{m}/{key}"], **TOL)
            if name == "ekfac":
                torch.testing.assert_close(state[f"{m}/corrected"], ref[f"{m}/corrected"], **TOL)
        else:  # raw: the Fisher Q diag(e) Qᵀ and its eigenvalues (PCA projections: sign-free quantities)
            torch.testing.assert_close(state[f"{m}/evals"], ref[f"{m}/evals"], **TOL)
    for key, value in state.items():  # raw's eigenvectors are stored in float32, of a float64 fit
        assert value.dtype == (torch.float32 if key.endswith("/evecs") else torch.float64), key
    if name.startswith("raw"):  # one read of the store per group of modules, the same on every rank
        groups = [["0"], ["2"]] if name == "raw_groups" else [["0", "2"]]
        assert r0["reads"] == r1["reads"] == groups


@pytest.mark.parametrize("name", list(PROJECTS))
def test_sharded_influence_equals_single_process(ddp_run, single_run, name):
    for rank_result in ddp_run[1]:
        r = rank_result[name]
        ref = single_run[1][name]
        # sharded == the same store scored by one rank, exactly in order
        assert r["full"].train_ids == r["local"].train_ids
        torch.testing.assert_close(r["full"].scores, r["local"].scores, **TOL)
        # == the single-process run, by id
        torch.testing.assert_close(_by_id(r["full"]), _by_id(ref["full"]), **TOL)
        assert r["full"].query_ids == ref["full"].query_ids
        # top-k merged across ranks: same ids and scores
        assert r["top"].n_train == N
        assert r["top"].helpful_ids == ref["top"].helpful_ids
        assert r["top"].harmful_ids == ref["top"].harmful_ids
        torch.testing.assert_close(r["top"].helpful_scores, ref["top"].helpful_scores, **TOL)
        torch.testing.assert_close(r["top"].harmful_scores, ref["top"].harmful_scores, **TOL)
        assert r["small_top"].helpful_ids == [row[:4] for row in ref["top"].helpful_ids]


def test_appending_to_the_finalized_ddp_project_is_refused_before_writing(ddp_run):
    x, y, _, _ = make_data()
    model = make_model()
    run = AnaLog("kfac", {"root_dir": str(ddp_run[0]), **PROJECTS["kfac"]})
    run.watch(model)
    before = len(run.open_store())
    with pytest.raises(CurvatureError, match="already fitted"):
        with run(data_id=[1000]):
            loss_fn(model(x[:1]), y[:1]).backward()
    assert len(run.open_store()) == before > 0


def test_disagreeing_ranks_get_a_clear_error_not_a_hang(tmp_path):
    codes = run_group(worker_disagree, tmp_path, root=str(tmp_path / "logs"), timeout=60, pg_timeout=15)
    assert codes == [0, 0], f"exit codes {codes}\n{errors(tmp_path)}"
    for rank in range(2):
        messages = torch.load(tmp_path / f"messages_rank{rank}.pt")
        assert "processes disagree on the watched modules" in messages["modules"]
        assert "'modules'" in messages["modules"] and "'compression'" not in messages["modules"]
        # a setting in the config (not only what it builds) is compared, at watch(), by its flattened key
        assert messages["seed"] == ("ranks disagree at watch() on settings that must agree: "
                                    "compression.seed: rank 0: 0, rank 1: 1")
        assert messages["project"] == ("ranks disagree at watch() on settings that must agree: "
                                       "project: rank 0: 'named_by_rank0', rank 1: 'named_by_rank1'")
        assert "processes disagree on what they log" in messages["projection"]
        assert "crc32" in messages["projection"]


def test_rank_that_dies_leaves_what_was_flushed_readable(tmp_path):
    codes = run_group(worker_dies, tmp_path, root=str(tmp_path / "logs"), timeout=60, pg_timeout=10)
    assert codes == [0, 3], f"exit codes {codes}\n{errors(tmp_path)}"
    outcome = (tmp_path / "rank0_outcome.txt").read_text()
    assert outcome.startswith("error"), outcome  # the collective finalize cannot succeed without rank 1
    store = LogStore(tmp_path / "logs" / "dies" / "logs")
    rank0 = list(range(0, N, 2))
    rank1_flushed = list(range(1, N, 2))[: 2 * BATCH]
    assert store.ids == rank0 + rank1_flushed
    assert torch.isfinite(store.rows(0, len(store))).all()


# -- the store's multi-rank layout, without a process group (explicit rank/world_size) ----------------
FIELDS = [{"module": "m", "kind": "grad", "shape": [2]}]


def test_ranks_write_their_own_chunks_and_read_as_one(tmp_path):
    writers = [LogWriter(tmp_path, FIELDS, rank=r, world_size=2, flush_bytes=1) for r in (0, 1)]
    writers[1].write([10, 11], torch.ones(2, 2))
    writers[0].write([0, 1], torch.zeros(2, 2))
    writers[1].write([12], torch.full((1, 2), 2.0))
    for w in writers:
        w.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "chunk_000000.json" in names and "chunk_r001_000000.json" in names and "chunk_r001_000001.bin" in names
    store = LogStore(tmp_path)
    assert store.ids == [0, 1, 10, 11, 12]
    assert store.rows(0, 5)[:, 0].tolist() == [0, 0, 1, 1, 2]


def test_duplicate_id_across_ranks_is_named_at_read_time(tmp_path):
    # ranks writing at the same time cannot see each other's ids: the reader names the duplicate
    writers = [LogWriter(tmp_path, FIELDS, rank=r, world_size=2) for r in (0, 1)]
    for r, w in enumerate(writers):
        w.write([r, 7], torch.zeros(2, 2))
        w.close()
    # a writer opened later sees every rank's ids on disk and refuses them up front
    late = LogWriter(tmp_path, FIELDS, rank=1, world_size=2)
    with pytest.raises(ValueError, match="id 0 is already in store"):
        late.write([0], torch.zeros(1, 2))
    late.close()
    with pytest.raises(StoreError, match=r"holds id 7 twice \(in chunk_000000.json and chunk_r001_000000.json\)"):
        LogStore(tmp_path)


def test_world_size_mismatch_errors(tmp_path):
    LogWriter(tmp_path / "one", FIELDS).close()
    with pytest.raises(StoreError, match="mixing logs from different world sizes"):
        LogWriter(tmp_path / "one", FIELDS, rank=1, world_size=2)
    w = LogWriter(tmp_path / "two", FIELDS, rank=0, world_size=2)
    w.write([0], torch.zeros(1, 2))
    w.close()
    (tmp_path / "two" / "chunk_r002_000000.json").write_text('{"n": 0, "ids": [], "nbytes": 0}')
    (tmp_path / "two" / "chunk_r002_000000.bin").write_bytes(b"")
    with pytest.raises(StoreError, match="world size 2 but holds chunk chunk_r002_000000.json of rank 2"):
        LogStore(tmp_path / "two")


def test_each_rank_holds_its_own_lock(tmp_path):
    a = LogWriter(tmp_path, FIELDS, rank=0, world_size=2)
    b = LogWriter(tmp_path, FIELDS, rank=1, world_size=2)  # another rank: no conflict
    with pytest.raises(StoreError, match=r"writer\.r001\.lock is held"):
        LogWriter(tmp_path, FIELDS, rank=1, world_size=2)
    a.close()
    b.close()
