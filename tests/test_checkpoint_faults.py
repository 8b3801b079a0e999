"""A checkpoint that cannot be written is one message, not a traceback: a full disk (ENOSPC
raised by the storage writer), a folder this process may not write (PermissionError: we run
as root, where chmod cannot refuse, so the refusal is injected), a folder that is a file
(a real OS error, end to end through the recipe), and the free-space warning before a save.
Also a corpus folder one rank cannot see (data.path on rank 0's disk only)."""

from __future__ import annotations

import errno
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from tessera.components.data.sources.files import LocalFiles
from tessera.components.train import checkpoint_faults
from tessera.components.train.checkpoint import Checkpointer, CheckpointSaveError

from helpers.launch import own_traceback_frames, run_recipe


def tiny() -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model and an Adam optimizer with state (one step taken)."""
    torch.manual_seed(0)
    model = nn.Linear(64, 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(4, 64)).sum().backward()
    optimizer.step()
    return model, optimizer


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Model + optimizer tensor bytes, counted here independently of the code under test."""
    tensors = list(model.state_dict().values())
    tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def full_disk(monkeypatch) -> None:
    """Every later DCP write raises ENOSPC, as a full disk does."""
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(dcp.HuggingFaceStorageWriter, "write_data", no_space)


def test_full_disk_continues_names_folder_bytes_and_intact_checkpoint(tmp_path, monkeypatch, capsys):
    model, optimizer = tiny()
    checkpoint = Checkpointer(folder=str(tmp_path), every=2)
    first = checkpoint.save(2, model=model, optimizer=optimizer, extra={})
    assert first is not None and (first / "COMPLETE").exists()
    capsys.readouterr()
    full_disk(monkeypatch)
    assert checkpoint.save(4, model=model, optimizer=optimizer, extra={}) is None
    message = capsys.readouterr().err
    assert "step-00000004 was not written" in message and str(tmp_path) in message
    assert "is full" in message and f"previous checkpoint {first} is intact" in message
    assert "training goes on" in message and "every 2 steps" in message
    needed = state_bytes(model, optimizer) * checkpoint_faults.SPACE_MARGIN
    assert f"needs about {needed / 1024:.1f} KiB" in message
    assert "free" in message and "Traceback" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002"]  # no partial folder left
    monkeypatch.undo()
    fresh, fresh_opt = tiny()
    with torch.no_grad():
        fresh.weight.zero_()
    Checkpointer(folder=str(tmp_path)).load(first, model=fresh, optimizer=fresh_opt)
    assert torch.equal(fresh.weight, model.weight)  # the earlier checkpoint still loads


def test_full_disk_with_stop_raises_one_message(tmp_path, monkeypatch):
    model, optimizer = tiny()
    checkpoint = Checkpointer(folder=str(tmp_path), on_save_error="stop")
    full_disk(monkeypatch)
    with pytest.raises(CheckpointSaveError, match="No earlier checkpoint of this run exists.*the run stops here"):
        checkpoint.save(1, model=model, optimizer=optimizer, extra={})
    assert list(tmp_path.iterdir()) == []


def test_full_disk_during_a_background_save_is_reported_when_it_is_waited_for(tmp_path, monkeypatch, capsys):
    model, optimizer = tiny()
    checkpoint = Checkpointer(folder=str(tmp_path), async_save=True)
    first = checkpoint.save(1, model=model, optimizer=optimizer, extra={})
    checkpoint.wait()
    capsys.readouterr()
    full_disk(monkeypatch)
    checkpoint.save(2, model=model, optimizer=optimizer, extra={})
    checkpoint.wait()
    message = capsys.readouterr().err
    assert "step-00000002 was not written" in message and f"previous checkpoint {first} is intact" in message
    assert checkpoint.last == first and sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]


def test_unwritable_folder_says_how_to_fix(tmp_path, monkeypatch, capsys):
    model, optimizer = tiny()
    real_mkdir = type(tmp_path).mkdir

    def refuse(self, *args, **kwargs):  # what mkdir raises in a folder owned by someone else
        if str(self).startswith(str(tmp_path / "ck")):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)
    monkeypatch.setattr(type(tmp_path), "mkdir", refuse)
    assert Checkpointer(folder=str(tmp_path / "ck")).save(1, model=model, optimizer=optimizer, extra={}) is None
    message = capsys.readouterr().err
    assert "may not write into" in message and "chmod" in message and "Permission denied" in message


def test_low_free_space_warns_before_the_save(tmp_path, monkeypatch, capsys):
    model, optimizer = tiny()
    real = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint_faults.shutil, "disk_usage", lambda path: real._replace(free=1000))
    assert Checkpointer(folder=str(tmp_path)).save(1, model=model, optimizer=optimizer, extra={}) is not None
    message = capsys.readouterr().err
    assert message.startswith(f"warning: checkpoint folder {tmp_path} has 1000 B free")


@pytest.mark.slow  # a recipe run: about 10 s alone, 25 s on a busy machine
def test_recipe_stops_with_a_message_when_the_folder_cannot_be_made(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    done = run_recipe("steps=2", "batch_size=2", "seq_len=32", "compute.threads=1", "scheduler.warmup_steps=1",
                      f"metrics.folder={tmp_path}", f"checkpoint.folder={tmp_path}/a_file/ck", "checkpoint.every=1",
                      "checkpoint.on_save_error=stop", "metrics.plots=False")
    assert done.returncode == 5, done.stderr
    assert "checkpoint error:" in done.stderr and f"{tmp_path}/a_file/ck" in done.stderr
    assert "the run stops here" in done.stderr and own_traceback_frames(done.stderr) == []


def test_corpus_missing_on_one_rank_names_the_rank_and_the_fix(tmp_path, monkeypatch):
    """What rank 1 of 2 sees when data.path exists only on rank 0's node (simulated: the
    environment torchrun gives rank 1, and a path that does not exist here)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    source = LocalFiles(path=str(tmp_path / "corpus"), domain="web")
    with pytest.raises(FileNotFoundError, match=r"does not exist .* on rank 1 of 2 .*must exist on every node"):
        source.files()
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(FileNotFoundError) as single:
        source.files()
    assert "rank" not in str(single.value)
