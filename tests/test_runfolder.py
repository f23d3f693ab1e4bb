"""Run folders: manifest, lock, fresh start, atomic writes, checksummed checkpoints, metrics checked on resume."""

import errno
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from carv import _runfolder as rf
from carv._runfolder import (
    CorruptFileError,
    RunFolder,
    RunFolderError,
    RunFolderWarning,
    RunState,
    load_tensors,
    read_json,
    save_tensors,
)


def _ckpt_run(path, steps=(1, 2, 3), keep=2):
    st = RunState(path, keep=keep)
    st.start()
    for s in steps:
        st.append({"step": s, "v": float(s)})
        st.save(s, {"w": torch.full((4,), float(s))}, {"step": s})
    return st


# ----------------------------------------------------------------------------- manifest and lock
def test_another_commands_folder_is_refused(tmp_path):
    with RunFolder(tmp_path / "r", "carv text-to-3d", {"lr": 0.1}):
        (tmp_path / "r" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunFolderError, match=r"holds a `carv text-to-3d` run, not a `carv distill` run"):
        RunFolder(tmp_path / "r", "carv distill", {"lr": 0.1}).__enter__()
    # --fresh moves aside only a run of the same command: another command's run is refused too
    with pytest.raises(RunFolderError, match=r"text-to-3d` run; --fresh moves aside only a `carv distill`"):
        RunFolder(tmp_path / "r", "carv distill", {"lr": 0.1}, fresh=True).__enter__()
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == "{}\n"  # nothing was touched
    # a non-empty folder that no carv command made is refused too
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="not a carv run folder"):
        RunFolder(tmp_path / "other", "carv demo", {}).__enter__()


def test_a_different_configuration_is_refused_naming_the_fields_and_fresh(tmp_path):
    with RunFolder(tmp_path, "carv distill", {"R": 8, "steps": 10}, resumable=("steps",)):
        pass
    with RunFolder(tmp_path, "carv distill", {"R": 8, "steps": 50}, resumable=("steps",)):
        rf.atomic_write_text(tmp_path / "config.json", "{}")  # a resumable key may change (recorded at a write)
    with pytest.raises(RunFolderError, match=r"R: 8 -> 4.*--fresh"):
        RunFolder(tmp_path, "carv distill", {"R": 4, "steps": 50}, resumable=("steps",)).__enter__()
    assert read_json(tmp_path / rf.MANIFEST)["config"] == {"R": 8, "steps": 50}


