"""``manifest.json``: what a prepared dataset holds, written last and atomically.

The fingerprint is the sha256 of the canonical JSON of every field that defines the samples (all but
the provenance: ``sources`` and a given tokenizer's path); the loader recomputes it, so an edited
manifest is caught, and its state carries it, so resuming on other data is an error.
Nothing in the manifest depends on the number of workers or on the time of the run (those go to
``report.json``), which is why 1 and N workers give byte-identical datasets.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from data_pipeline.shards import CorruptShardError, atomic_write, sha256_file

MANIFEST_FILE = "manifest.json"
FORMAT = "nl-pretrain-tokens"
FORMAT_VERSION = 1


class ManifestError(ValueError):
    pass


def fingerprint(manifest: dict) -> str:
    """sha256 of everything that defines the samples. Provenance is left out (``sources`` with its
    absolute roots, the path a given tokenizer came from), so the same data prepared from a corpus
    at another path, or on another machine, keeps its fingerprint."""
    body = {k: v for k, v in manifest.items() if k not in ("fingerprint", "sources")}
    body["tokenizer"] = {k: v for k, v in body.get("tokenizer", {}).items() if k != "given_path"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def write_manifest(out_dir: Path, manifest: dict) -> dict:
    manifest = dict(manifest)
    manifest["fingerprint"] = fingerprint(manifest)
    atomic_write(Path(out_dir) / MANIFEST_FILE, manifest_bytes(manifest))
    return manifest


def load_manifest(dataset_dir: str) -> dict:
    d = Path(dataset_dir)
    path = d / MANIFEST_FILE
    if not d.is_dir():
        raise FileNotFoundError(f"dataset directory '{dataset_dir}' does not exist; create it with "
                                f"`nl-pretrain prepare-data --out {dataset_dir}`")
    if not path.is_file():
        raise ManifestError(f"'{dataset_dir}' has no {MANIFEST_FILE}: preparation did not finish there (or it is "
                            f"not a dataset); run `nl-pretrain prepare-data --out {dataset_dir}` again")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}); prepare the dataset again") from exc
    if m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{path} has format {m.get('format')!r} version {m.get('format_version')!r}; this "
                            f"code reads {FORMAT!r} version {FORMAT_VERSION}: prepare the dataset again")
    fp = fingerprint(m)
    if m.get("fingerprint") != fp:
        raise ManifestError(f"{path} was modified after it was written (fingerprint {m.get('fingerprint')} "
                            f"recorded, {fp} computed); restore it or prepare the dataset again")
    return m


def verify_dataset(dataset_dir: str, splits=("train", "val"), full: bool = True) -> dict:
    """Check every shard and index of a dataset: present, of the recorded size and (``full``) sha256.
    Returns the manifest; raises CorruptShardError naming the first bad file."""
    m = load_manifest(dataset_dir)
    d = Path(dataset_dir)
    tok = d / m["tokenizer"]["file"]
    if not tok.is_file() or sha256_file(tok) != m["tokenizer"]["sha256"]:
        raise ManifestError(f"{tok} is missing or differs from the tokenizer recorded in the manifest; "
                            f"restore it or prepare the dataset again")
    for split in splits:
        for sh in m["splits"][split]["shards"]:
            for name, size, digest in ((sh["file"], sh["bytes"], sh["sha256"]),
                                       (sh["index"], sh["index_bytes"], sh["index_sha256"])):
                p = d / name
                if not p.is_file():
                    raise CorruptShardError(f"shard file '{p}' is missing; prepare the dataset again")
                if p.stat().st_size != size:
                    raise CorruptShardError(f"shard file '{p}' has {p.stat().st_size} bytes, the manifest records "
                                            f"{size} (truncated or overwritten); prepare the dataset again")
                if full and sha256_file(p) != digest:
                    raise CorruptShardError(f"shard file '{p}' fails its sha256 check (corrupt); "
                                            f"prepare the dataset again")
    return m


def dataset_problems(dataset_dir: str, full: bool = True) -> tuple:
    """``(manifest, problems)``: every shard and index of every split checked (present, recorded size,
    and with ``full`` its sha256), each problem a line naming the file. Raises ManifestError /
    FileNotFoundError when there is no readable manifest at all."""
    m = load_manifest(dataset_dir)
    d = Path(dataset_dir)
    problems = []
    tok = d / m["tokenizer"]["file"]
    if not tok.is_file() or sha256_file(tok) != m["tokenizer"]["sha256"]:
        problems.append(f"{tok}: missing or not the tokenizer recorded in the manifest")
    files = 0
    for split, info in m["splits"].items():
        for sh in info["shards"]:
            for name, size, digest in ((sh["file"], sh["bytes"], sh["sha256"]),
                                       (sh["index"], sh["index_bytes"], sh["index_sha256"])):
                p, files = d / name, files + 1
                if not p.is_file():
                    problems.append(f"{p}: missing")
                elif p.stat().st_size != size:
                    problems.append(f"{p}: {p.stat().st_size} bytes, the manifest records {size} (truncated or "
                                    f"overwritten)")
                elif full and sha256_file(p) != digest:
                    problems.append(f"{p}: fails its sha256 check (corrupt, same size)")
    m = dict(m)
    m["_files_checked"] = files
    return m, problems
