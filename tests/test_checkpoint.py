"""dsrb.checkpoint.atomic_write: complete or untouched files, the usual permissions, and a full disk as a clear
error naming the file."""

import io
import os
import re
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from dsrb._files import probe_folder
from dsrb.checkpoint import TMP_PREFIX, atomic_write, remove_stale_temporaries, save_checkpoint


@pytest.fixture
def umask_022():
    before = os.umask(0o022)
    yield
    os.umask(before)


def test_atomic_write_gives_new_files_the_umask_permissions(tmp_path, umask_022):
    """mkstemp makes private 0600 files; a checkpoint is an ordinary file (0644 under umask 022)."""
    path = tmp_path / "last.pt"
    save_checkpoint(str(path), {"x": torch.arange(3)})
    assert path.stat().st_mode & 0o777 == 0o644
    assert torch.equal(torch.load(path)["x"], torch.arange(3))
    assert os.listdir(tmp_path) == ["last.pt"]


@pytest.mark.parametrize("mode", [0o600, 0o664])
def test_atomic_write_keeps_the_permissions_of_the_file_it_replaces(tmp_path, umask_022, mode):
    """A file replaced took the permissions of a new one: ``predict --out private.json`` over a 0600 file left it
    0644, readable by every user, and a group-writable 0664 one lost its group's write. Now they stay."""
    path = tmp_path / "predictions.json"
    path.write_bytes(b"old")
    path.chmod(mode)
    atomic_write(str(path), lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == mode


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), RuntimeError("unexpected pos 390336")])
def test_failed_write_names_the_file_and_keeps_the_old_one(tmp_path, error):
    """A write that fails half-way (torch.save reports a full disk as a RuntimeError) leaves the previous file and
    no temporary behind, and says which file and how much space is free."""
    path = tmp_path / "last.pt"
    path.write_bytes(b"old")

    def write(f):
        f.write(b"half of a new checkpoint")
        raise error

    with pytest.raises(OSError, match=rf"could not write {path} \({type(error).__name__}: .*MiB free in {tmp_path}"):
        atomic_write(str(path), write)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["last.pt"]


def test_failed_close_names_the_file(tmp_path, monkeypatch):
    """On a full disk the file's close flushes what the failed write left buffered and fails again; that error,
    which replaces the first, is named too (it was a bare "[Errno 28] No space left on device")."""
    import dsrb.checkpoint as checkpoint

    class FullOnClose:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
            raise OSError(28, "No space left on device")

    real_fdopen = os.fdopen
    monkeypatch.setattr(checkpoint.os, "fdopen", lambda *a, **k: FullOnClose(real_fdopen(*a, **k)))
    path = tmp_path / "last.pt"
    path.write_bytes(b"old")

    def write(f):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=rf"could not write {path} \(OSError: .*No space.*MiB free in {tmp_path}"):
        atomic_write(str(path), write)
    monkeypatch.undo()
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["last.pt"]