def test_second_process_is_refused_naming_the_holders_pid_and_a_dead_holder_is_taken_over(tmp_path):
    with RunFolder(tmp_path, "carv demo", {}):
        with pytest.raises(RunFolderError, match=rf"in use by another carv process \(PID {os.getpid()}\)"):
            RunFolder(tmp_path, "carv demo", {}).__enter__()
        # from another process too
        code = ("import sys; from carv._runfolder import RunFolder\n"
                "try:\n    RunFolder(sys.argv[1], 'carv demo', {}).__enter__()\n"
                "except ValueError as e:\n    print(e); sys.exit(3)\n")
        res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=120)
        assert res.returncode == 3 and f"PID {os.getpid()}" in res.stdout
    # a process killed with -9 leaves its lock file behind; the kernel dropped its lock, so it is taken over
    p = subprocess.Popen([sys.executable, "-c", "import sys, time; from carv._runfolder import RunFolder\n"
                          "RunFolder(sys.argv[1], 'carv demo', {}).__enter__(); print('locked', flush=True)\n"
                          "time.sleep(60)", str(tmp_path)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert p.stdout.readline().strip() == "locked"
    with pytest.raises(RunFolderError, match=f"PID {p.pid}"):
        RunFolder(tmp_path, "carv demo", {}).__enter__()
    p.kill()
    p.wait()
    assert (tmp_path / rf.LOCK).read_text().split()[0] == str(p.pid)  # stale lock file
    with RunFolder(tmp_path, "carv demo", {}):
        assert (tmp_path / rf.LOCK).read_text().split()[0] == str(os.getpid())


def test_fresh_moves_the_old_run_aside_before_writing_anything(tmp_path):
    run = tmp_path / "run"
    with RunFolder(run, "carv distill", {"R": 8}):
        _ckpt_run(run)
    with RunFolder(run, "carv distill", {"R": 4}, fresh=True) as f:
        assert f.previous is not None and f.previous.parent == tmp_path
        assert sorted(p.name for p in run.iterdir()) == [rf.LOCK, rf.MANIFEST]  # nothing of the old run left
        assert RunState(run).load() is None
    old = f.previous
    assert read_json(old / rf.MANIFEST)["config"] == {"R": 8}  # nothing lost
    assert RunState(old).load()[1] == {"step": 3}
    # the next plain run is the fresh run's (R = 4); the old configuration is refused there
    with pytest.raises(RunFolderError, match="R: 4 -> 8"):
        RunFolder(run, "carv distill", {"R": 8}).__enter__()


# ----------------------------------------------------------------------------- atomic writes
def test_a_failed_write_leaves_the_old_file_and_names_the_path(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    rf.atomic_write_json(path, {"a": 1})

    def full(p, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(p))

    monkeypatch.setattr(rf, "_write_bytes", full)
    with pytest.raises(OSError) as e:
        rf.atomic_write_json(path, {"a": 2})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)  # the file, not its temporary name
    assert read_json(path) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporary left behind


def test_every_writer_names_the_file_it_could_not_write(tmp_path, monkeypatch):
    """Benchmark state, teacher weights and figures go through atomic_path too: a failed fsync (a full disk)
    names the destination and leaves no temporary file."""
    import torch

    from carv.schedules import VPSchedule
    from carv.teachers.unet import CompactUNet, save_unet_teacher

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rf.os, "fsync", full)
    target = tmp_path / "teacher.safetensors"
    with pytest.raises(OSError) as e:
        save_unet_teacher(target, CompactUNet(in_channels=1, base_channels=4, channel_mults=(1,)),
                          VPSchedule.from_betas(1e-4, 0.02, 10))
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    with pytest.raises(OSError) as e:
        rf.save_tensors(tmp_path / "state.safetensors", {"a": torch.zeros(2)})
    assert e.value.filename == str(tmp_path / "state.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_bad_json_names_the_file(tmp_path):
    (tmp_path / "state.json").write_bytes(b'{"step": 3, "x": \xff')
    with pytest.raises(CorruptFileError, match="state.json"):
        read_json(tmp_path / "state.json", "state")
    (tmp_path / "cut.json").write_text('{"step": 3, "x"')
    with pytest.raises(CorruptFileError, match="cut.json"):
        read_json(tmp_path / "cut.json")



def test_update_json_changes_only_its_entries_and_never_leaves_half_a_file(tmp_path, monkeypatch):
    """Several benchmark scripts write entries of one docs JSON: each keeps the others' entries and their place, the
    file keeps atomic_write_json's format (a rewrite by another writer changes only the entries it sets), a failed
    write leaves the old file, and a damaged or non-object file is named."""
    path = tmp_path / "docs" / "bench.json"
    rf.update_json(path, {"headline": {"value": 1.5}})  # a missing file (and folder) starts empty
    rf.update_json(path, {"sweep": [1, 2], "other": "x"})
    before = path.read_text()
    assert json.loads(before) == {"headline": {"value": 1.5}, "sweep": [1, 2], "other": "x"}
    assert before == json.dumps(json.loads(before), indent=2) + "\n"

    doc = rf.update_json(path, lambda d: {"sweep": d["sweep"] + [3]})  # entries computed from the current object
    assert list(doc) == ["headline", "sweep", "other"] and doc["sweep"] == [1, 2, 3]
    assert path.read_text() == before.replace("    2\n", "    2,\n    3\n")  # only the changed lines differ

    def full(p, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(p))

    monkeypatch.setattr(rf, "_write_bytes", full)
    with pytest.raises(OSError):
        rf.update_json(path, {"sweep": []})
    monkeypatch.undo()
    assert read_json(path)["sweep"] == [1, 2, 3]
    path.write_text("[1, 2]\n")
    with pytest.raises(CorruptFileError, match=r"--json: .*bench.json.* not an object"):
        rf.update_json(path, {"a": 1}, "--json")
    path.write_text('{"a": ')
    with pytest.raises(CorruptFileError, match="bench.json"):
        rf.update_json(path, {"a": 1})

# ----------------------------------------------------------------------------- checksummed checkpoints
@pytest.mark.parametrize("damage", ["empty", "truncated", "random", "bitflip_data", "bitflip_header"])
def test_damaged_tensor_files_are_named_never_loaded(tmp_path, damage):
    path = tmp_path / "c.safetensors"
    save_tensors(path, {"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3, 3)}, {"k": "v"})
    data = bytearray(path.read_bytes())
    g = torch.Generator().manual_seed(0)
    if damage == "empty":
        data = b""
    elif damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "random":
        data = torch.randint(0, 256, (len(data),), generator=g, dtype=torch.uint8).numpy().tobytes()
    elif damage == "bitflip_data":  # 200 flipped bytes in the tensor data: loads fine without the checksum
        for i in torch.randperm(len(data) - 200, generator=g)[:200].tolist():
            data[200 + i] ^= 0xFF
    else:
        data[30] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="c.safetensors"):
        load_tensors(path)


def test_damaged_newest_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path):
    _ckpt_run(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-0000002.safetensors",
                                                                       "checkpoint-0000003.safetensors"]
    newest = tmp_path / "checkpoint-0000003.safetensors"
    data = bytearray(newest.read_bytes())
    data[-5] ^= 0xFF
    newest.write_bytes(bytes(data))
    st = RunState(tmp_path)
    with pytest.warns(RunFolderWarning, match=r"checkpoint-0000003.*fails its checksum.*previous good.*step 2"):
        tensors, state = st.load()
    assert state == {"step": 2} and torch.equal(tensors["w"], torch.full((4,), 2.0))
    assert [r["step"] for r in st.rows] == [1, 2]  # metrics back to checkpoint 2's rows
    assert (tmp_path / "checkpoint-0000003.safetensors.corrupt").is_file()  # kept, never tried again
    # when no checkpoint verifies: a clear error naming them, every time (never a silent start from scratch)
    (tmp_path / "checkpoint-0000002.safetensors").write_bytes(b"")
    for _ in range(2):
        with pytest.raises(CorruptFileError, match=r"checkpoint-0000002.*No good checkpoint.*--fresh"):
            RunState(tmp_path).load()


# ----------------------------------------------------------------------------- metrics against the checkpoint
@pytest.mark.parametrize("damage", ["emptied", "deleted", "middle_line_cut", "row_missing", "bad_bytes"])
def test_metrics_that_lost_rows_are_rebuilt_from_the_checkpoint_with_a_warning(tmp_path, damage):
    _ckpt_run(tmp_path, steps=(1, 2, 3, 4))
    m = tmp_path / "metrics.jsonl"
    lines = m.read_text().splitlines(keepends=True)
    if damage == "emptied":
        m.write_text("")
    elif damage == "deleted":
        m.unlink()
    elif damage == "middle_line_cut":
        m.write_text("".join(lines[:1] + [lines[1][:7] + "\n"] + lines[2:]))
    elif damage == "row_missing":
        m.write_text("".join(lines[:2] + lines[3:]))
    else:
        m.write_bytes(b"".join(ln.encode() for ln in lines[:2]) + b"\xff\xfe\n" + lines[3].encode())
    st = RunState(tmp_path)
    with pytest.warns(RunFolderWarning, match=r"metrics.jsonl.*checkpoint step 4.*rebuilt"):
        st.load()
    assert [json.loads(ln)["step"] for ln in m.read_text().splitlines()] == [1, 2, 3, 4]


def test_rows_after_the_checkpoint_are_set_aside_with_one_warning(tmp_path):
    st = _ckpt_run(tmp_path, steps=(1, 2))
    st.append({"step": 3, "v": 3.0})  # written after the last checkpoint: redone on resume, kept aside
    st2 = RunState(tmp_path)
    with pytest.warns(RunFolderWarning, match=r"1 rows of .*metrics.jsonl.* come after checkpoint step 2") as w:
        st2.load()
    assert len(w) == 1
    assert [r["step"] for r in st2.rows] == [1, 2]
    aside = list(tmp_path.glob("metrics.set-aside-*.jsonl"))
    assert len(aside) == 1 and [json.loads(ln)["step"] for ln in aside[0].read_text().splitlines()] == [3]
    # a resume that matches the checkpoint exactly is quiet and rewrites nothing
    before = (tmp_path / "metrics.jsonl").stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RunState(tmp_path).load()
    assert (tmp_path / "metrics.jsonl").stat().st_mtime_ns == before


# ----------------------------------------------------------------------------- case 5 against the CLI
def _tree(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name != rf.LOCK}


def test_compare_on_a_plain_run_and_a_changed_distill_run_are_refused_naming_fresh(tmp_path):
    """Issue 11, cases 3 and 5: --compare on a plain text-to-3d folder used to add carv/ and baseline/ beside the old
    run; distill's refusal said "resume=False" instead of naming --fresh. Both are refused before any work, the
    folder untouched."""
    from dataclasses import asdict

    from typer.testing import CliRunner

    from carv.apps.distill import DistillConfig
    from carv.apps.text_to_3d import TextTo3DConfig
    from carv.cli import app

    def err(res):
        return " ".join(res.output.replace("│", " ").split()) + " " + str(res.exception or "")

    plain = tmp_path / "plain"
    with RunFolder(plain, "carv text-to-3d", TextTo3DConfig().identity()):
        pass
    before = _tree(plain)
    res = CliRunner().invoke(app, ["text-to-3d", "--compare", "--out", str(plain)])
    assert res.exit_code != 0 and "not a `carv text-to-3d --compare` run" in err(res) and "--fresh" in err(res)
    assert _tree(plain) == before and sorted(before) == [rf.MANIFEST]

    d = tmp_path / "distill"
    with RunFolder(d, "carv distill", asdict(DistillConfig())):
        pass
    res = CliRunner().invoke(app, ["distill", "--R", "4", "--out", str(d)])
    assert res.exit_code != 0 and "R: 8 -> 4" in err(res) and "--fresh" in err(res), err(res)
    assert "resume=" not in err(res)

    # case 3: another command's folder (they used to delete its metrics.jsonl and config.json, exit 0)
    for args, folder, held in ((["distill"], plain, "carv text-to-3d"), (["demo", "--quick"], plain, "carv text-to-3d"),
                               (["text-to-3d"], d, "carv distill")):
        before = _tree(folder)
        res = CliRunner().invoke(app, [*args, "--out", str(folder)])
        assert res.exit_code != 0 and f"holds a `{held}` run" in err(res), (args, err(res))
        assert _tree(folder) == before


def test_a_default_given_explicitly_is_the_same_configuration():
    """Case 5: `--proposal auto` (the default) was refused as a change "None -> 'auto'"."""
    from carv.apps.text_to_3d import TextTo3DConfig

    base = TextTo3DConfig().identity()
    for field, value in (("proposal", "auto"), ("stratify", "per_upstream"), ("upstream", "lattice")):
        assert TextTo3DConfig(**{field: value}).identity() == base, field
    assert TextTo3DConfig(method="baseline", proposal="none").identity() == TextTo3DConfig(method="baseline").identity()


def test_damaged_benchmark_state_is_named_not_a_json_or_safetensors_traceback(tmp_path):
    """Case 4 for the benchmarks' resumable state: a damaged measure_state.json / .safetensors names the file."""
    from carv.bench.harness import Config, measure

    def estimate(c, g, meter):
        return torch.randn(2, generator=g, dtype=torch.float64)

    cfgs, state = [Config("m", 1, 1)], tmp_path / "s"
    measure(cfgs, estimate, torch.zeros(2), 3, progress=False, state_dir=state)
    good = (state / "measure_state.json").read_bytes()
    (state / "measure_state.json").write_bytes(good[: len(good) // 2])
    with pytest.raises(CorruptFileError, match="benchmark state: .*measure_state.json"):
        measure(cfgs, estimate, torch.zeros(2), 3, progress=False, state_dir=state)
    (state / "measure_state.json").write_bytes(good)
    (state / "measure_state.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CorruptFileError, match="benchmark state: .*measure_state.safetensors"):
        measure(cfgs, estimate, torch.zeros(2), 3, progress=False, state_dir=state)


# ----------------------------------------------------------------------------- issue 25: every fault class at its root
_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != rf.LOCK}


def test_a_real_write_failure_of_any_library_is_one_write_error_naming_the_file(tmp_path):
    """A real failure, not a shim: the file-size limit (RLIMIT_FSIZE, no privileges needed) makes safetensors
    raise SafetensorError and matplotlib an OSError mid-write; both end as one WriteError naming the file, and the
    previous checkpoint is left whole."""
    code = """if True:
        import resource, signal, sys, torch
        from carv import _runfolder as rf
        folder = sys.argv[1]
        rf.save_tensors(folder + "/ck.safetensors", {"w": torch.zeros(4)})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
        fig = plt.figure(figsize=(20, 20)); plt.imshow(torch.rand(500, 500).numpy())
        for write in (lambda: rf.save_tensors(folder + "/ck.safetensors", {"w": torch.ones(100000)}),
                      lambda: rf.save_figure(fig, folder + "/big.png")):
            try:
                write()
            except rf.WriteError as e:
                print(type(e.__cause__).__name__, "|", e)
    """
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=_ENV,
                         timeout=120)
    lines = res.stdout.splitlines()
    assert res.returncode == 0 and len(lines) == 2, res.stderr
    assert lines[0].startswith("SafetensorError | could not write") and "ck.safetensors': File too large" in lines[0]
    assert "big.png': File too large" in lines[1]
    assert load_tensors(tmp_path / "ck.safetensors")[0]["w"].shape == (4,)  # the last good file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.safetensors"]  # no temporary left


def test_an_append_that_fails_leaves_no_half_line(tmp_path, monkeypatch):
    path = tmp_path / "m.jsonl"
    rf.append_line(path, '{"step": 1}')
    real_write = os.write

    def short(fd, data):  # the disk fills after a few bytes of the line
        real_write(fd, data[:5])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rf.os, "write", short)
    with pytest.raises(rf.WriteError, match=r"m.jsonl': No space left on device"):
        rf.append_line(path, '{"step": 2}')
    assert path.read_text() == '{"step": 1}\n'


def test_deleting_the_lock_file_does_not_let_a_second_process_in(tmp_path):
    code = ("import sys; from carv._runfolder import RunFolder\n"
            "try:\n    RunFolder(sys.argv[1], 'carv demo', {}).__enter__(); print('entered')\n"
            "except ValueError as e:\n    print(e); sys.exit(3)\n")
    with RunFolder(tmp_path, "carv demo", {}):
        (tmp_path / rf.LOCK).unlink()
        res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=_ENV,
                             timeout=120)
        assert res.returncode == 3 and "in use by another carv process" in res.stdout, res.stdout + res.stderr
        rf.atomic_write_text(tmp_path / "x.txt", "still mine")  # the holder re-creates its lock file and goes on
        assert (tmp_path / rf.LOCK).read_text().split()[0] == str(os.getpid())


def test_a_replaced_lock_file_or_folder_stops_the_holder_before_it_writes(tmp_path):
    run = tmp_path / "run"
    with RunFolder(run, "carv demo", {}):
        (run / rf.LOCK).unlink()
        (run / rf.LOCK).write_text("4242\n")  # another (older) process's lock file
        with pytest.raises(RunFolderError, match=r"lock file .* was replaced .*PID 4242"):
            rf.atomic_write_text(run / "x.txt", "x")
        assert not (run / "x.txt").exists()
    with RunFolder(run, "carv demo", {}):
        os.rename(run, tmp_path / "moved")
        run.mkdir()
        st = RunState(run)
        with pytest.raises(RunFolderError, match="was removed or replaced while this run was writing"):
            st.start()
    assert list(run.iterdir()) == []


def test_fresh_resolves_dotdot_and_never_moves_into_a_hidden_folder(tmp_path):
    run = tmp_path / "run"
    with RunFolder(run, "carv demo", {"a": 1}):
        rf.atomic_write_text(run / "table.md", "old")
    (run / "a").mkdir()
    with RunFolder(run / "a" / "..", "carv demo", {"a": 2}, fresh=True) as f:
        assert f.previous.parent == tmp_path and f.previous.name.startswith("run.old-")
    assert (f.previous / "table.md").read_text() == "old"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    link = tmp_path / "link"
    link.symlink_to(run)
    with RunFolder(link, "carv demo", {"a": 3}, fresh=True) as g:
        assert g.previous.parent == tmp_path and g.previous.name.startswith("run.old-")
    assert link.is_symlink() and read_json(run / rf.MANIFEST)["config"] == {"a": 3}


def test_fresh_refuses_what_it_does_not_own(tmp_path):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(RunFolderError, match="not a carv run folder.*--fresh moves aside only a run folder carv wrote"):
        RunFolder(mine, "carv demo", {}, fresh=True).__enter__()
    other = tmp_path / "t2d"
    with RunFolder(other, "carv text-to-3d", {}):
        pass
    with pytest.raises(RunFolderError, match="--fresh moves aside only a `carv demo` run"):
        RunFolder(other, "carv demo", {}, fresh=True).__enter__()
    assert (mine / "thesis.tex").read_text() == "years of work" and (other / rf.MANIFEST).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "t2d"]


