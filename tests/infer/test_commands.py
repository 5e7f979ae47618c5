"""``nl-pretrain generate`` / ``eval`` on a real (briefly trained) checkpoint and its export."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from nl_pretrain.cli import main
from nl_pretrain.config import load_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Tiny HOPE trained 2 steps on the built-in byte corpus, in this process (checkpoint at the end)."""
    from nl_pretrain.train.loop import train
    root = tmp_path_factory.mktemp("infer")
    cfg = load_config(None, ["--model.preset=hope-tiny", "--model.d_model=32", "--model.n_heads=2",
                             "--model.vocab_size=259", "--model.n_layers=1", "--data.seq_len=32",
                             "--data.max_documents=20", "--data.val_fraction=0.3", "--train.steps=2",
                             "--train.micro_batch_size=2", "--train.eval_every=2", "--train.eval_batches=1",
                             "--train.progress=false", "--train.threads=1", f"--train.run_dir={root / 'run'}"])
    train(cfg)
    text = root / "text"
    text.mkdir()
    src = Path(json.__file__).parent                     # two real text files: json/__init__.py, decoder.py
    for f in ("__init__.py", "decoder.py"):
        shutil.copy(src / f, text / f)
    return root


def test_generate_streams_text_and_reports_speed_and_state(run, capsys):
    ck = run / "run" / "checkpoints"
    assert main(["generate", "--checkpoint", str(ck), "--prompt", "def ", "--max-new-tokens", "8",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    from nl_pretrain.infer import Session
    s = Session.load(str(ck))
    greedy = s.generate(["def "], max_new_tokens=8, temperature=0.0)
    assert out.startswith("def " + greedy.texts[0] + "\n-- "), out      # the prompt, then the streamed text
    assert "tokens/s" in out and f"state {greedy.state_bytes:,} bytes per sequence (constant in the context)" in out


def test_export_carries_the_tokenizer_and_loads_to_the_same_logits(run, capsys):
    ck, out = run / "run" / "checkpoints", run / "export"
    assert main(["export", "--checkpoint", str(ck), "--out", str(out)]) == 0
    assert "tokenizer.json" in capsys.readouterr().out
    from nl_pretrain.infer import Session
    a, b = Session.load(str(ck), dtype=torch.float64), Session.load(str(out), dtype=torch.float64)
    ids = torch.tensor([a.encode_prompt("import sys\nprint(sys.argv)")])
    assert torch.equal(a.prefill(ids)[0], b.prefill(ids)[0])
    assert b.tokenizer.decode(b.tokenizer.encode("héllo ✓")) == "héllo ✓"
    # an export without a tokenizer (made before they were carried): one error line naming the fix
    old = run / "old-export"
    shutil.copytree(out, old)
    (old / "tokenizer.json").unlink()
    assert main(["generate", "--checkpoint", str(old), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: export {old} carries no tokenizer") and "pass --tokenizer" in err
    assert err.count("\n") == 1
    (run / "prompt.txt").write_text("import x\n")
    assert main(["generate", "--checkpoint", str(old), "--prompt-file", str(run / "prompt.txt"),
                 "--max-new-tokens", "2", "--tokenizer", "bytes"]) == 0
    assert capsys.readouterr().out.startswith("import x\n")


def test_eval_writes_loss_positions_and_passkey(run, capsys):
    ck, out = run / "run" / "checkpoints", run / "eval"
    assert main(["eval", "--checkpoint", str(ck), "--text", str(run / "text"), "--seq-len", "32",
                 "--max-batches", "2", "--batch-size", "2", "--tasks", "loss,passkey", "--passkey-lengths", "128,200",
                 "--passkey-trials", "2", "--out", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert (out / "positions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h = report["heldout"]
    assert h["sequences"] == 4 and sum(b["tokens"] for b in h["buckets"]) == h["tokens"]
    assert [b["start"] for b in h["buckets"]] == [0, 1, 2, 4, 8, 16]
    # the same windows through the model's own training loss
    from nl_pretrain.eval.heldout import batched, text_windows
    from nl_pretrain.infer import Session
    s = Session.load(str(ck))
    rows = list(batched(text_windows(str(run / "text"), s.tokenizer, 32), 4))[0]
    with torch.no_grad():
        ref = float(s.model.loss(rows["input_ids"], rows["labels"], rows["doc_ids"]))
    assert abs(h["loss"] - ref) < 1e-5
    assert [r["length"] for r in report["passkey"]["lengths"]] == [128, 200]
    assert all(r["prompt_tokens"] in (128, 200) and 0 <= r["accuracy"] <= 1 for r in report["passkey"]["lengths"])
    assert "held-out loss" in capsys.readouterr().out


def test_eval_unknown_task_is_one_error_line(run, capsys):
    assert main(["eval", "--checkpoint", str(run / "run" / "checkpoints"), "--tasks", "loss,mmlu"]) == 2
    assert capsys.readouterr().err == ("error: --tasks loss,mmlu: unknown task mmlu; choose from loss, passkey\n")


def test_checkpoint_without_tokenizer_names_the_fix(run, capsys):
    """A checkpoint as written before checkpoints carried the tokenizer (common.pt without it, index updated)."""
    import hashlib
    src = next((run / "run" / "checkpoints").glob("step-*"))
    old = run / "old-ckpt" / src.name
    shutil.copytree(src, old)
    common = torch.load(old / "common.pt", weights_only=False)
    assert common["tokenizer"]["source"] == "byte corpus"
    del common["tokenizer"]
    torch.save(common, old / "common.pt")
    index = json.loads((old / "index.json").read_text())
    data = (old / "common.pt").read_bytes()
    index["files"]["common.pt"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (old / "index.json").write_text(json.dumps(index))
    assert main(["generate", "--checkpoint", str(old), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    assert capsys.readouterr().err == (
        f"error: checkpoint {old} carries no tokenizer (written before checkpoints carried one); pass --tokenizer "
        f"with the prepared dataset directory it was trained on, its tokenizer.json, or 'bytes' for the built-in "
        f"byte corpus\n")


def test_a_prepared_dataset_s_tokenizer_is_what_checkpoints_carry(tmp_path):
    from data_pipeline.tokenizer import train_bpe
    from nl_pretrain.config import DataConfig
    from nl_pretrain.infer.tokenizer import run_tokenizer_record
    (tmp_path / "tokenizer.json").write_text(train_bpe(["def f(x): return x\n"] * 20, 300, 1))
    rec = run_tokenizer_record(DataConfig(dataset=str(tmp_path)))
    assert rec["json"] == (tmp_path / "tokenizer.json").read_text()
    assert run_tokenizer_record(DataConfig(dataset=str(tmp_path / "gone"))) is None