def test_full_disk_during_torch_save(tmp_path):
    """A real short write: torch.save under a file-size limit (as on a full disk) is the same OSError."""
    script = textwrap.dedent(f"""
        import resource, signal, torch
        from dsrb.checkpoint import save_checkpoint
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
        save_checkpoint({str(tmp_path / "last.pt")!r}, {{"w": torch.zeros(1 << 16)}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"OSError: could not write {tmp_path / 'last.pt'}" in proc.stderr, proc.stderr
    assert os.listdir(tmp_path) == []


def test_remove_stale_temporaries(tmp_path):
    """What a write of the named files killed half-way leaves (a whole checkpoint each) goes; nothing else does,
    not even another program's temporary file or folder of the same prefix."""
    (tmp_path / f"{TMP_PREFIX}abc-last.pt").write_bytes(b"partial")
    (tmp_path / "last.pt").write_bytes(b"complete")
    (tmp_path / f"{TMP_PREFIX}editor-notes.txt").write_bytes(b"someone else's")
    (tmp_path / f"{TMP_PREFIX}x-best.pt").mkdir()
    remove_stale_temporaries(str(tmp_path), ("last.pt", "best.pt"))
    assert sorted(os.listdir(tmp_path)) == [f"{TMP_PREFIX}editor-notes.txt", f"{TMP_PREFIX}x-best.pt", "last.pt"]



@pytest.mark.parametrize("visible", [1, 3])
def test_rng_state_of_another_gpu_count_restores_what_both_have(monkeypatch, visible):
    """A checkpoint saved with 2 visible GPUs, resumed where ``visible`` are: the states of the GPUs both have are
    restored, where torch.cuda.set_rng_state_all (mocked as it behaves) fails with an IndexError for fewer GPUs; the
    CPU generators as always."""
    from dsrb.checkpoint import rng_state, set_rng_state

    restored = []

    def set_one(state, device):
        if device >= visible:
            raise IndexError(f"no GPU {device}")
        restored.append((device, state.tolist()))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_one)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: [set_one(s, i) for i, s in enumerate(states)])
    state = rng_state()
    cuda = [torch.full((8,), i, dtype=torch.uint8) for i in range(2)]
    expected = torch.rand(3)
    set_rng_state({**state, "cuda": cuda})
    assert torch.equal(torch.rand(3), expected)
    assert restored == [(i, cuda[i].tolist()) for i in range(min(2, visible))]


def test_atomic_write_follows_links_and_writes_into_pipes(tmp_path):
    """A symlink's target is replaced (the link stays); a named pipe (like /dev/null or /dev/stdout, which a rename
    would replace with a file) is written to, not replaced."""
    target, link = tmp_path / "target.json", tmp_path / "link.json"
    target.write_text("old")
    link.symlink_to(target)
    atomic_write(str(link), lambda f: f.write(b"new"))
    assert link.is_symlink() and target.read_text() == "new"

    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader, so the write does not wait for one
    try:
        atomic_write(str(fifo), lambda f: f.write(b"through the pipe"))
        assert os.read(reader, 100) == b"through the pipe"
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_atomic_write_to_dev_stdout_redirected_to_a_file(tmp_path):
    """--out /dev/stdout with the output redirected to a file: written after what the process printed before (not
    truncating it, not renamed over it)."""
    out = tmp_path / "out.txt"
    code = ("from dsrb.checkpoint import atomic_write; print('before'); "
            "atomic_write('/dev/stdout', lambda f: f.write(b'written\\n')); print('after')")
    with open(out, "wb") as f:
        res = subprocess.run([sys.executable, "-c", code], stdout=f, stderr=subprocess.PIPE, timeout=600)
    assert res.returncode == 0, res.stderr
    assert out.read_text() == "before\nwritten\nafter\n"


def test_ctrl_c_inside_torch_save_is_an_interrupt_and_keeps_the_old_file(tmp_path):
    """A Ctrl-C that lands in one of torch.save's writes reaches atomic_write as a RuntimeError whose context is the
    KeyboardInterrupt: it is raised as KeyboardInterrupt (the tools then stop as interrupted, exit 130), not reported
    as a failed write; the old file stays and no temporary file is left."""
    import torch

    path = tmp_path / "best.pt"
    path.write_bytes(b"old")

    def write(f):
        real = f.write
        calls = []

        def interrupted_write(data):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real(data)

        f.write = interrupted_write
        torch.save({"w": torch.zeros(1000)}, f)

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(path), write)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["best.pt"]