def test_fresh_never_moves_a_folder_holding_a_live_run(tmp_path):
    parent = tmp_path / "runs"
    with RunFolder(parent, "carv demo", {}):
        pass
    child = parent / "sub" / "live"
    p = subprocess.Popen([sys.executable, "-c", "import sys, time; from carv._runfolder import RunFolder\n"
                          "RunFolder(sys.argv[1], 'carv demo', {}).__enter__(); print('locked', flush=True)\n"
                          "time.sleep(60)", str(child)], stdout=subprocess.PIPE, text=True, env=_ENV)
    try:
        assert p.stdout.readline().strip() == "locked"
        before = _files(parent)
        with pytest.raises(RunFolderError, match=rf"holds the live run folder .*live' \(in use by PID {p.pid}\)"):
            RunFolder(parent, "carv demo", {}, fresh=True).__enter__()
        (child / rf.LOCK).unlink()  # deleting the lock file does not hide the live run
        with pytest.raises(RunFolderError, match="holds the live run folder"):
            RunFolder(parent, "carv demo", {}, fresh=True).__enter__()
        assert _files(parent) == before and child.is_dir()
    finally:
        p.kill()
        p.wait()
    with RunFolder(parent, "carv demo", {}, fresh=True) as f:  # once it has ended, the folder is movable
        assert (f.previous / "sub" / "live" / rf.MANIFEST).is_file()


