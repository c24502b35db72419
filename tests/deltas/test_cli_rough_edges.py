"""The command line's rough edges (issue 15): one clear line instead of a traceback or a hub
error, the base's name in a wrong-base refusal, a warning for a short mask, and `--help`
listing every delta command."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from taskdelta.client.cli import DELTA_COMMANDS
from taskdelta.client.cli import app as top_app
from taskdelta.deltas import DeltaRejected, cli_train, random_delta, save, validate
from taskdelta.deltas import cli as delta_cli


def run(*args: str):
    return CliRunner().invoke(delta_cli.app, list(args))


def one_error_line(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_help_lists_every_delta_command():
    registered = {c.name or c.callback.__name__ for c in delta_cli.app.registered_commands}
    assert registered == set(DELTA_COMMANDS)
    shown = CliRunner().invoke(top_app, ["--help"], terminal_width=200).output
    assert all(name in shown for name in DELTA_COMMANDS)


def test_extract_from_a_missing_folder_or_another_models_finetune(tiny_bert_dir, tiny_llama_dir,
                                                                  tmp_path):
    missing = one_error_line(run("extract", "--base", str(tiny_bert_dir), "--finetuned",
                                 str(tmp_path / "nope"), "-o", str(tmp_path / "d.safetensors")))
    assert "no such folder" in missing
    other = one_error_line(run("extract", "--base", str(tiny_bert_dir), "--finetuned",
                               str(tiny_llama_dir), "-o", str(tmp_path / "d.safetensors")))
    assert "is not a fine-tune of base" in other


def test_wrong_base_refusal_names_the_deltas_base(tiny_llama, tiny_bert):
    delta = random_delta(tiny_llama, 0.01, seed=1, kind="embed")
    assert delta.meta.base_name == tiny_llama.name
    with pytest.raises(DeltaRejected, match="made for base") as info:
        validate(delta, tiny_bert)
    assert repr(tiny_llama.name) in str(info.value)


def test_export_refuses_a_delta_of_another_base_in_one_line(tiny_llama, tiny_bert_dir, tmp_path):
    save(random_delta(tiny_llama, 0.01, seed=1, kind="embed"), tmp_path / "d.safetensors")
    line = one_error_line(run("export", str(tmp_path / "d.safetensors"), "--base",
                              str(tiny_bert_dir), "-o", str(tmp_path / "out")))
    assert repr(tiny_llama.name) in line


def test_short_mask_warns(capsys):
    class FakeBase:
        numel = 1000

    cli_train.warn_short_mask(5, 0.01, FakeBase())  # type: ignore[arg-type]
    assert "only 5 entries could be chosen, fewer than the 10" in capsys.readouterr().err
    cli_train.warn_short_mask(10, 0.01, FakeBase())  # type: ignore[arg-type]
    assert capsys.readouterr().err == ""


def test_serve_with_an_unknown_base_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "taskdelta.client.cli", "serve", "--base", "foo",
                           "--no-auth", "--data-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "base 'foo'" in lines[0] and "Traceback" not in proc.stderr

