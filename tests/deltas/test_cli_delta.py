"""`taskdelta delta random | inspect | extract` on tiny models: the files they write are sound and
match the library; errors are one readable line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import assert_one_line_error
from typer.testing import CliRunner

from taskdelta.deltas import dumps, extract, load, load_finetuned, random_delta, validate
from taskdelta.deltas.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def same_tensors(a, b) -> bool:
    return (a.tensors.keys() == b.tensors.keys() and a.heads.keys() == b.heads.keys()
            and all(torch.equal(a.tensors[n].idx, b.tensors[n].idx)
                    and torch.equal(a.tensors[n].val, b.tensors[n].val) for n in a.tensors)
            and all(torch.equal(a.heads[n], b.heads[n]) for n in a.heads))


@pytest.fixture(scope="module")
def ft_dir(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 'fine-tuned' BERT classifier: base weights plus seeded noise, saved as a folder."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(2)
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    model.config.id2label = {0: "bad", 1: "good"}
    model.config.label2id = {"bad": 0, "good": 1}
    out = tmp_path_factory.mktemp("cli-ft")
    model.save_pretrained(out)
    return out


# --- random ----------------------------------------------------------------------------------


def test_random_writes_a_sound_seeded_delta(tiny_bert, tiny_bert_dir, tmp_path):
    out = tmp_path / "r.safetensors"
    result = run("random", "--base", tiny_bert_dir, "-o", out, "--density", "0.05", "--seed", "3")
    assert result.exit_code == 0, result.output
    delta = load(out)
    validate(delta, tiny_bert)
    assert f"{delta.nnz} nonzeros" in result.stdout
    assert same_tensors(delta, random_delta(tiny_bert, 0.05, seed=3))
    assert delta.meta.kind == "embed" and delta.meta.provenance.model_extra == {"seed": 3}


def test_random_classify_has_a_head(tiny_llama, tiny_llama_dir, tmp_path):
    out = tmp_path / "c.safetensors"
    result = run("random", "--base", tiny_llama_dir, "-o", out, "--density", "0.01",
                 "--kind", "classify")
    assert result.exit_code == 0, result.output
    delta = load(out)
    validate(delta, tiny_llama)
    assert set(delta.heads) == {"score.weight"} and delta.meta.labels == ["negative", "positive"]


# --- inspect ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def delta_file(tiny_bert, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inspect") / "task.safetensors"
    path.write_bytes(dumps(random_delta(tiny_bert, 0.02, seed=4, kind="classify")))
    return path


def test_inspect_table_lists_every_tensor_whole(delta_file):
    """Every tensor name (and head) appears whole, even through a narrow, non-terminal output."""
    delta = load(delta_file)
    result = run("inspect", delta_file)
    assert result.exit_code == 0, result.output
    for name, sp in delta.tensors.items():
        row = next(line for line in result.stdout.splitlines() if f" {name} " in line)
        assert f" {sp.nnz} " in row and "int32" in row and "float32" in row
    assert " head::classifier.weight " in result.stdout
    assert f"{delta.nnz} nonzeros" in result.stdout
    assert delta.meta.checksum in result.stdout and delta.meta.base_fingerprint in result.stdout


def test_inspect_json(delta_file):
    delta = load(delta_file)
    result = run("inspect", delta_file, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    size = delta_file.stat().st_size
    assert info["bytes"] == size and info["nnz"] == delta.nnz
    assert info["bytes_per_nonzero"] == pytest.approx(size / delta.nnz, abs=1e-3)
    assert info["metadata"] == delta.meta.model_dump(mode="json")
    assert info["tensors"] == {n: {"nnz": t.nnz, "idx": "torch.int32", "val": "torch.float32"}
                               for n, t in delta.tensors.items()}
    assert info["heads"] == {"classifier.weight": [2, 32], "classifier.bias": [2]}


# --- extract ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["global", "per-tensor"])
def test_extract_writes_what_the_library_extracts(tiny_bert, tiny_bert_dir, ft_dir, tmp_path,
                                                  scope):
    out = tmp_path / "x.safetensors"
    result = run("extract", "--base", tiny_bert_dir, "--finetuned", ft_dir, "--density", "0.1",
                 "--scope", scope, "-o", out)
    assert result.exit_code == 0, result.output
    delta = load(out)
    validate(delta, tiny_bert)
    assert same_tensors(delta, extract(tiny_bert, load_finetuned(ft_dir), 0.1, scope=scope))
    assert delta.meta.kind == "classify" and delta.meta.labels == ["bad", "good"]
    assert delta.meta.provenance.model_extra["scope"] == scope
    if scope == "global":
        assert delta.nnz == round(0.1 * tiny_bert.numel)
    assert f"wrote {out}" in result.stdout.replace("\n", "")


# --- errors ----------------------------------------------------------------------------------


def test_inspect_errors(tmp_path, delta_file):
    missing = tmp_path / "a" / "very" / ("long-directory-name-" * 4) / "missing.safetensors"
    assert_one_line_error(run("inspect", missing), "No such file or directory", code=2)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x07" * 100)
    assert_one_line_error(run("inspect", garbage), "over the limit", code=2)
    pickled = tmp_path / "pickled.safetensors"
    pickled.write_bytes(pickle.dumps({"w::idx": [1, 2, 3]}))
    assert_one_line_error(run("inspect", pickled), "header claims", code=2)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(delta_file.read_bytes()[:-10])
    assert_one_line_error(run("inspect", truncated), "truncated file", code=2)


def test_extract_errors(tiny_bert_dir, ft_dir, tmp_path):
    out = tmp_path / "x.safetensors"
    common = ("--finetuned", ft_dir, "-o", out)
    assert_one_line_error(run("extract", "--base", tiny_bert_dir, *common, "--density", "0"),
                          "density must be in (0, 1]", code=2)
    assert_one_line_error(run("extract", "--base", tiny_bert_dir, *common, "--scope", "local"),
                          "--scope must be global or per-tensor", code=2)
    assert_one_line_error(run("extract", "--base", tmp_path / "nope", *common),
                          "is neither a named default", code=2)
    assert_one_line_error(run("extract", "--base", tiny_bert_dir, *common, "--kind", "generate"),
                          "task kind 'generate' is not served", code=2)
    assert not out.exists()  # nothing written on error


def test_random_errors(tiny_bert_dir, tmp_path):
    out = tmp_path / "r.safetensors"
    assert_one_line_error(run("random", "--base", tiny_bert_dir, "-o", out, "--kind", "generate"),
                          "task kind 'generate' is not served", code=2)
    assert_one_line_error(run("random", "--base", tiny_bert_dir, "-o", out, "--kind", "chat"),
                          "--kind must be one of classify, regress, generate, embed", code=2)
    assert_one_line_error(run("random", "--base", tiny_bert_dir, "-o", out, "--density", "2"),
                          "density must be in [0, 1]", code=2)
    assert not out.exists()


# --- the installed command -------------------------------------------------------------------


def test_installed_taskdelta_command(delta_file, tmp_path):
    """`taskdelta delta ...` dispatches to this app: --json parses, errors exit 2 with one line."""
    exe = Path(sys.executable).parent / "taskdelta"
    ok = subprocess.run([exe, "delta", "inspect", delta_file, "--json"], capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["nnz"] == load(delta_file).nnz
    bad = subprocess.run([exe, "delta", "inspect", tmp_path / "missing.safetensors"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert [ln for ln in bad.stderr.splitlines() if ln.strip()][0].startswith("error: ")
    assert len([ln for ln in bad.stderr.splitlines() if ln.strip()]) == 1
    assert "Traceback" not in bad.stderr
