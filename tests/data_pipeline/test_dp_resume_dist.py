"""Resume across DP sizes with real processes (torch.multiprocessing + gloo): 2 ranks -> 1 rank -> 2 ranks
continue one global sample sequence, nothing repeated or skipped, across epoch boundaries."""
import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from data_pipeline import TokenLoader, prepare_dataset
from dp_corpus import write_text_corpus

SEED = 11


def _rank_main(rank, world, dataset, batch, steps, state_in, out_dir, init_file, num_workers):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    loader = TokenLoader(dataset, "train", batch, rank, world, seed=SEED, num_workers=num_workers,
                         return_indices=True)
    if state_in:
        loader.load_state_dict(json.loads(Path(state_in).read_text()))
    got = []
    for step, b in zip(range(steps), loader):
        rows = [torch.zeros_like(b["indices"]) for _ in range(world)]
        dist.all_gather(rows, b["indices"])                  # the global batch of this step, in rank order
        got.append(torch.cat(rows).tolist())
        assert b["input_ids"].shape == (batch, loader.seq_len)
    states = [None] * world
    dist.all_gather_object(states, loader.state_dict())
    if rank == 0:
        assert all(s == states[0] for s in states), states
        Path(out_dir, "result.json").write_text(json.dumps({"steps": got, "state": states[0]}))
    dist.barrier()
    dist.destroy_process_group()


def run_layout(tmp_path, name, dataset, world, batch, steps, state_in=None, num_workers=0):
    out = tmp_path / name
    out.mkdir()
    mp.spawn(_rank_main, args=(world, dataset, batch, steps, state_in, str(out), str(out / "init"), num_workers),
             nprocs=world, join=True)
    res = json.loads((out / "result.json").read_text())
    (out / "state.json").write_text(json.dumps(res["state"]))
    return [i for step in res["steps"] for i in step], res["state"], str(out / "state.json")


@pytest.mark.slow
def test_two_ranks_one_rank_two_ranks_continue_one_sequence(tmp_path):
    corpus = write_text_corpus(tmp_path / "corpus", n_docs=25, max_words=120)
    ds = str(tmp_path / "ds")
    prepare_dataset(str(corpus), ds, vocab_size=350, seq_len=32, val_fraction=0.0, shard_samples=5, workers=0,
                    progress=False)
    straight = TokenLoader(ds, "train", 4, seed=SEED, return_indices=True)
    N = straight.num_samples
    ref = [i for _, b in zip(range(3 * N // 4 + 2), straight) for i in b["indices"].tolist()]

    a, state_a, path_a = run_layout(tmp_path, "two", ds, world=2, batch=3, steps=9, num_workers=1)
    assert state_a["samples_consumed"] == 54 and a == ref[:54]
    b, state_b, path_b = run_layout(tmp_path, "one", ds, world=1, batch=4, steps=N // 4, state_in=path_a)
    assert state_b["samples_consumed"] == 54 + 4 * (N // 4) and b == ref[54:state_b["samples_consumed"]]
    c, state_c, _ = run_layout(tmp_path, "again", ds, world=2, batch=5, steps=6, state_in=path_b)
    end = state_b["samples_consumed"] + 60
    assert state_c["samples_consumed"] == end and c == ref[state_b["samples_consumed"]:end]
    assert end > 2 * N and state_c["epoch"] == end // N                # the sequence crossed epoch boundaries
    seen = a + b + c
    assert sorted(seen[:N]) == list(range(N)) and sorted(seen[N:2 * N]) == list(range(N))