@pytest.mark.parametrize("config", [[1, 2], None, "text", 3])
def test_a_manifest_whose_config_is_not_a_mapping_is_one_line(tmp_path, config):
    with RunFolder(tmp_path, "carv demo", {}):
        pass
    m = read_json(tmp_path / rf.MANIFEST)
    rf.atomic_write_json(tmp_path / rf.MANIFEST, {**m, "config": config})
    with pytest.raises(RunFolderError, match=r"is damaged \(its config is .*, not a mapping\).*--fresh"):
        RunFolder(tmp_path, "carv demo", {}).__enter__()
    with RunFolder(tmp_path, "carv demo", {}, fresh=True) as f:  # still a carv run folder: --fresh moves it
        assert f.previous is not None


def test_no_checkpoint_left_sets_the_metrics_aside_with_a_warning(tmp_path):
    _ckpt_run(tmp_path, steps=(1, 2, 3))
    rows = (tmp_path / "metrics.jsonl").read_text()
    for c in tmp_path.glob("checkpoint-*"):
        c.unlink()
    with pytest.warns(RunFolderWarning, match=r"holds 3 rows but no checkpoint .*moved them to .*set-aside"):
        assert RunState(tmp_path).load() is None
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    assert [p.read_text() for p in tmp_path.glob("metrics.set-aside-*.jsonl")] == [rows]