def test_ctrl_c_as_torch_save_starts_ends_the_process_without_an_abort(tmp_path):
    """A Ctrl-C (or SIGTERM) right as torch.save has made its zip writer, before the writer's ``with`` block began (a
    kill soak hit it when signalling as the temporary file of last.pt appeared): the writer, never finished, lived on
    in the traceback's frames until the interpreter exited, when it wrote the archive's end to the closed file and
    aborted the process (SIGABRT, "terminate called ... write to closed file") after the tool's interrupted line.
    Now the process exits with its own status, and no temporary file is left."""
    import torch.serialization

    if not hasattr(torch.serialization, "_open_zipfile_writer_buffer"):
        pytest.skip("this torch makes its zip writer otherwise")
    script = textwrap.dedent(f"""
        import torch, torch.serialization
        from dsrb.checkpoint import save_checkpoint

        def interrupted(self):  # the signal lands as the writer is made, before torch.save's with block
            raise KeyboardInterrupt

        torch.serialization._open_zipfile_writer_buffer.__enter__ = interrupted
        try:
            save_checkpoint({str(tmp_path / "last.pt")!r}, {{"w": torch.zeros(4)}})
        except KeyboardInterrupt:
            raise SystemExit(130)  # as the tools stop: inside the except, the traceback kept as the context
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130 and "terminate called" not in proc.stderr, (proc.returncode, proc.stderr)
    assert os.listdir(tmp_path) == []


def test_a_folder_that_refuses_new_files_names_the_file_meant(tmp_path, monkeypatch):
    """A run directory that became read-only mid-run (a remount; chmod does not stop root): the error names
    last.pt and the free space, not the temporary file that could not be created; last.pt is unchanged."""
    path = tmp_path / "last.pt"
    path.write_bytes(b"old")

    real_open = os.open

    def refuse(name, *args, **kwargs):
        if os.path.basename(name).startswith(TMP_PREFIX):
            raise PermissionError(1, "Operation not permitted", name)
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(OSError, match=rf"could not write {path} \(PermissionError: .*MiB free in {tmp_path}; the "
                                      r"previous last.pt, if any, is unchanged"):
        atomic_write(str(path), lambda f: f.write(b"new"))
    assert path.read_bytes() == b"old"


@pytest.mark.parametrize("writer", ["atomic_write", "probe_folder"])
def test_a_signal_as_the_temporary_file_is_made_leaves_no_file(tmp_path, monkeypatch, writer):
    """A Ctrl-C (or SIGTERM, raised as an exception by the tools) that lands right after the temporary file (or the
    tools' probe of an output folder) was created, before its name was known: tempfile.mkstemp hands the name back
    only then, so it was left behind."""
    path = tmp_path / "predictions.json"
    path.write_bytes(b"old")
    real_open = os.open

    def open_then_interrupt(name, *args, **kwargs):
        fd = real_open(name, *args, **kwargs)
        if os.path.basename(name).startswith(TMP_PREFIX):
            os.close(fd)
            raise KeyboardInterrupt  # as a signal handler would, between the open and the caller's next step
        return fd

    monkeypatch.setattr(os, "open", open_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        if writer == "atomic_write":
            atomic_write(str(path), lambda f: f.write(b"new"))
        else:
            probe_folder(str(tmp_path))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["predictions.json"] and path.read_bytes() == b"old"


class _Payload:
    """Unpickling it runs ``open(path, "w")``: what a hostile checkpoint could do with any function instead."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_loading_refuses_a_checkpoint_that_would_run_code(tmp_path):
    """load_checkpoint (every tool's --checkpoint, load_model, --resume) unpickles with weights_only=True: a file
    holding anything but what a dsrb checkpoint holds is refused, naming it, and its code does not run."""
    import numpy as np

    from dsrb.checkpoint import load_checkpoint, rng_state

    ran = tmp_path / "ran"
    save_checkpoint(str(tmp_path / "bad.pt"), {"model": {}, "epoch": 1, "extra": _Payload(ran)})
    with pytest.raises(ValueError, match=r"bad\.pt holds a _?io\.open, which no checkpoint of python -m dsrb\."
                                         r"train holds; not loaded, since unpickling it could run code"):
        load_checkpoint(str(tmp_path / "bad.pt"))
    assert not ran.exists()

    # What a checkpoint does hold loads as saved: NumPy's RNG state and scalars, and torch's version as the
    # TorchVersion that checkpoints written before 2026-12-06 hold.
    state = {"rng": [rng_state()], "metrics": {"mAP": np.float64(0.5)}, "versions": {"torch": torch.__version__},
             "model": {"w": torch.ones(2)}, "config": {"lr": 1e-3, "out": None, "amp": "none"}}
    save_checkpoint(str(tmp_path / "good.pt"), state)
    got = load_checkpoint(str(tmp_path / "good.pt"))
    assert got["rng"][0]["numpy"][0] == "MT19937"
    np.testing.assert_array_equal(got["rng"][0]["numpy"][1], state["rng"][0]["numpy"][1])
    assert got["rng"][0]["python"] == state["rng"][0]["python"] and torch.equal(got["rng"][0]["torch"],
                                                                                 state["rng"][0]["torch"])
    assert got["metrics"] == state["metrics"] and got["versions"] == {"torch": str(torch.__version__)}
    assert torch.equal(got["model"]["w"], torch.ones(2)) and got["config"] == state["config"]


def test_a_pickle_that_is_no_checkpoint_is_one_line_without_torchs_advice(tmp_path):
    """torch's refusal of an unknown pickle opcode comes with its advice to load with weights_only=False, the unsafe
    load this library refuses: the message keeps torch's reason only."""
    import pickle
    import warnings

    from dsrb.checkpoint import load_checkpoint

    path = tmp_path / "notes.pt"
    path.write_bytes(pickle.dumps({"x": 1}, protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns of the pickle protocol
        with pytest.raises(ValueError) as raised:
            load_checkpoint(str(path))
    message = str(raised.value)
    assert message.startswith(f"checkpoint {path} could not be read (UnpicklingError: ")
    assert "weights_only" not in message and "\n" not in message, message


def test_an_empty_checkpoint_says_it_is_empty(tmp_path):
    """A 0-byte file (a copy that failed at once, a full disk) said "could not be read (EOFError: )": torch's error
    has no message. Now it says the file is empty."""
    from dsrb.checkpoint import load_checkpoint

    path = tmp_path / "best.pt"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"^checkpoint {re.escape(str(path))} is empty \(0 bytes\); expected a "
                                         r"checkpoint written by python -m dsrb\.train$"):
        load_checkpoint(str(path))


class _Shell:
    """Unpickling it runs ``os.system(command)``: os (posix) is a module torch's weights_only unpickler blocks
    outright, with a message of its own."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_checkpoint_naming_a_blocked_module_is_refused_as_unsafe(tmp_path):
    """torch words the refusal of a blocked module's global ("Trying to load unsupported GLOBAL posix.system whose
    module posix is blocked") unlike that of a global not allowed: it was reported as a file that "could not be
    read", truncated, with torch's advice to load it with weights_only=False. Now the refusal any unsafe global
    gets, without that advice."""
    from dsrb.checkpoint import load_checkpoint

    ran = tmp_path / "ran"
    save_checkpoint(str(tmp_path / "shell.pt"), {"model": {}, "extra": _Shell(f"touch {ran}")})
    refusal = (r"shell\.pt holds a (posix|nt|os)\.system, which no checkpoint of python -m dsrb\.train holds; not "
               r"loaded, since unpickling it could run code")
    with pytest.raises(ValueError, match=refusal) as raised:
        load_checkpoint(str(tmp_path / "shell.pt"))
    assert "weights_only" not in str(raised.value) and "\n" not in str(raised.value)
    assert not ran.exists()


@pytest.mark.parametrize("stem", ["p" * 245, "é" * 122])  # 250 bytes with ".json": a name that can be made
def test_a_name_the_file_system_takes_can_be_written(tmp_path, stem):
    """A name of up to the file system's limit (255 bytes) is written: the temporary name, which adds ".tmp-" and 8
    random characters, was "File name too long" after all the work. What a killed write of it leaves is still found
    by remove_stale_temporaries."""
    name = stem + ".json"
    path = tmp_path / name
    atomic_write(str(path), lambda f: f.write(b"{}"))
    assert path.read_bytes() == b"{}" and os.listdir(tmp_path) == [name]

    code = ("import os, sys; from dsrb._files import atomic_write; "
            "atomic_write(sys.argv[1], lambda f: (f.write(b'half'), f.flush(), os._exit(0)))")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], check=True, timeout=600)
    left = [n for n in os.listdir(tmp_path) if n != name]
    assert len(left) == 1 and left[0].startswith(TMP_PREFIX) and len(os.fsencode(left[0])) <= 255, left
    remove_stale_temporaries(str(tmp_path), (name, "last.pt"))
    assert os.listdir(tmp_path) == [name] and path.read_bytes() == b"{}"


def _damage(raw: bytes, where: str) -> bytes:
    """``raw`` (a torch.save zip archive) with one byte of its first tensor record changed: in the data, in the local
    header's name length (the data is then read from one byte further on), or the folder bit of the central
    directory's attributes (the record is then read as empty)."""
    import struct
    import zipfile

    archive = zipfile.ZipFile(io.BytesIO(raw))
    infos = archive.infolist()
    index, info = next((i, x) for i, x in enumerate(infos) if "/data/" in x.filename)
    data = bytearray(raw)
    if where == "data":
        name_length, extra_length = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
        data[info.header_offset + 30 + name_length + extra_length + 5] ^= 0x01
    elif where == "name length":
        data[info.header_offset + 26] ^= 0x01
    else:  # the central directory: entries of 46 bytes and their name, extra field and comment
        offset = archive.start_dir
        for entry in infos[:index]:
            offset += 46 + len(entry.orig_filename.encode()) + len(entry.extra) + len(entry.comment)
        assert raw[offset:offset + 4] == b"PK\x01\x02"
        data[offset + 38] ^= 0x10
    return bytes(data)


@pytest.mark.parametrize("where", ["data", "name length", "folder attribute"])
def test_a_checkpoint_with_a_changed_byte_is_refused_as_damaged(tmp_path, where):
    """torch.load checks no CRC-32: one byte changed on disk (or in a copy) loaded without an error as other weights
    (shifted or empty data). load_checkpoint checks the CRC-32 each record was written with, and names the file and
    the record."""
    from dsrb.checkpoint import load_checkpoint

    path = tmp_path / "last.pt"
    state = {"model": {"w": torch.arange(64, dtype=torch.float32)}, "epoch": 3}
    save_checkpoint(str(path), state)
    path.write_bytes(_damage(path.read_bytes(), where))
    with pytest.raises(ValueError, match=rf"^checkpoint {re.escape(str(path))} is damaged: its record "
                                         r"archive/data/0 .*changed after it was saved .*restore it from a copy"):
        load_checkpoint(str(path))


def test_checkpoints_without_a_crc_or_in_the_legacy_format_still_load(tmp_path):
    """What the CRC-32 check leaves alone: a checkpoint written with torch's CRC-32s turned off (stored as 0) and one
    in torch's pre-zip format load as saved; a truncated one is still reported as such."""
    from dsrb.checkpoint import load_checkpoint

    state = {"model": {"w": torch.arange(64, dtype=torch.float32)}, "epoch": 3}
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    written = [tmp_path / "legacy.pt"]
    if hasattr(torch.serialization, "set_crc32_options"):  # torch >= 2.6
        torch.serialization.set_crc32_options(False)
        try:
            save_checkpoint(str(tmp_path / "no-crc.pt"), state)
        finally:
            torch.serialization.set_crc32_options(True)
        written.append(tmp_path / "no-crc.pt")
    for path in written:
        got = load_checkpoint(str(path))
        assert got["epoch"] == 3 and torch.equal(got["model"]["w"], state["model"]["w"]), path
    save_checkpoint(str(tmp_path / "last.pt"), state)
    raw = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=rf"^checkpoint {re.escape(str(tmp_path / 'last.pt'))} could not be read .*"
                                         "the file is truncated"):
        load_checkpoint(str(tmp_path / "last.pt"))
