"""Outputs appear whole or not at all, and a replaced output is never lost: faults injected at every step
of the swap, leftovers of killed runs, names at the filesystem's limits."""

import os

import pytest

from llmquant.errors import UserError
from llmquant.formats import atomic


def make_output(path, text):
    path.mkdir()
    (path / "model.safetensors").write_text(text)


def content(path):
    return {p.name: p.read_text() for p in path.iterdir()}


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("exchange", [True, False])
def test_replacing_an_output(exchange, tmp_path, monkeypatch):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    dest = tmp_path / "out"
    make_output(dest, "old")
    with atomic.atomic_directory(dest, force=True) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert content(dest) == {"model.safetensors": "new"} and leftovers(tmp_path) == []


class Fault(BaseException):
    pass


@pytest.mark.parametrize("step", range(4))
def test_a_fault_at_any_step_of_the_swap_keeps_the_old_or_the_new_output(step, tmp_path, monkeypatch):
    """The fallback swap (no RENAME_EXCHANGE) has the most steps: fail each rename and delete in turn."""
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    calls = {"n": 0}
    real_replace, real_remove = os.replace, atomic._remove

    def counted(real):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == step + 1:
                raise Fault
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(atomic.os, "replace", counted(real_replace))
    monkeypatch.setattr(atomic, "_remove", counted(real_remove))
    dest = tmp_path / "out"
    make_output(dest, "old")
    with pytest.raises(Fault):
        with atomic.atomic_directory(dest, force=True) as tmp:
            (tmp / "model.safetensors").write_text("new")
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    monkeypatch.setattr(atomic, "_remove", real_remove)
    assert content(dest)["model.safetensors"] in ("old", "new")
    atomic.check_destination(dest, force=True)  # the next run tidies whatever is left
    assert content(dest)["model.safetensors"] in ("old", "new") and leftovers(tmp_path) == []


def test_the_next_run_restores_an_output_a_killed_swap_set_aside(tmp_path, capsys):
    """A `kill -9` between the fallback's two renames: the old output lies aside and `dest` is missing."""
    dest = tmp_path / "out"
    make_output(dest, "old")
    os.replace(dest, atomic._aside(dest))
    assert not dest.exists()
    with pytest.raises(UserError, match="--force"):
        atomic.check_destination(dest, force=False)
    assert content(dest) == {"model.safetensors": "old"} and leftovers(tmp_path) == []
    assert "restored" in capsys.readouterr().err


def test_leftovers_of_dead_runs_go_and_live_ones_stay(tmp_path):
    dead = tmp_path / f"{atomic.TEMP_PREFIX}{2**22 + 12345}-x.incomplete"  # beyond Linux's default pid_max
    live = tmp_path / f"{atomic.TEMP_PREFIX}{os.getpid()}-y.incomplete"
    dead.mkdir()
    live.mkdir()
    atomic.check_destination(tmp_path / "out", force=False)
    assert leftovers(tmp_path) == [live.name]


def test_names_at_the_filesystem_limit(tmp_path, monkeypatch):
    longest = os.pathconf(tmp_path, "PC_NAME_MAX")
    dest = tmp_path / ("q" * longest)
    with atomic.atomic_directory(dest) as tmp:  # the temporary's name does not grow with dest's
        (tmp / "a").write_text("x")
    assert content(dest) == {"a": "x"}
    with pytest.raises(UserError, match="longer than the filesystem allows"):
        atomic.check_destination(tmp_path / ("q" * (longest + 1)), force=False)
    monkeypatch.chdir(tmp_path)
    for name in (".", "..", ""):
        with pytest.raises(UserError, match="name one"):
            atomic.check_destination(atomic.Path(name), force=True)
