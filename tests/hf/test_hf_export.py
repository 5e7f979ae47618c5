"""``nl-pretrain export --format hf``: the real ``transformers`` loads the directory on one CPU with
the logits of our model, its ``generate()`` equals our greedy decode, and its tokenizer gives our ids.
Bad input (unknown format, not a checkpoint, no tokenizer) is one ``error:`` line before any file
is written.
"""
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from nl_pretrain import cli  # noqa: E402

# 1 layer; chunks of 4 tokens and a CMS context level of 16, so the compared sequences cross several
# chunk boundaries; vocab 300 > the byte tokenizer's 259 (generate must never pick 259..299).
TINY = ["--model.preset=hope-tiny", "--model.d_model=32", "--model.n_heads=2", "--model.n_layers=1",
        "--model.vocab_size=300", "--model.max_seq_len=64", "--model.chunk_mem=4", "--model.chunk_proj=4",
        "--data.seq_len=32", "--data.max_documents=8", "--data.val_fraction=0.2", "--train.micro_batch_size=2",
        "--train.progress=false", "--train.eval_every=1000000", "--train.eval_batches=1", "--train.threads=1",
        "--train.log_every=1", "--optim.warmup_steps=0", "--train.steps=2"]
HF_FILES = ["config.json", "configuration_nl_pretrain.py", "generation_config.json", "model.safetensors",
            "modeling_nl_pretrain.py", "tokenizer.json", "tokenizer_config.json"]


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    assert cli.main(["train", *TINY, f"--train.run_dir={root / 'run'}"]) == 0
    ckpt = str(root / "run" / "checkpoints")
    assert cli.main(["export", "--format", "hf", "--checkpoint", ckpt, "--out", str(root / "hf")]) == 0
    return ckpt, root / "hf"


def test_transformers_loads_the_export_with_our_logits_and_greedy_decode(exported):
    from transformers import AutoModelForCausalLM
    from nl_pretrain.infer import Session
    ckpt, out = exported
    assert sorted(p.name for p in out.iterdir()) == HF_FILES
    ours = Session.load(ckpt, dtype=torch.float64)
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float64)
    assert hf.dtype == torch.float64
    ids = torch.randint(0, 259, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = hf(input_ids=ids).logits
    assert torch.equal(got, ours.model(ids))               # the same module, the same tensors

    with torch.no_grad():
        prefilled = hf(input_ids=ids, use_cache=True)
    assert prefilled.nl_state is not None
    assert (prefilled.logits - got).abs().max() < 1e-12     # the chunk-parallel prefill

    prompt = ours.encode_prompt("def square(x):\n    ")   # BOS + 20 bytes: five chunks of 4
    want = ours.generate([prompt], max_new_tokens=12, temperature=0.0, stop_at_eos=True).tokens[0]
    gen = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)     # prefill + 11 steps
    assert gen[0, :len(prompt)].tolist() == prompt
    assert gen[0, len(prompt):].tolist() == want
    full = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(full, gen)                           # the full forward at every token agrees


def test_the_tokenizer_gives_our_ids(exported):
    from transformers import AutoTokenizer
    from nl_pretrain.infer.tokenizer import byte_tokenizer_json, load_tokenizer_json
    _, out = exported
    tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    ours = load_tokenizer_json(byte_tokenizer_json())
    text = "héllo <|bos|> wörld\n\tx = 1"       # a special token's text stays text, as in training
    assert tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert tok(text)["input_ids"] == [ours.bos_id] + ours.encode(text)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    assert tok.decode(ours.encode(text)) == text

    # a prepared dataset's BPE (merges, special ids 0-2), as `hf_tokenizer` wraps it for an export
    import sysconfig
    from data_pipeline.tokenizer import TextTokenizer, train_bpe
    from nl_pretrain.hf.export import hf_tokenizer
    texts = [p.read_text() for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:10]]
    bpe_json = train_bpe(texts, 600)
    bpe, wrapped = TextTokenizer(bpe_json), hf_tokenizer(bpe_json)
    assert len(bpe.encode(text)) < len(text.encode("utf-8"))                 # merges are used
    assert wrapped(text, add_special_tokens=False)["input_ids"] == bpe.encode(text)
    assert wrapped(text)["input_ids"] == [bpe.bos_id] + bpe.encode(text)
    assert wrapped.decode(bpe.encode(text)) == text


def test_bad_exports_are_one_error_line_before_any_file(exported, tmp_path, capsys):
    ckpt, _ = exported
    out = tmp_path / "out"
    assert cli.main(["export", "--format", "onnx", "--checkpoint", ckpt, "--out", str(out)]) == 2
    assert error_line(capsys.readouterr().err) == (
        "error: --format onnx: unknown export format; use --format safetensors (model.safetensors + config.yaml, "
        "the default) or --format hf (a directory transformers loads)")
    assert cli.main(["export", "--format", "hf", "--checkpoint", str(tmp_path), "--out", str(out)]) == 2
    assert error_line(capsys.readouterr().err) == (
        f"error: --checkpoint {tmp_path}: not a checkpoint (step-XXXXXXXX with index.json), a checkpoint root "
        f"holding one, or an nl-pretrain export (model.safetensors + config.yaml); point it at <run_dir>/checkpoints")
    assert not out.exists()

    native = tmp_path / "native"              # an export without its tokenizer, as older checkpoints give
    assert cli.main(["export", "--checkpoint", ckpt, "--out", str(native)]) == 0
    (native / "tokenizer.json").unlink()
    capsys.readouterr()
    assert cli.main(["export", "--format", "hf", "--checkpoint", str(native), "--out", str(out)]) == 2
    assert error_line(capsys.readouterr().err) == (
        f"error: {native} carries no tokenizer (it was written before checkpoints carried one); pass --tokenizer "
        f"with the prepared dataset directory the model was trained on (or its tokenizer.json), or --tokenizer "
        f"bytes for the built-in byte corpus")
    assert not out.exists()
    # the fix the message names works
    assert cli.main(["export", "--format", "hf", "--checkpoint", str(native), "--out", str(out),
                     "--tokenizer", "bytes"]) == 0
    assert sorted(p.name for p in Path(out).iterdir()) == HF_FILES
