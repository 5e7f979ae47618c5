"""``nl-pretrain lm-eval``: the real lm-eval command line on a tiny trained HOPE checkpoint, over the
local tasks in tests/eval/tasks (a multiple-choice, a rolling-perplexity and a generation task; the
data file lies beside them, nothing is downloaded).

The adapter scores on the recurrent path (prefill the context, then step through the continuation,
rows of different lengths in one batch); the reference here is the plain full forward in float64,
token by token, with none of that machinery. Metrics and every logged sample must agree.
"""
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from nl_pretrain import cli  # noqa: E402

TASKS = Path(__file__).with_name("tasks")
DATA = json.loads((TASKS / "nl_tasks.json").read_text())
# 1 layer; chunks of 4 tokens and a CMS context level of 16: every request crosses several chunk
# boundaries. vocab 300 > the byte tokenizer's 259: generation must skip the ids it cannot decode.
TINY = ["--model.preset=hope-tiny", "--model.d_model=32", "--model.n_heads=2", "--model.n_layers=1",
        "--model.vocab_size=300", "--model.max_seq_len=128", "--model.chunk_mem=4", "--model.chunk_proj=4",
        "--data.seq_len=32", "--data.max_documents=8", "--data.val_fraction=0.2", "--train.micro_batch_size=2",
        "--train.progress=false", "--train.eval_every=1000000", "--train.eval_batches=1", "--train.threads=1",
        "--train.log_every=1", "--optim.warmup_steps=0", "--train.steps=2"]


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("lm_eval") / "run"
    assert cli.main(["train", *TINY, f"--train.run_dir={run}"]) == 0
    return str(run / "checkpoints")


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The model in float64 and its tokenizer, used only through the full forward."""
    from nl_pretrain.infer import Session
    s = Session.load(checkpoint, dtype=torch.float64)
    return s.model, s.tokenizer, s.allowed(s.model.cfg.vocab_size)


def direct_logprob(model, prefix, target) -> float:
    ids = torch.tensor([prefix + target])
    with torch.no_grad():
        lp = F.log_softmax(model(ids)[0, :-1], -1)
    return float(sum(lp[len(prefix) - 1 + j, t] for j, t in enumerate(target)))


def direct_is_greedy(model, prefix, target) -> bool:
    with torch.no_grad():
        best = model(torch.tensor([prefix + target]))[0, len(prefix) - 1:-1].argmax(-1)
    return best.tolist() == target


def direct_greedy(model, tok, allowed, prompt, max_new=6, until="\n") -> str:
    ids, made = [tok.bos_id] + tok.encode(prompt), []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([ids + made]))[0, -1].masked_fill(~allowed, float("-inf")).argmax())
            if nxt == tok.eos_id:
                break
            made.append(nxt)
            if until in tok.decode(made):
                break
    return tok.decode(made).split(until)[0]


def samples(out: Path, task: str) -> list:
    (path,) = out.rglob(f"samples_{task}_*.jsonl")
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])


def test_lm_eval_metrics_equal_the_direct_computation(checkpoint, reference, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["lm-eval", "--checkpoint", checkpoint, "--tasks", "nl_mc,nl_rolling,nl_gen",
                   "--include_path", str(TASKS), "--output_path", str(out), "--log_samples",
                   "--model_args", "dtype=float64", "--batch_size", "3"])
    assert rc == 0, capsys.readouterr().err
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    model, tok, allowed = reference

    # multiple choice: every choice's log-likelihood, acc and acc_norm
    acc, acc_norm = [], []
    for doc, sample in zip(DATA["mc"], samples(out, "nl_mc")):
        prefix = [tok.bos_id] + tok.encode(doc["question"])
        lls = [direct_logprob(model, prefix, tok.encode(" " + c)) for c in doc["choices"]]
        got = [float(r[0]) for r in sample["filtered_resps"]]
        assert got == pytest.approx(lls, abs=1e-9, rel=1e-12)
        greedy = [direct_is_greedy(model, prefix, tok.encode(" " + c)) for c in doc["choices"]]
        assert [r[1] == "True" for r in sample["filtered_resps"]] == greedy
        acc.append(float(max(range(len(lls)), key=lambda i: lls[i]) == doc["answer"]))
        norm = [ll / len(" " + c) for ll, c in zip(lls, doc["choices"])]
        acc_norm.append(float(max(range(len(norm)), key=lambda i: norm[i]) == doc["answer"]))
    assert results["nl_mc"]["acc,none"] == pytest.approx(sum(acc) / len(acc), abs=1e-12)
    assert results["nl_mc"]["acc_norm,none"] == pytest.approx(sum(acc_norm) / len(acc_norm), abs=1e-12)

    # whole documents: word / byte perplexity and bits per byte
    ll = sum(direct_logprob(model, [tok.bos_id], tok.encode(d["text"])) for d in DATA["rolling"])
    words = sum(len(re.split(r"\s+", d["text"])) for d in DATA["rolling"])
    nbytes = sum(len(d["text"].encode("utf-8")) for d in DATA["rolling"])
    r = results["nl_rolling"]
    assert r["word_perplexity,none"] == pytest.approx(math.exp(-ll / words), rel=1e-9)
    assert r["byte_perplexity,none"] == pytest.approx(math.exp(-ll / nbytes), rel=1e-9)
    assert r["bits_per_byte,none"] == pytest.approx(-ll / nbytes / math.log(2), rel=1e-9)

    # greedy generation until a newline, at most 6 tokens
    texts = [direct_greedy(model, tok, allowed, d["prompt"]) for d in DATA["gen"]]
    assert [s["filtered_resps"][0] for s in samples(out, "nl_gen")] == texts
    exact = sum(t == d["target"] for t, d in zip(texts, DATA["gen"])) / len(texts)
    assert results["nl_gen"]["exact_match,none"] == pytest.approx(exact, abs=1e-12)


def test_an_unknown_task_is_one_error_line(checkpoint, capsys):
    rc = cli.main(["lm-eval", "--checkpoint", checkpoint, "--tasks", "nl_mc,no_such_task",
                   "--include_path", str(TASKS)])
    assert rc == 2
    assert error_line(capsys.readouterr().err) == (
        "error: lm-eval task 'no_such_task' not found; `lm-eval ls tasks` lists the known ones, and a task of "
        "your own needs --include_path DIR (the directory of its YAML)")


def test_bad_sources_and_a_foreign_model_are_refused_before_lm_eval(checkpoint, tmp_path, capsys):
    rc = cli.main(["lm-eval", "--checkpoint", str(tmp_path), "--tasks", "nl_mc"])
    assert rc == 2
    assert error_line(capsys.readouterr().err) == (
        f"error: --checkpoint {tmp_path}: not a checkpoint (step-XXXXXXXX with index.json), a checkpoint root "
        f"holding one, or an nl-pretrain export (model.safetensors + config.yaml); point it at <run_dir>/checkpoints")
    native = tmp_path / "native"                 # an export without its tokenizer, as older checkpoints give
    assert cli.main(["export", "--checkpoint", checkpoint, "--out", str(native)]) == 0
    (native / "tokenizer.json").unlink()
    capsys.readouterr()
    assert cli.main(["lm-eval", "--checkpoint", str(native), "--tasks", "nl_mc"]) == 2
    assert error_line(capsys.readouterr().err) == (
        f"error: {native} carries no tokenizer (it was written before checkpoints carried one); pass --tokenizer "
        f"with the prepared dataset directory the model was trained on (or its tokenizer.json), or --tokenizer "
        f"bytes for the built-in byte corpus")
    rc = cli.main(["lm-eval", "--checkpoint", str(tmp_path), "--tasks", "nl_mc", "--model", "hf"])
    assert rc == 2
    assert error_line(capsys.readouterr().err) == (
        "error: nl-pretrain lm-eval always evaluates the nl-pretrain model; drop --model (model options go in "
        "--model_args key=value)")


def test_attention_families_see_at_most_max_seq_len(tmp_path):
    """Transformer++ with max_seq_len 16: a long context is cut from the left, a long document is
    scored in lm-eval's rolling windows (window k predicts tokens [16k, 16k + 16) from the 16 inputs
    ending just before its last one). Through the adapter's Python API, the reference full forward."""
    from lm_eval.api.instance import Instance
    from nl_pretrain.lm_eval_adapter import NLPretrainLM
    run = tmp_path / "run"
    args = [a for a in TINY if not a.startswith(("--model.preset", "--model.max_seq_len", "--data.seq_len"))]
    assert cli.main(["train", *args, "--model.preset=transformer-tiny", "--model.max_seq_len=16",
                     "--data.seq_len=16", f"--train.run_dir={run}"]) == 0
    lm = NLPretrainLM(checkpoint=str(run / "checkpoints"), dtype="float64", batch_size=2)
    model, tok, L = lm.session.model, lm.tok, 16

    def logprobs(inp, n):             # log p of the last n tokens of inp[1:] given the prefix, one forward
        with torch.no_grad():
            lp = F.log_softmax(model(torch.tensor([inp[:-1]]))[0], -1)
        return float(sum(lp[len(inp) - 1 - n + j, t] for j, t in enumerate(inp[-n:])))

    text = DATA["rolling"][1]["text"]                     # 81 bytes: six windows
    ids = tok.encode(text)
    ext, want = [tok.bos_id] + ids, 0.0
    for s in range(0, len(ids), L):
        e = min(s + L, len(ids))
        window = ext[max(0, e - L):e] + [ids[e - 1]]      # the inputs, then the last predicted token
        want += logprobs(window, e - s)
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert got == pytest.approx(want, abs=1e-9, rel=1e-12)

    ctx, cont = DATA["gen"][2]["prompt"], " os"           # a 60-byte context, cut to the last 16 inputs
    full = [tok.bos_id] + tok.encode(ctx + cont)
    want = logprobs(full[-(L + 1):], 3)
    reqs = [Instance("loglikelihood", {}, (ctx, cont), 0), Instance("loglikelihood", {}, ("import", " os"), 1)]
    (got, _), (short, _) = lm.loglikelihood(reqs)
    assert got == pytest.approx(want, abs=1e-9, rel=1e-12)
    assert short == pytest.approx(logprobs([tok.bos_id] + tok.encode("import os"), 3), abs=1e-9, rel=1e-12)
