"""A prepare-data process killed with SIGKILL mid-write: no manifest, no partial shard under a final
name, and a re-run recovers (atomic temp-name-then-rename writes, manifest last)."""
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import TokenLoader, prepare_dataset, verify_dataset
from data_pipeline.manifest import ManifestError
from dp_corpus import write_text_corpus

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_killed_process_never_leaves_a_partial_shard_visible(tmp_path):
    src = write_text_corpus(tmp_path / "big", n_docs=300, max_words=2000)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "nl_pretrain.cli", "prepare-data", "--source", str(src), "--out", str(out),
           "--vocab-size", "300", "--seq-len", "16", "--shard-samples", "4", "--workers", "0", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(out.glob("train-*.tar"))) < 20:
        time.sleep(0.01)
    assert proc.poll() is None, f"prepare finished or failed before it could be killed: {proc.stderr.read()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    tars = sorted(out.glob("train-*.tar"))
    assert len(tars) >= 20
    for t in tars:                                       # every visible shard is whole, with its index
        idx = np.load(t.with_name(t.name[:-4] + ".idx.npy"))
        with tarfile.open(t) as tf:
            assert len(tf.getmembers()) == 2 * (len(idx) - 1)
    with pytest.raises(ManifestError, match="did not finish"):
        TokenLoader(str(out), "train", 2)
    m = prepare_dataset(str(src), str(out), vocab_size=300, seq_len=16, shard_samples=64, workers=0,
                        progress=False, max_documents=30)
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert len(list(out.glob("*.tar"))) == len(m["splits"]["train"]["shards"]) + len(m["splits"]["val"]["shards"])
    verify_dataset(str(out))