def test_a_checkpoint_renamed_to_a_higher_step_is_not_a_rollback(tmp_path):
    _ckpt_run(tmp_path, steps=(2, 4, 6), keep=2)
    os.rename(tmp_path / "checkpoint-0000004.safetensors", tmp_path / "checkpoint-0000009.safetensors")
    st = RunState(tmp_path)
    with pytest.warns(RunFolderWarning, match=r"holds step 4, not the step in its name"):
        _, state = st.load()
    assert state == {"step": 6} and [r["step"] for r in st.rows] == [2, 4, 6]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-0000004.safetensors",
                                                                     "checkpoint-0000006.safetensors"]


def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    _ckpt_run(tmp_path, steps=(1, 2, 3), keep=3)
    newest = tmp_path / "checkpoint-0000003.safetensors"
    newest.unlink()
    newest.mkdir()  # unreadable as a file (a permission-denied file reads the same; root bypasses permissions)
    st = RunState(tmp_path)
    with pytest.warns(RunFolderWarning, match=r"checkpoint-0000003.*resuming from the previous good checkpoint"):
        _, state = st.load()
    assert state == {"step": 2}
    aside = list(tmp_path.glob("metrics.set-aside-*.jsonl"))
    assert len(aside) == 1 and json.loads(aside[0].read_text())["step"] == 3  # the row past step 2 is kept


