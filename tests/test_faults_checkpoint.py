"""Faults around checkpoints: targets jaxic must not touch, corrupted files, killed saves, rotation."""

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import orbax.checkpoint as ocp
import pytest

import jaxic
from jaxic import checkpoint
from jaxic.errors import CheckpointError

OLD = [np.arange(12, dtype=np.float32).reshape(4, 3), np.arange(5, dtype=np.int32), np.array(7, np.uint32)]
NEW = [2 * OLD[0] + 1, OLD[1] * 3, np.array(9, np.uint32)]


def snapshot(root: Path) -> dict:
    """Every entry under ``root`` (not following links) with its bytes, link target or 'dir'."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            key = str(p.relative_to(root))
            state[key] = ("link", os.readlink(p)) if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes()
    return state


def assert_equal_arrays(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


def user_folder(root: Path) -> Path:
    root.mkdir()
    (root / "notes.txt").write_bytes(b"my notes\x00\xff")
    (root / "data").mkdir()
    (root / "data" / "table.csv").write_text("a,b\n1,2\n")
    return root


# ---------------------------------------------------------------------------------------------
# Targets that are not jaxic's are refused and left exactly as they were.

def test_folder_with_user_files_is_refused_untouched(tmp_path):
    target = user_folder(tmp_path / "mine")
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="not a jaxic checkpoint") as info:
        checkpoint.write_checkpoint(target, OLD, {"tag": "old"})
    assert f"'{target}'" in str(info.value) and "notes.txt" in str(info.value)
    with pytest.raises(CheckpointError, match="not a jaxic checkpoint") as info:
        checkpoint.PeriodicCheckpointer(target)
    assert f"'{target}'" in str(info.value)
    assert snapshot(tmp_path) == before


def test_dot_and_empty_string_and_home_are_refused(tmp_path, monkeypatch):
    cwd = user_folder(tmp_path / "cwd")
    monkeypatch.chdir(cwd)
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError) as info:
        checkpoint.write_checkpoint(".", OLD, {})
    assert f"'{cwd}'" in str(info.value) and "not a jaxic checkpoint" in str(info.value)
    with pytest.raises(CheckpointError, match="empty path ''"):
        checkpoint.write_checkpoint("", OLD, {})
    with pytest.raises(CheckpointError, match="empty path ''"):
        checkpoint.PeriodicCheckpointer("")
    home = user_folder(tmp_path / "home")
    monkeypatch.setenv("HOME", str(home))
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError) as info:
        checkpoint.write_checkpoint("~", OLD, {})
    assert f"'{home}'" in str(info.value)
    assert snapshot(tmp_path) == before


def test_file_and_symlink_targets_are_refused_untouched(tmp_path):
    file = tmp_path / "model.bin"
    file.write_bytes(b"\x01\x02precious")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()  # empty: the link itself is what is refused
    link = tmp_path / "link"
    link.symlink_to(elsewhere)
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="it is a file") as info:
        checkpoint.write_checkpoint(file, OLD, {})
    assert f"'{file}'" in str(info.value)
    with pytest.raises(CheckpointError, match="symbolic link") as info:
        checkpoint.write_checkpoint(link, OLD, {})
    assert f"'{link}'" in str(info.value) and str(elsewhere) in str(info.value)
    with pytest.raises(CheckpointError, match="symbolic link"):
        checkpoint.PeriodicCheckpointer(link)
    assert snapshot(tmp_path) == before


def test_checkpoint_holding_a_user_file_and_other_kind_are_refused(tmp_path):
    single = checkpoint.write_checkpoint(tmp_path / "single", OLD, {"tag": "old"})
    with checkpoint.PeriodicCheckpointer(tmp_path / "runs") as periodic:
        periodic.save(10, OLD, {"tag": "old"})
    (single / "README").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="files jaxic did not write \\('README'\\)") as info:
        checkpoint.write_checkpoint(single, NEW, {})
    assert f"'{single}'" in str(info.value)
    with pytest.raises(CheckpointError, match="periodic checkpoint folder") as info:
        checkpoint.write_checkpoint(tmp_path / "runs", NEW, {})
    assert f"'{tmp_path / 'runs'}'" in str(info.value)
    (single / "README").unlink()
    with pytest.raises(CheckpointError, match="one-off checkpoint"):
        checkpoint.PeriodicCheckpointer(single)
    (single / "README").write_text("mine")
    assert snapshot(tmp_path) == before


def test_unserialisable_metadata_writes_nothing(tmp_path):
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        checkpoint.write_checkpoint(tmp_path / "ckpt", OLD, {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_empty_folder_and_empty_cwd_are_used_and_replaced_in_place(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".jaxic.json.tmp-0123").write_text('{"form')  # a first save killed mid-marker
    monkeypatch.chdir(tmp_path / "empty")
    path = checkpoint.write_checkpoint(".", OLD, {"tag": "old"})
    assert path == tmp_path / "empty"
    assert sorted(os.listdir(path)) == ["0", "jaxic.json"]
    checkpoint.write_checkpoint(".", NEW, {"tag": "new"})
    assert sorted(os.listdir(path)) == ["1", "jaxic.json"]
    assert checkpoint.read_metadata(path) == {"format_version": checkpoint.FORMAT_VERSION, "tag": "new"}
    assert_equal_arrays(checkpoint.read_arrays(path, OLD), NEW)
    assert checkpoint.resolve_checkpoint(".") == path / "1"


# ---------------------------------------------------------------------------------------------
# Corruption: every file jaxic wrote is verified; the error names the file.

def flip_bit(file: Path):
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x04
    file.write_bytes(bytes(data))


def truncate(file: Path):
    file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])


def garbage(file: Path):
    file.write_bytes(np.random.default_rng(0).bytes(max(8, file.stat().st_size)))


def delete(file: Path):
    file.unlink()


def broken_json(file: Path):
    file.write_text(file.read_text()[:-3])


def verified_files(path: Path) -> list[Path]:
    """The marker, the manifest and every file the manifest lists (arrays, orbax metadata, metadata.json)."""
    payload = path / "0" / "jaxic"
    listed = json.loads((payload / "manifest.json").read_text())["files"]
    files = [path / "jaxic.json", payload / "manifest.json"] + [payload / name for name in listed]
    assert {f.name for f in files} >= {"metadata.json", "_METADATA", "manifest.ocdbt", "_CHECKPOINT_METADATA"}
    assert sum("/d/" in f.as_posix() for f in files) >= 2  # the array data files
    return files


@pytest.mark.parametrize("corrupt", [flip_bit, truncate, garbage, delete])
def test_corrupted_file_is_an_error_naming_it(tmp_path, corrupt):
    probe = checkpoint.write_checkpoint(tmp_path / "probe", OLD, {"tag": "old"})
    for i, probe_file in enumerate(verified_files(probe)):
        path = shutil.copytree(probe, tmp_path / f"c{i}")
        file = path / probe_file.relative_to(probe)
        corrupt(file)
        for read in (checkpoint.read_metadata, lambda p: checkpoint.read_arrays(p, OLD)):
            with pytest.raises(CheckpointError) as info:
                read(path)
            assert f"'{file}'" in str(info.value), (corrupt.__name__, file)


def test_broken_json_files_and_an_extra_array_file_are_errors_naming_them(tmp_path):
    for name in ("jaxic.json", "0/jaxic/manifest.json", "0/jaxic/metadata.json"):
        path = checkpoint.write_checkpoint(tmp_path / name.replace("/", "_"), OLD, {"tag": "old"})
        broken_json(path / name)
        with pytest.raises(CheckpointError) as info:
            checkpoint.read_metadata(path)
        assert f"'{path / name}'" in str(info.value)
    path = checkpoint.write_checkpoint(tmp_path / "extra", OLD, {"tag": "old"})
    extra = path / "0" / "jaxic" / "arrays" / "d" / "0123456789abcdef"
    extra.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not written by jaxic") as info:
        checkpoint.read_arrays(path, OLD)
    assert f"'{extra}'" in str(info.value)


def test_mismatched_like_is_a_clear_error(tmp_path):
    path = checkpoint.write_checkpoint(tmp_path / "ckpt", OLD, {})
    with pytest.raises(CheckpointError, match="holds 3 arrays but the rebuilt proposal has 2"):
        checkpoint.read_arrays(path, OLD[:2])
    with pytest.raises(CheckpointError, match="array 00000 has shape \\(4, 3\\), the rebuilt proposal expects "
                                              "\\(3, 4\\)"):
        checkpoint.read_arrays(path, [OLD[0].T, *OLD[1:]])
    with pytest.raises(CheckpointError, match="array 00001 has dtype int32, the rebuilt proposal expects float32"):
        checkpoint.read_arrays(path, [OLD[0], OLD[1].astype(np.float32), OLD[2]])


def write_format_1(path: Path, arrays, metadata):
    """The layout jaxic wrote before checksums: jaxic.json with format_version 1, arrays/ beside it."""
    path.mkdir()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / "arrays", {f"{i:05d}": a for i, a in enumerate(arrays)})
        checkpointer.wait_until_finished()
    (path / "jaxic.json").write_text(json.dumps({"format_version": 1, **metadata}))


def test_format_1_checkpoints_load_with_a_warning_and_are_replaced(tmp_path):
    path = tmp_path / "v1"
    write_format_1(path, OLD, {"tag": "old"})
    with pytest.warns(UserWarning, match="format 1.*without checksums"):
        assert checkpoint.read_metadata(path) == {"format_version": 1, "tag": "old"}
    with pytest.warns(UserWarning, match="format 1"):
        assert_equal_arrays(checkpoint.read_arrays(path, OLD), OLD)
    checkpoint.write_checkpoint(path, NEW, {"tag": "new"})
    assert sorted(os.listdir(path)) == ["0", "jaxic.json"]
    assert checkpoint.read_metadata(path)["tag"] == "new"
    assert_equal_arrays(checkpoint.read_arrays(path, OLD), NEW)
    # Unverified format-1 files that orbax rejects still give a CheckpointError naming the folder.
    broken = tmp_path / "v1_broken"
    write_format_1(broken, OLD, {})
    (broken / "arrays" / "_METADATA").write_text("{")
    with pytest.warns(UserWarning, match="format 1"), pytest.raises(CheckpointError) as info:
        checkpoint.read_arrays(broken, OLD)
    assert f"'{broken / 'arrays'}'" in str(info.value)


def test_not_a_checkpoint_and_newer_format_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.read_metadata(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="not a jaxic checkpoint") as info:
        checkpoint.read_metadata(tmp_path)
    assert f"'{tmp_path / 'jaxic.json'}' is missing" in str(info.value)
    path = checkpoint.write_checkpoint(tmp_path / "ckpt", OLD, {})
    marker = json.loads((path / "jaxic.json").read_text())
    (path / "jaxic.json").write_text(json.dumps({**marker, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99.*upgrade jaxic"):
        checkpoint.read_metadata(path)


# ---------------------------------------------------------------------------------------------
# Periodic saving through orbax's CheckpointManager.

def step_arrays(step):
    return [OLD[0] + step, OLD[1] + step, np.array(step, np.uint32)]


def test_periodic_rotation_latest_step_and_fallback(tmp_path):
    runs = tmp_path / "runs"
    with checkpoint.PeriodicCheckpointer(runs, max_to_keep=2) as ckpt:
        assert ckpt.all_steps() == [] and ckpt.latest_step() is None
        for step in (10, 20, 30, 40):
            assert ckpt.save(step, step_arrays(step), {"step": step}) == runs / str(step)
        assert ckpt.all_steps() == [30, 40] and ckpt.latest_step() == 40
        with pytest.raises(CheckpointError, match="cannot save step 40 .* already holds step 40"):
            ckpt.save(40, step_arrays(40), {})
    assert sorted(os.listdir(runs)) == ["30", "40", "jaxic.json"]
    assert checkpoint.resolve_checkpoint(runs) == runs / "40"
    assert checkpoint.read_metadata(runs) == {"format_version": checkpoint.FORMAT_VERSION, "step": 40}
    assert_equal_arrays(checkpoint.read_arrays(runs, OLD), step_arrays(40))
    assert checkpoint.read_metadata(runs / "30")["step"] == 30  # one step, named explicitly

    bad = next((runs / "40" / "jaxic" / "arrays" / "ocdbt.process_0" / "d").iterdir())
    flip_bit(bad)
    with pytest.warns(UserWarning, match=f"skipping step 40 of checkpoint '{runs}', falling back to step 30") as rec:
        assert_equal_arrays(checkpoint.read_arrays(runs, OLD), step_arrays(30))
    assert f"'{bad}'" in str(rec[0].message)
    with pytest.warns(UserWarning, match="skipping step 40"):
        assert checkpoint.read_metadata(runs)["step"] == 30
    with pytest.raises(CheckpointError) as info:  # asked for explicitly, step 40 is an error
        checkpoint.read_metadata(runs / "40")
    assert f"'{bad}'" in str(info.value)
    (runs / "30" / "jaxic" / "metadata.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no older step .* verifies either") as info:
        checkpoint.read_metadata(runs)
    assert f"'{bad}'" in str(info.value)


def test_periodic_resumes_in_a_folder_and_cleans_a_killed_save(tmp_path):
    runs = tmp_path / "runs"
    with checkpoint.PeriodicCheckpointer(runs, max_to_keep=3) as ckpt:
        ckpt.save(1, step_arrays(1), {"step": 1})
    (runs / "2.orbax-checkpoint-tmp").mkdir()  # what a save killed half-way leaves
    (runs / "2.orbax-checkpoint-tmp" / "partial").write_bytes(b"x")
    assert checkpoint.read_metadata(runs)["step"] == 1
    with checkpoint.PeriodicCheckpointer(runs, max_to_keep=3) as ckpt:
        assert ckpt.latest_step() == 1
        ckpt.save(2, step_arrays(2), {"step": 2})
        ckpt.save(3, step_arrays(3), {"step": 3})
    assert sorted(os.listdir(runs)) == ["1", "2", "3", "jaxic.json"]
    with pytest.raises(CheckpointError, match="max_to_keep must be a positive integer"):
        checkpoint.PeriodicCheckpointer(runs, max_to_keep=0)
    closed = checkpoint.PeriodicCheckpointer(runs)
    closed.close()
    with pytest.raises(CheckpointError, match="is closed"):
        closed.save(4, step_arrays(4), {})
    assert closed.all_steps() == [1, 2, 3]


# ---------------------------------------------------------------------------------------------
# A save SIGKILLed at any moment leaves the old or the new checkpoint.

# Imports jaxic once (slow), then forks one process per save (fast). Before anything runs
# the process has no other thread, so forking is safe. A save is killed either just before its
# n-th file-system change (an audit hook; n given as a fraction of the changes counted in the
# first, unkilled "count" save) or after a delay in seconds (a timer thread).
CHILD = textwrap.dedent("""
    import json, math, os, signal, sys, threading
    import numpy as np
    from jaxic import checkpoint

    jobs, arrays_file = json.loads(sys.argv[1]), sys.argv[2]
    with np.load(arrays_file) as stored:
        arrays = [stored[f"arr_{i}"] for i in range(len(stored.files))]
    WRITES = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate"}
    assert threading.active_count() == 1
    total, codes, counts = None, [], []
    for path, mode, value in jobs:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            count, kill_at = 0, math.ceil(value * total) if mode == "event" else None

            def hook(event, args):
                global count
                if event in WRITES or event == "open" and (args[1] is None and args[2] & (os.O_WRONLY | os.O_RDWR)
                                                           or args[1] and set(args[1]) & set("wax+")):
                    count += 1
                    if count == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)

            if mode == "timer":
                threading.Timer(value, os.kill, (os.getpid(), signal.SIGKILL)).start()
            else:
                sys.addaudithook(hook)
            checkpoint.write_checkpoint(path, arrays, {"tag": "new"})
            os.write(write_end, str(count).encode())
            os._exit(0)
        os.close(write_end)
        codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        count = int(os.read(read_end, 100) or -1)  # empty when the child was killed
        counts.append(count)
        if mode == "count":
            total = count
        os.close(read_end)
    print(json.dumps({"codes": codes, "counts": counts, "total": total}))
