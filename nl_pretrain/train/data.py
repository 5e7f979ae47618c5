"""Where training batches come from: a prepared dataset (data_pipeline) or the built-in byte corpus."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from nl_pretrain.train.byte_corpus import ByteCorpus


@dataclass
class DataSource:
    vocab_size: int
    train: Iterator[dict]
    make_val: Callable[[], Iterator[dict]]
    description: str
    state: Callable[[], dict]
    loader: Optional[object] = None
    skipped: Callable[[], int] = lambda: 0      # unreadable samples replaced by padding (data.skip_corrupt)


def build_data(d, micro_batch_size: int, seed: int, dp_rank: int = 0, dp_size: int = 1,
               state: Optional[dict] = None) -> DataSource:
    """Training batches (and a held-out iterator factory) of the data section ``d``; ``state`` (a
    checkpoint's data state, a global position) continues where that run stopped, whatever its
    data-parallel size was."""
    if d.dataset:
        if not Path(d.dataset).is_dir():
            raise FileNotFoundError(f"data.dataset '{d.dataset}' does not exist; prepare it first with "
                                    f"`nl-pretrain prepare-data --out {d.dataset}` or leave data.dataset empty "
                                    f"for the built-in byte corpus")
        from data_pipeline import TokenLoader
        from data_pipeline.manifest import load_manifest
        load_manifest(d.dataset)                  # a missing or unfinished dataset: its own message
        train = TokenLoader(d.dataset, "train", micro_batch_size, dp_rank, dp_size, seed=seed,
                            num_workers=d.num_workers, loop=True, verify=d.verify == "full",
                            skip_corrupt=d.skip_corrupt)
        if train.seq_len != d.seq_len:
            raise ValueError(f"data.seq_len ({d.seq_len}) differs from the dataset's seq_len ({train.seq_len}) "
                             f"in {d.dataset}; set --data.seq_len={train.seq_len} or prepare the data again")
        if state is not None:
            train.load_state_dict(state)

        def make_val():
            return iter(TokenLoader(d.dataset, "val", micro_batch_size, dp_rank, dp_size, seed=seed, loop=False,
                                    skip_corrupt=d.skip_corrupt))
        skipped = {"n": 0}

        def counted():
            for batch in train:
                skipped["n"] += int(batch.pop("skipped", 0))
                yield batch
        return DataSource(train.vocab_size, counted(), make_val,
                          f"dataset {d.dataset} ({train.num_samples} train sequences of {train.seq_len})",
                          train.state_dict, loader=train, skipped=lambda: skipped["n"])
    tr = ByteCorpus(d.source, "train", d.seq_len, d.val_fraction, d.max_documents)
    va = ByteCorpus(d.source, "val", d.seq_len, d.val_fraction, d.max_documents) if d.val_fraction > 0 else None
    start = 0
    if state is not None:
        if state.get("seed", seed) != seed:
            raise ValueError(f"the checkpoint's data order was drawn with seed {state.get('seed')}, this run's "
                             f"is {seed}; resume with --train.seed={state.get('seed')}")
        start = int(state["samples_consumed"])
    consumed = {"samples": start}

    def train_iter():
        for batch in tr.batches(micro_batch_size, seed, start_sample=start):
            consumed["samples"] = batch.pop("samples_consumed")
            yield batch

    def make_val():
        if va is None:
            return iter(())
        return ({k: v for k, v in b.items() if k != "samples_consumed"}
                for b in va.batches(micro_batch_size, seed, loop=False))
    desc = (f"byte corpus '{d.source}': {tr.num_documents} train documents, {tr.num_windows} sequences of "
            f"{d.seq_len} ({tr.dropped_tokens} tail tokens unused)")
    return DataSource(tr.vocab_size, train_iter(), make_val, desc,
                      lambda: {"samples_consumed": consumed["samples"], "seed": seed})
