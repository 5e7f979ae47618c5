"""CheckpointStore: layout, checksums, fallbacks, retention, failure safety, async saves, 2 real ranks."""
import errno
import hashlib
import json
import os
import time

import pytest
import torch

from nl_pretrain.checkpoint import store as store_mod
from nl_pretrain.checkpoint.store import (CheckpointError, CheckpointStore, CheckpointWarning, LocalComm,
                                          snapshot_to_host)
from store_workers import full_disk_open, rank_files, two_rank_scenarios


def files_for(step):
    g = torch.Generator().manual_seed(step)
    base = torch.randn(10, 8, generator=g)
    return {"model.pt": {"w": base, "w_rows": base[2:5], "bf16": torch.randn(33, generator=g).bfloat16(),
                         "ids": torch.randint(0, 1 << 40, (7,), generator=g), "nan": torch.tensor([float("nan")])},
            "extra.pt": {"step": step, "names": ["a", "b"]}}


def bits(t):
    return t.contiguous().view(torch.uint8)


def steps(store):
    return [s for s, _ in store.list()]


def test_round_trip_is_bitwise_and_layout_and_index_are_complete(tmp_path):
    store = CheckpointStore(tmp_path / "ck")
    files = files_for(7)
    store.save(7, files, meta={"config": {"lr": 1e-3}, "tokens": 123})
    path = store.latest()
    assert path == tmp_path / "ck" / "step-00000007"
    assert (tmp_path / "ck" / "latest").read_text().strip() == "step-00000007"
    assert sorted(os.listdir(tmp_path / "ck")) == ["latest", "step-00000007"]          # no temp dir, no .part
    assert sorted(os.listdir(path)) == ["extra.pt", "index.json", "model.pt", "rank-00000.json"]

    loaded = store.read(path, "model.pt")
    for key, tensor in files["model.pt"].items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(bits(loaded[key]), bits(tensor)), key
    assert loaded["w_rows"].untyped_storage().data_ptr() == loaded["w"].untyped_storage().data_ptr()
    assert store.read(path, "extra.pt") == {"step": 7, "names": ["a", "b"]}

    index = store.index(path)
    assert (index["format_version"], index["step"], index["world"]) == (1, 7, 1)
    assert index["meta"] == {"config": {"lr": 1e-3}, "tokens": 123}
    assert set(index["files"]) == {"model.pt", "extra.pt"}
    for name, entry in index["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"rank": 0, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    with pytest.raises(CheckpointError, match="no file 'missing.pt'.*extra.pt, model.pt"):
        store.read(path, "missing.pt")


def test_corrupt_byte_fails_verified_read_and_full_latest_falls_back(tmp_path, capsys):
    store = CheckpointStore(tmp_path, keep_last=0)
    store.save(1, files_for(1))
    store.save(2, files_for(2))
    target = tmp_path / "step-00000002" / "model.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))

    with pytest.raises(CheckpointError, match=r"step-00000002.*'model.pt' is corrupt: sha256"):
        store.read(tmp_path / "step-00000002", "model.pt")
    assert store.latest() == tmp_path / "step-00000002"          # same size: only the "full" check sees it
    store.verify_on_latest = "full"
    with pytest.warns(CheckpointWarning, match=r"step-00000002.*'model.pt' is corrupt"):
        assert store.latest() == tmp_path / "step-00000001"
    assert "step-00000002" in capsys.readouterr().err


def test_missing_file_or_index_is_skipped_with_a_warning(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=0)
    for step in (1, 2, 3):
        store.save(step, files_for(step))
    (tmp_path / "step-00000003" / "extra.pt").unlink()
    with pytest.warns(CheckpointWarning, match=r"step-00000003.*'extra.pt' \(rank 0\) is missing"):
        assert store.latest() == tmp_path / "step-00000002"
    (tmp_path / "step-00000002" / "index.json").unlink()
    with pytest.warns(CheckpointWarning) as caught:
        assert store.latest() == tmp_path / "step-00000001"
    assert any("step-00000002 has no index.json" in str(w.message) for w in caught)
    assert steps(store) == [1]
    (tmp_path / "latest").write_text("step-00000099\n")             # pointer to a directory that is gone
    with pytest.warns(CheckpointWarning) as caught:
        assert store.latest() == tmp_path / "step-00000001"
    assert "step-00000099 (named by" in str(caught[0].message)


def test_temp_dir_of_a_crashed_save_is_ignored_then_cleaned(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=0)
    store.save(1, files_for(1))
    crashed = tmp_path / "step-00000005.tmp-0badc0de"                  # newer step, even has an index
    crashed.mkdir()
    (crashed / "model.pt").write_bytes(b"half")
    (crashed / "index.json").write_text(json.dumps({"format": store_mod.FORMAT, "format_version": 1, "files": {}}))
    os.utime(crashed, (time.time() - 60, time.time() - 60))
    assert store.latest() == tmp_path / "step-00000001"
    assert steps(store) == [1]
    store.save(2, files_for(2))
    assert not crashed.exists()
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-00000001", "step-00000002"]


def test_retention_keeps_newest_and_multiples_of_keep_every(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2, keep_every=5)
    for step in range(1, 13):
        store.save(step, {"x.pt": torch.tensor([step])})
    assert steps(store) == [5, 10, 11, 12]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [f"step-{s:08d}" for s in (5, 10, 11, 12)]
    store.save(3, {"x.pt": torch.tensor([3])})                         # an older step (a resumed run): kept
    assert steps(store) == [3, 5, 10, 11, 12] and store.latest().name == "step-00000003"

    keep_all = CheckpointStore(tmp_path / "all", keep_last=0)
    for step in range(4):
        keep_all.save(step, {"x.pt": torch.tensor([step])})
    assert steps(keep_all) == [0, 1, 2, 3]


def test_saving_a_step_again_replaces_it(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(3, {"x.pt": torch.tensor([1.0])}, meta={"try": 1})
    store.save(3, {"x.pt": torch.tensor([2.0])}, meta={"try": 2})
    assert store.index(store.latest())["meta"] == {"try": 2}
    assert torch.equal(store.read(store.latest(), "x.pt"), torch.tensor([2.0]))
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-00000003"]


def test_disk_full_half_way_keeps_previous_checkpoint(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path, keep_last=1)
    store.save(1, files_for(1))
    pointer = (tmp_path / "latest").read_text()
    monkeypatch.setattr(store_mod, "open", full_disk_open(500, ["model.pt"]), raising=False)
    with pytest.raises(CheckpointError) as info:
        store.save(2, files_for(2))
    message = str(info.value)
    assert "step 2" in message and "'model.pt'" in message and "No space left" in message
    assert "disk" in message and "free space" in message
    assert (tmp_path / "latest").read_text() == pointer
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-00000001"]      # the temp dir is gone
    monkeypatch.undo()
    assert store.latest() == tmp_path / "step-00000001"
    assert torch.equal(store.read(store.latest(), "model.pt")["w"], files_for(1)["model.pt"]["w"])


@pytest.mark.parametrize("step, files, meta, expected", [
    (-1, {"a.pt": 1}, None, "step must be >= 0, got -1"),
    (1, {"sub/a.pt": 1}, None, "'sub/a.pt' must be a plain"),
    (1, {"..": 1}, None, "'..' must be a plain"),
    (1, {"index.json": 1}, None, "'index.json' is reserved"),
    (1, {"a.pt": 1}, {"dtype": torch.float32}, r"meta\['dtype'\] = torch.float32 \(dtype\) is not JSON"),
    (1, {"a.pt": 1}, {"runs": [1, {2: "x"}]}, r"meta\['runs'\]\[1\] has the key 2 \(int\)"),
    (1, {"a.pt": 1}, ["not", "a", "dict"], "meta must be a dict"),
])
def test_bad_requests_fail_before_anything_is_written(tmp_path, step, files, meta, expected):
    store = CheckpointStore(tmp_path / "ck")
    with pytest.raises(CheckpointError, match=expected):
        store.save(step, files, meta=meta)
    assert not (tmp_path / "ck").exists() or os.listdir(tmp_path / "ck") == []


def test_unwritable_root_is_named(tmp_path):
    (tmp_path / "file").write_text("")                                  # works as root, unlike chmod
    with pytest.raises(CheckpointError, match=r"root .*file/ck must be a writable directory"):
        CheckpointStore(tmp_path / "file" / "ck").save(1, {"a.pt": 1})


def test_rank0_times_out_naming_the_missing_rank(tmp_path):
    store = CheckpointStore(tmp_path, rank=0, world=3, comm=LocalComm(), timeout_s=0.3)
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match=r"step 4: rank\(s\) 1, 2 wrote no manifest .*timeout_s=0.3"):
        store.save(4, {"a.pt": 1})
    assert time.monotonic() - t0 < 5
    assert os.listdir(tmp_path) == [] and store.latest() is None


def test_async_save_snapshots_before_returning(tmp_path):
    store = CheckpointStore(tmp_path, async_save=True)
    w = torch.arange(12.0)
    state = {"w": w, "w_view": w[4:8], "nested": [(w * 2,)], "extra": "kept"}
    store.save(5, {"model.pt": state})
    w.add_(100.0)                                                       # the training step right after
    state["nested"][0][0].zero_()
    store.wait()
    loaded = store.read(store.latest(), "model.pt")
    assert torch.equal(loaded["w"], torch.arange(12.0)) and torch.equal(loaded["nested"][0][0], torch.arange(12.0) * 2)
    assert loaded["w_view"].untyped_storage().data_ptr() == loaded["w"].untyped_storage().data_ptr()
    assert store.latest().name == "step-00000005"


def test_snapshot_copies_tensors_and_keeps_structure():
    sd = torch.nn.Linear(3, 2).state_dict()
    snap = snapshot_to_host({"sd": sd, "t": (torch.ones(2), [torch.zeros(1)]), "size": torch.Size([2, 3])})
    assert type(snap["sd"]) is type(sd) and snap["sd"]._metadata == sd._metadata
    weight = snap["sd"]["weight"]
    assert weight.data_ptr() != sd["weight"].data_ptr() and torch.equal(weight, sd["weight"])
    assert isinstance(snap["t"], tuple) and snap["size"] == torch.Size([2, 3])


def test_async_failure_is_raised_at_wait_and_at_next_save(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path, async_save=True)
    store.save(1, {"model.pt": torch.ones(4)})
    store.wait()
    monkeypatch.setattr(store_mod, "open", full_disk_open(10, ["model.pt"]), raising=False)
    store.save(2, {"model.pt": torch.ones(1000)})                      # returns: the error comes later
    with pytest.raises(CheckpointError, match=r"step 2: could not write 'model.pt'.*No space left"):
        store.wait()
    store.wait()                                                        # raised once
    store.save(3, {"model.pt": torch.ones(1000)})
    with pytest.raises(CheckpointError, match="step 3: could not write 'model.pt'"):
        store.save(4, {"model.pt": torch.ones(4)})                       # the failure of step 3; 4 not tried
    monkeypatch.undo()
    assert store.latest().name == "step-00000001"
    store.save(5, {"model.pt": torch.full((4,), 5.0)})
    store.wait()
    assert store.latest().name == "step-00000005" and steps(store) == [1, 5]


def test_two_real_ranks_write_one_checkpoint_and_fail_together(tmp_path):
    from harness import run_distributed
    root = tmp_path / "ck"
    results = run_distributed(two_rank_scenarios, 2, str(root), timeout=120)

    for rank, out in enumerate(results):
        good = out["good"]
        assert good["latest"] == "step-00000001"
        index = good["index"]
        assert index["world"] == 2 and index["meta"] == {"from_rank": 0}    # meta comes from rank 0
        assert {n: e["rank"] for n, e in index["files"].items()} == {
            "model-dp0.pt": 0, "optim-dp0.pt": 0, "model-dp1.pt": 1, "optim-dp1.pt": 1}
        assert {n: e["sha256"] for n, e in index["files"].items()} == good["sha_on_disk"]
        assert torch.equal(good["other_rank_w"], rank_files(1 - rank, 1)[f"model-dp{1 - rank}.pt"]["w"])
        assert out["after_failures"] == {"latest": "step-00000001", "dirs": ["latest", "step-00000001"]}
        assert out["async"]["latest"] == "step-00000004" and out["async"]["w_equal"]
        assert {e["rank"] for e in out["async"]["index"]["files"].values()} == {0, 1}

    r0, r1 = results
    assert "step 2 failed on rank 1" in r0["marked"]["error"] and "optim-dp1.pt" in r0["marked"]["error"]
    assert r0["marked"]["seconds"] < 10                                    # the marker, not the 30 s timeout
    assert "could not write 'optim-dp1.pt'" in r1["marked"]["error"] and "No space left" in r1["marked"]["error"]
    assert "rank(s) 1 wrote no manifest" in r0["silent"]["error"] and "timeout_s=2" in r0["silent"]["error"]
    assert r0["silent"]["seconds"] < 10
    assert "step 3" in r1["silent"]["error"]
    assert "'same.pt' is written by ranks 0 and 1" in r0["duplicate"]
    assert "'same.pt' is written by ranks 0 and 1" in r1["duplicate"] and "reported by rank 0" in r1["duplicate"]