def test_a_foreign_checkpoint_is_refused_before_anything_is_touched(tmp_path):
    _ckpt_run(tmp_path, steps=(1, 2, 3))
    (tmp_path / "metrics.jsonl").write_text((tmp_path / "metrics.jsonl").read_text() + '{"step": 4}\n')
    before = _files(tmp_path)

    def accept(tensors, state):
        raise ValueError("out: holds a run with a different config (fields ['seed'])")

    with pytest.raises(ValueError, match="different config"):
        RunState(tmp_path).load(accept=accept)
    assert _files(tmp_path) == before


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # a process id that has ended
    with RunFolder(tmp_path, "carv demo", {}):
        pass
    stale = tmp_path / f".checkpoint-0000004.safetensors.{p.pid}.tmp"
    live = tmp_path / f".checkpoint-0000004.safetensors.{os.getppid()}.tmp"  # a live process: not ours to remove
    for f in (stale, live):
        f.write_bytes(b"half")
    RunState(tmp_path).load()
    assert not stale.exists() and live.exists()
    (tmp_path / "sub").mkdir()
    stale2 = tmp_path / "sub" / f".final.safetensors.{p.pid}.tmp"
    stale2.write_bytes(b"half")
    with RunFolder(tmp_path, "carv demo", {}):
        pass
    assert not stale2.exists() and live.exists()