""")


@pytest.mark.slow
def test_sigkill_during_a_save_leaves_old_or_new(tmp_path):
    script, arrays_file = tmp_path / "child.py", tmp_path / "new.npz"
    script.write_text(CHILD)
    np.savez(arrays_file, *NEW)
    rng = np.random.default_rng(0)
    trials = [("count", 0.0)] + [("event", float(f)) for f in np.linspace(0.0, 1.0, 19)[1:]] + \
             [("timer", float(t)) for t in rng.uniform(0.0, 0.5, 6)]
    paths = [tmp_path / f"t{i}" for i in range(len(trials))]
    for path in paths:
        checkpoint.write_checkpoint(path, OLD, {"tag": "old"})
    jobs = [(str(p), m, v) for p, (m, v) in zip(paths, trials)]
    env = {**os.environ, "PYTHONPATH": str(Path(jaxic.__file__).parents[1])}
    done = subprocess.run([sys.executable, str(script), json.dumps(jobs), str(arrays_file)], env=env, text=True,
                          capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    # One save makes over 20 file-system changes (temporary folders, payload, commit, removal of the old step).
    assert result["total"] > 20
    outcomes = []
    for path, (mode, value), code, count in zip(paths, trials, result["codes"], result["counts"]):
        # Removing the old step makes one event per data file it holds, and how many files tensorstore
        # wrote depends on timing: a save may finish in fewer events than the counted one, so a kill
        # planned after its last event never comes. Any other normal exit is a failure to kill.
        missed_the_end = mode == "event" and code == 0 and count < math.ceil(value * result["total"])
        assert code == (0 if mode == "count" else -9) or mode == "timer" and code == 0 or missed_the_end, \
            (mode, value, code, count, result["total"])
        step = checkpoint.resolve_checkpoint(path)  # no warning: the newest committed step always verifies
        tag = checkpoint.read_metadata(step)["tag"]
        assert_equal_arrays(checkpoint.read_arrays(step, OLD), OLD if tag == "old" else NEW)
        outcomes.append(tag)
        checkpoint.write_checkpoint(path, OLD, {"tag": "again"})  # the next save removes every leftover
        names = sorted(os.listdir(path))
        assert len(names) == 2 and names[0].isdigit() and names[1] == "jaxic.json", names
        assert not [p for p in path.rglob("*") if "tmp" in p.name]
        assert checkpoint.read_metadata(path)["tag"] == "again"
    # The first event kill lands before anything is written, the last one after the commit.
    assert outcomes[0] == "new" and outcomes[1] == "old" and outcomes[18] == "new"


# ---------------------------------------------------------------------------------------------
# Through the public API.

def two_normals(obs=None):
    a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    b = numpyro.sample("b", dist.Normal(a, 1.0))
    numpyro.sample("obs", dist.Normal(b, 0.5), obs=obs)


@pytest.fixture(scope="module")
def compiled():
    return jaxic.compile(two_normals, observed=["obs"], key=jax.random.key(0), num_steps=0,
                         network=jaxic.networks.TransformerConfig(d_model=16, num_heads=2, num_layers=1),
                         validation_size=16, progress=False)


def test_compiled_save_refuses_foreign_targets(compiled, tmp_path, monkeypatch):
    mine = user_folder(tmp_path / "mine")
    file = tmp_path / "file.txt"
    file.write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(mine)
    monkeypatch.chdir(mine)
    before = snapshot(tmp_path)
    for target in (mine, ".", file, link):
        with pytest.raises(CheckpointError) as info:
            compiled.save(target)
        assert f"'{Path(target).absolute()}'" in str(info.value)
    with pytest.raises(CheckpointError, match="empty path"):
        compiled.save("")
    assert snapshot(tmp_path) == before


def test_compiled_save_replaces_and_load_verifies(compiled, tmp_path):
    compiled.save(tmp_path / "ckpt")
    compiled.save(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["1", "jaxic.json"]
    again = jaxic.load(tmp_path / "ckpt", two_normals)
    for a, b in zip(jax.tree.leaves(again.state.params), jax.tree.leaves(compiled.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bad = next((tmp_path / "ckpt" / "1" / "jaxic" / "arrays" / "ocdbt.process_0" / "d").iterdir())
    flip_bit(bad)
    with pytest.raises(CheckpointError) as info:
        jaxic.load(tmp_path / "ckpt", two_normals)
    assert f"'{bad}'" in str(info.value)
