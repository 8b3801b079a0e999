"""The component catalogue: `python -m tessera.registry list`, its markdown, and the docs page it generates."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys

import pytest

from tessera.registry import ATTENTION, FEED_FORWARD, ConfigError, all_registries, catalogue

from helpers.launch import ROOT
from helpers.plugins import make_distribution, run_python


def run_list(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "220"}
    return subprocess.run([sys.executable, "-m", "tessera.registry", "list", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def test_the_docs_catalogue_page_is_the_generated_catalogue():
    text = (ROOT / catalogue.PAGE).read_text()
    start, end = catalogue.block(text)
    assert text[start:end] == "\n" + catalogue.markdown(builtin_only=True), (
        f"{catalogue.PAGE}'s component catalogue is stale: run {catalogue.REGENERATE}")


def _row(markdown: str, name: str) -> tuple[str, str]:
    """(summary, arguments) cells of the row of entry `name`."""
    (line,) = [ln for ln in markdown.splitlines() if ln.startswith(f"| `{name}` |")]
    cells = re.split(r"(?<!\\) \| ", line.strip("| "))
    return cells[1], cells[2]


@pytest.mark.parametrize("registry", [ATTENTION, FEED_FORWARD], ids=lambda r: r.kind)
def test_each_row_lists_the_constructor_arguments_in_order(registry):
    text = catalogue.markdown(registry.kind)
    for name in registry.names():
        _, args = _row(text, name)
        shown = re.findall(r"(\*\*)?`(\w+)(?::[^`=]*)?(?: = ([^`]*))?`", args)
        params = [p for p in inspect.signature(registry.get(name)).parameters.values()
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        assert [s[1] for s in shown] == [p.name for p in params], name
        for (bold, _, default), param in zip(shown, params):
            if param.default is param.empty:
                assert bold and not default, (name, param.name)
            else:
                assert not bold and default == repr(param.default), (name, param.name)


def test_rows_carry_first_docstring_sentences_and_kinds_their_shared_arguments():
    from tessera.components.mlp.gated import SwiGLU

    text = catalogue.markdown("feed_forward")
    assert _row(text, "swiglu")[0] == " ".join(SwiGLU.__doc__.split())
    assert "**FEED_FORWARD** (FeedForward): a swap carries over `dim`, `hidden_dim`" in text
    assert "`n_kv_heads: int \\| None = None`" in _row(catalogue.markdown("attention"), "gqa")[1]
    assert "**ATTENTION**" not in text  # one kind asked, one kind printed


def test_list_prints_one_kind_with_types_and_defaults():
    result = run_list("Attention")
    assert result.returncode == 0, result.stderr
    for name in ATTENTION.names():
        assert name in result.stdout
    assert "n_kv_heads: int | None = None" in result.stdout
    assert "a swap carries over: dim (model width D" in " ".join(result.stdout.split())
    assert "swiglu" not in result.stdout and "FEED_FORWARD" not in result.stdout


def test_unknown_kind_exits_2_with_a_suggestion(capsys):
    from tessera.registry.__main__ import main

    assert main(["list", "atention"]) == 2
    assert "did you mean 'ATTENTION'" in " ".join(capsys.readouterr().err.split())


def test_plugin_components_are_listed_but_never_enter_the_docs_page(tmp_path):
    make_distribution(tmp_path, "toy-attention", "toy_attention", '''
        import torch
        from tessera.components.interfaces import Attention
        from tessera.registry import ATTENTION

        @ATTENTION.register("toy_identity")
        class ToyIdentity(Attention):
            """Returns its input: a plugin that exists to be listed."""

            def __init__(self, *, dim: int, gain: float = 1.0):
                super().__init__()

            def forward(self, x, *, doc_ids=None):
                return x

            def score_flops_per_token(self, seq_len):
                return 0.0
    ''')
    result = run_python('''
        import contextlib, io
        from tessera.registry.__main__ import main

        def run(*argv):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = main(list(argv))
            return code, out.getvalue()

        code, table = run("list", "attention")
        assert code == 0 and "toy_identity" in table and "plugin: toy_attention" in table, table
        assert "gain: float = 1.0" in table, table
        code, md = run("list", "--markdown")
        assert "| `toy_identity` (from `toy_attention`) | Returns its input" in md, md
        code, md = run("list", "--markdown", "--builtin-only")
        assert "toy_identity" not in md
        code, checked = run("list", "--check", "docs/catalogue.md")
        assert code == 0, checked
        print("OK")
    ''', tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("OK")


def test_write_replaces_only_the_block(tmp_path):
    page = tmp_path / "catalogue.md"
    page.write_text(f"# title\n\nbefore\n{catalogue.START}\nold table\n{catalogue.END}\nafter\n")
    assert catalogue.write(page)
    text = page.read_text()
    assert text.startswith("# title\n\nbefore\n" + catalogue.START + "\n")
    assert text.endswith(catalogue.END + "\nafter\n") and "old table" not in text
    assert catalogue.matches(page) and not catalogue.write(page)
    page.write_text("no markers here\n")
    with pytest.raises(ConfigError, match="has no catalogue block") as info:
        catalogue.write(page)
    assert catalogue.REGENERATE in str(info.value)


def test_write_and_check_on_the_command_line(tmp_path):
    from tessera.registry.__main__ import main

    page = tmp_path / "catalogue.md"
    page.write_text(f"# components\n{catalogue.START}\nstale\n{catalogue.END}\n")
    assert main(["list", "--check", str(page)]) == 1
    assert main(["list", "--write", str(page)]) == 0
    assert main(["list", "--check", str(page)]) == 0
    (tmp_path / "plain.md").write_text("no markers\n")
    assert main(["list", "--check", str(tmp_path / "plain.md")]) == 2


def test_every_builtin_entry_is_catalogued():
    text = catalogue.markdown(builtin_only=True)
    for registry in all_registries():
        for name in registry.names():
            if registry.is_builtin(name):
                assert f"| `{name}` |" in text, (registry.kind, name)