def test_checkpoints_sort_by_step_past_ten_million(tmp_path):
    st = _ckpt_run(tmp_path, steps=(9_999_999, 10_000_000, 10_000_001), keep=2)
    assert [p.name for p in st.checkpoints()] == ["checkpoint-10000001.safetensors", "checkpoint-10000000.safetensors"]
    st2 = RunState(tmp_path)
    assert st2.load()[1] == {"step": 10_000_001} and len(st2.rows) == 3


def test_reopening_a_run_with_the_same_configuration_rewrites_nothing(tmp_path):
    """A resume that is refused later (a foreign checkpoint) must leave every file as it was, the manifest too."""
    with RunFolder(tmp_path, "carv demo", {"a": 1}, resumable=("steps",)):
        pass
    before = (tmp_path / rf.MANIFEST).read_bytes()
    with RunFolder(tmp_path, "carv demo", {"a": 1}, resumable=("steps",)):
        pass
    assert (tmp_path / rf.MANIFEST).read_bytes() == before
    with RunFolder(tmp_path, "carv demo", {"a": 1, "steps": 9}, resumable=("steps",)):
        pass  # a resumable change with nothing written (the resume was refused): nothing changes
    assert (tmp_path / rf.MANIFEST).read_bytes() == before
    with RunFolder(tmp_path, "carv demo", {"a": 1, "steps": 9}, resumable=("steps",)):
        rf.atomic_write_text(tmp_path / "x.txt", "x")  # the run's first write records it first
        assert read_json(tmp_path / rf.MANIFEST)["config"] == {"a": 1, "steps": 9}


def test_resume_follows_the_folder_for_unset_settings_and_legacy_ones(tmp_path):
    """A folder written before a default changed (proposal) or a setting existed (live_costs) still resumes with
    the same command: unset keys take the stored run's value, missing keys their legacy value; a setting the user
    did give that differs is still refused."""
    from carv._runfolder import MANIFEST, RunFolder, RunFolderError

    with RunFolder(tmp_path / "r", "carv x", {"proposal": "learned", "seed": 0}):
        pass
    new = {"proposal": "auto", "seed": 0, "live_costs": False}
    with RunFolder(tmp_path / "r", "carv x", new, unset=["proposal"], legacy={"live_costs": True}) as f:
        assert f.adopted == {"proposal": "learned", "live_costs": True}
    with RunFolder(tmp_path / "r", "carv x", new, unset=["proposal"], legacy={"live_costs": True}) as f:
        assert f.config == {"proposal": "learned", "seed": 0, "live_costs": True}  # the same command again
    assert "live_costs" not in json.loads((tmp_path / "r" / MANIFEST).read_text())["config"]  # nothing written yet
    with pytest.raises(RunFolderError, match="proposal: 'learned' -> 'auto'"):  # given explicitly: refused
        RunFolder(tmp_path / "r", "carv x", {**new, "live_costs": True}).__enter__()
