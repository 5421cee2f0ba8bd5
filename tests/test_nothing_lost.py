"""Issue 25: nothing lost, nothing hangs. Driven as a user would (subprocesses), each fault must end in one
line naming the file and what to do, with every earlier file unchanged: a rerun over a finished run, two runs
on one out dir, Ctrl-C/SIGTERM while the world is built, a damaged or partial world, stale caches, inputs of
the wrong type, a read-only out dir and a full disk, a moved project.
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, TIMEOUT, TINY_P1, assert_ok, assert_user_error, hashes, run_script, script_cmd, script_env

SHORT_P1 = ["--n_layer", "1", "--d_model", "32", "--n_head", "2", "--seq_len", "64", "--batch_size", "8",
            "--max_steps", "6", "--eval_interval", "3", "--eval_iters", "1", "--log_interval", "1"]


def out_of(d, *parts):
    return os.path.join(d, "out", *parts)


# --------------------------------------------------------------------------------------------------------------------
# A finished run is never trained over; later phases record what they were built from

@pytest.mark.slow
def test_rerun_without_resume_is_refused_and_restart_moves_it_aside(world, pipeline, copy_run):
    d = copy_run(pipeline)
    before = hashes(out_of(d))
    r = run_script("phase1_text.py", "--world_dir", world, "--out_dir", "out", *TINY_P1, cwd=d)
    assert_user_error(r, "out/phase1", "--resume", "--restart")
    r = run_script("phase2_caption.py", "--world_dir", world, "--out_dir", "out", cwd=d)
    assert_user_error(r, "out/phase2", "--resume", "--restart")
    assert hashes(out_of(d)) == before
    # phase 2 recorded the phase 1 checkpoint it started from
    from common import file_hash
    from conftest import load
    assert load(out_of(d, "phase2", "best.pt"))["parent"] == {"path": os.path.join("phase1", "best.pt"),
                                                               "hash": file_hash(out_of(d, "phase1", "best.pt"))}
    # --restart: the old run is moved aside whole, then a new one starts
    r = run_script("phase1_text.py", "--world_dir", world, "--out_dir", "out", "--restart", *SHORT_P1, cwd=d)
    assert_ok(r)
    aside = glob.glob(out_of(d, "phase1.old-*"))
    assert len(aside) == 1
    assert hashes(aside[0]) == {k[len("phase1/"):]: v for k, v in before.items() if k.startswith("phase1/")}
    # phase 2 was built on the old phase 1: eval marks its row
    r = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--device", "cpu", "--out_dir", "out",
                        "--no_world", "--json", "out/eval.json", "--chart", "out/eval.png"],
                       cwd=d, env=script_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert_ok(r)
    assert "phase2 (!)" in r.stdout and "phase1/best.pt, which changed since" in r.stdout, r.stdout
    rows = {x["name"]: x for x in json.load(open(out_of(d, "eval.json")))["results"]}
    assert "stale" in rows["phase2"] and "stale" not in rows["phase1"]


@pytest.mark.slow
def test_resume_without_last_pt_does_not_point_at_a_fresh_start(world, phase1_dir, copy_run):
    d = copy_run(phase1_dir)
    os.remove(out_of(d, "phase1", "last.pt"))
    before = hashes(out_of(d))
    r = run_script("phase1_text.py", "--world_dir", world, "--out_dir", "out", "--resume", *TINY_P1, cwd=d)
    assert_user_error(r, "last.pt not found", "--restart")
    assert hashes(out_of(d)) == before


# --------------------------------------------------------------------------------------------------------------------
# One run per out dir

def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.slow
def test_two_runs_on_one_out_dir(tmp_path, world, phase1_dir, copy_run):
    d = str(tmp_path / "fresh")
    os.makedirs(d)
    first = subprocess.Popen(script_cmd("phase1_text.py", "--world_dir", world, "--out_dir", "out",
                                        *SHORT_P1[:-8], "--max_steps", "100000", "--eval_interval", "100000",
                                        "--eval_iters", "1", "--log_interval", "1000"),
                             cwd=d, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = out_of(d, ".lock")
        t0 = time.time()
        while not os.path.exists(lock) and time.time() - t0 < 60:
            time.sleep(0.1)
        assert os.path.exists(lock)
        r = run_script("phase1_text.py", "--world_dir", world, "--out_dir", "out", *SHORT_P1, cwd=d)
        assert_user_error(r, "in use by another run", f"process {first.pid}", "out/.lock")
        while not os.path.exists(out_of(d, "phase1", "last.pt")) and time.time() - t0 < 120:
            time.sleep(0.1)  # training: SIGTERM now saves last.pt and releases the lock
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=TIMEOUT)
    assert not os.path.exists(out_of(d, ".lock"))  # released on exit
    # a stale lock (its process is gone: a kill -9) and a stale temp file are cleaned up, not obeyed
    d = copy_run(phase1_dir)
    with open(out_of(d, ".lock"), "w") as f:
        f.write(f"{dead_pid()} python phase1_text.py\n")
    stale_tmp = out_of(d, "phase1", f"last.pt.tmp{dead_pid()}")
    open(stale_tmp, "wb").write(b"half a checkpoint")
    r = run_script("phase1_text.py", "--world_dir", world, "--out_dir", "out", "--resume", *TINY_P1, cwd=d)
    assert_ok(r)
    assert not os.path.exists(out_of(d, ".lock")) and not os.path.exists(stale_tmp)


# --------------------------------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM while the world is built; damaged, partial and missing worlds

def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl_c_phase1", "sigterm_data_world"])
def test_interrupted_world_build_exits_quickly_and_leaves_nothing(tmp_path, how):
    w = str(tmp_path / "w")
    if how == "ctrl_c_phase1":  # Ctrl-C in a terminal reaches the whole process group, pool workers too
        cmd = script_cmd("phase1_text.py", "--world_dir", w, "--out_dir", str(tmp_path / "out"))
    else:  # a scheduler's SIGTERM reaches the main process only
        cmd = [sys.executable, "-m", "data.world", "--out", w, "--scale", "0.5"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        t0 = time.time()
        while len(children(p.pid)) < 2 and time.time() - t0 < 60 and p.poll() is None:
            time.sleep(0.2)
        # the pool is up when its processes stop changing: a signal to a worker still starting (before its
        # initializer ignores SIGINT) tests Python's start-up, not the build
        seen, t1 = children(p.pid), time.time()
        while time.time() - t1 < 1.5 and time.time() - t0 < 60 and p.poll() is None:
            time.sleep(0.25)
            if children(p.pid) != seen:
                seen, t1 = children(p.pid), time.time()
        workers = children(p.pid)
        assert workers and p.poll() is None, "the build had no worker pool to interrupt"
        t0 = time.time()
        if how == "ctrl_c_phase1":
            os.killpg(p.pid, signal.SIGINT)
        else:
            p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=20)
        took = time.time() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert took < 10, f"took {took:.1f}s to stop"
    assert p.returncode != 0 and "Traceback" not in err, err
    assert "interrupted" in err
    time.sleep(1)
    assert not [c for c in workers if alive(c)], "worker processes left running"
    # nothing half-written where a later run would trust it: no world folder, no temp folder
    assert not os.path.exists(w) or not os.listdir(w)
    assert not glob.glob(w + ".tmp*")


@pytest.mark.slow
def test_damaged_or_partial_world_is_reported_not_rebuilt(tmp_path, world):
    w = str(tmp_path / "w")
    shutil.copytree(world, w)
    with open(os.path.join(w, "meta.json"), "r+") as f:
        f.truncate(40)
    before = hashes(w)
    r = run_script("phase1_text.py", "--world_dir", w, "--out_dir", str(tmp_path / "out"), *SHORT_P1)
    assert_user_error(r, "meta.json is damaged", "delete the folder", "--world_dir")
    assert hashes(w) == before
    os.remove(os.path.join(w, "meta.json"))  # a build that died without its meta.json, or the user's own folder
    before = hashes(w)
    r = run_script("phase1_text.py", "--world_dir", w, "--out_dir", str(tmp_path / "out"), *SHORT_P1)
    assert_user_error(r, "has files but no meta.json", "--world_dir")
    assert hashes(w) == before


def test_a_recorded_world_that_is_gone_is_an_error_not_a_rebuild(tmp_path):
    from types import SimpleNamespace
    from common import UserError
    from data.text import text_of_phase1
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.model").write_bytes(b"")
    gone, also_gone = str(tmp_path / "gone"), str(tmp_path / "also_gone")
    (out / "data.json").write_text(json.dumps({"source": "world:" + gone, "fingerprint": "x"}))
    p1 = {"args": {"world_dir": also_gone, "data_dir": "", "seq_len": 64}}
    with pytest.raises(UserError, match=f"read the world in {gone}, which is gone"):
        text_of_phase1(p1, str(out), SimpleNamespace(master=True, ddp=False))
    assert not os.path.exists(gone) and not os.path.exists(also_gone)


# --------------------------------------------------------------------------------------------------------------------
# Caches keyed on content

def test_coco_cache_picks_up_edited_captions_and_a_repaired_image(tmp_path, world):
    from PIL import Image
    from data.images import load_coco
    from test_reliability import make_coco
    root, cache = str(tmp_path / "coco"), str(tmp_path / "cache")
    ann_path = make_coco(root, world, 3)
    broken = os.path.join(root, "train2017", f"{1:012d}.jpg")
    with open(broken, "wb") as f:
        f.write(b"not a jpeg")
    images, rows = load_coco(root, 32, cache)
    assert len(rows) == 2
    Image.fromarray(np.full((40, 48, 3), 200, dtype=np.uint8)).save(broken)  # repaired
    images, rows = load_coco(root, 32, cache)
    assert len(rows) == 3 and any(r["file_name"] == os.path.basename(broken) for r in rows)
    ann = json.load(open(ann_path))
    ann["annotations"][0]["caption"] = "an edited caption"
    time.sleep(0.01)
    with open(ann_path, "w") as f:
        json.dump(ann, f)
    _, rows = load_coco(root, 32, cache)
    assert any("an edited caption" in r["captions"] for r in rows)
    # a damaged cache metadata file is rebuilt, not a traceback
    for meta in glob.glob(os.path.join(cache, "*.json")):
        with open(meta, "r+") as f:
            f.truncate(5)
    _, rows2 = load_coco(root, 32, cache)
    assert rows2 == rows


# --------------------------------------------------------------------------------------------------------------------
# Inputs of the wrong type: one line naming the file, the entry and the field

@pytest.mark.slow
def test_blimp_rows_of_the_wrong_type(tmp_path, phase1_dir):
    ckpt = out_of(phase1_dir, "phase1", "best.pt")
    for i, row in enumerate([7, {"sentence_good": None, "sentence_bad": "a b"}]):
        path = str(tmp_path / f"blimp{i}.jsonl")
        with open(path, "w") as f:
            f.write(json.dumps({"sentence_good": "a b c", "sentence_bad": "c b a", "UID": "x"}) + "\n")
            f.write(json.dumps(row) + "\n")
        r = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--device", "cpu", "--ckpt", ckpt,
                            "--no_world", "--blimp", path, "--json", str(tmp_path / "e.json"),
                            "--chart", str(tmp_path / "e.png")],
                           cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=TIMEOUT)
        assert_user_error(r, path, "line 2")
        if i:
            assert "sentence_good must be a string" in r.stderr


def test_vqav2_and_coco_fields_of_the_wrong_type(tmp_path, world):
    from common import UserError
    from data.images import load_coco
    from data.vqa import _read_vqav2
    from test_reliability import make_coco
    qp, ap = str(tmp_path / "q.json"), str(tmp_path / "a.json")

    def write(questions, annotations):
        json.dump({"questions": questions}, open(qp, "w"))
        json.dump({"annotations": annotations}, open(ap, "w"))
    q = {"question_id": 1, "image_id": 1, "question": "is it red ?"}
    a = {"question_id": 1, "image_id": 1, "multiple_choice_answer": "yes", "answers": [{"answer": "yes"}] * 10}
    write([q], [a])
    assert _read_vqav2(qp, ap)[0]["answers"] == ["yes"] * 10
    for questions, annotations, needle in [([dict(q, question=7)], [a], "question 0: question (str expected)"),
                                           ([5], [a], "question 0 is a int"),
                                           ([q], [dict(a, answers="yes")], "annotation 0: answers (list expected)"),
                                           ([q], [dict(a, answers=[None])], "annotation 0: answers")]:
        write(questions, annotations)
        with pytest.raises(UserError, match=r"^" + r"\S+\.json: " + needle.replace("(", r"\(").replace(")", r"\)")):
            _read_vqav2(qp, ap)
    ann_path = make_coco(str(tmp_path / "coco"), world, 2)
    ann = json.load(open(ann_path))
    ann["annotations"][1]["image_id"] = [1]
    json.dump(ann, open(ann_path, "w"))
    with pytest.raises(UserError, match="annotation 1 needs an \"image_id\""):
        load_coco(str(tmp_path / "coco"), 32, str(tmp_path / "cache"))


@pytest.mark.slow
def test_truncated_data_json_is_one_line(world, phase1_dir, copy_run):
    d = copy_run(phase1_dir)
    with open(out_of(d, "data.json"), "r+") as f:
        f.truncate(20)
    before = hashes(out_of(d))
    r = run_script("phase1_text.py", "--world_dir", world, "--out_dir", "out", "--resume", *TINY_P1, cwd=d)
    assert_user_error(r, "data.json", "malformed JSON")
    assert hashes(out_of(d)) == before


# --------------------------------------------------------------------------------------------------------------------
# Read-only out dir, full disk

FAULT = """
import builtins, errno, os, runpy, sys
where, code, only = sys.argv[1], getattr(errno, sys.argv[2]), sys.argv[3]
real = builtins.open
def faulty(file, mode="r", *a, **k):
    path = os.path.abspath(str(file))
    if any(c in mode for c in "wax+") and path.startswith(where) and only in os.path.basename(path):
        raise OSError(code, os.strerror(code), str(file))
    return real(file, mode, *a, **k)
builtins.open = faulty
sys.argv = sys.argv[4:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_with_fault(d, where, code, only, script, *args):
    cmd = [sys.executable, "-c", FAULT, os.path.abspath(where), code, only] + script_cmd(script, *args)[1:]
    return subprocess.run(cmd, cwd=d, env=script_env(), capture_output=True, text=True, timeout=TIMEOUT)


@pytest.mark.slow
def test_read_only_out_dir_and_full_disk(world, phase1_dir, copy_run):
    d = copy_run(phase1_dir)
    before = hashes(out_of(d))
    # read-only (root ignores chmod, so the file system's answer is simulated): refused before any data is loaded
    r = run_with_fault(d, out_of(d), "EROFS", "", "phase1_text.py", "--world_dir", world, "--out_dir", "out",
                       "--resume", *TINY_P1)
    assert_user_error(r, "could not write", "out/", "read-only", "nothing written earlier was damaged")
    assert hashes(out_of(d)) == before
    # disk full when the checkpoint is written: one line, best.pt and last.pt as they were, no temp file left
    r = run_with_fault(d, out_of(d), "ENOSPC", ".pt.tmp", "phase1_text.py", "--world_dir", world, "--out_dir", "out",
                       "--resume", *TINY_P1[:-8], "--max_steps", "152", "--eval_interval", "1", "--eval_iters", "2",
                       "--log_interval", "1")
    assert_user_error(r, "could not write", "phase1/", "the disk is full", "nothing written earlier was damaged")
    assert hashes(out_of(d)) == before


def test_metadata_writes_are_atomic(tmp_path):
    from common import UserError, write_json_atomic
    path = str(tmp_path / "results.json")
    write_json_atomic({"a": 1}, path)
    with pytest.raises(TypeError):
        write_json_atomic({"a": object()}, path)  # fails mid-write
    assert json.load(open(path)) == {"a": 1} and os.listdir(tmp_path) == ["results.json"]
    os.chmod(tmp_path, 0o500)
    try:
        if not os.access(str(tmp_path), os.W_OK):  # not as root
            with pytest.raises(UserError, match="could not write .*results.json: permission denied"):
                write_json_atomic({"a": 2}, path)
    finally:
        os.chmod(tmp_path, 0o700)


# --------------------------------------------------------------------------------------------------------------------
# A moved or copied project resumes phase 1

@pytest.mark.slow
def test_a_moved_project_resumes_phase1(tmp_path, world):
    a = tmp_path / "project_a"
    a.mkdir()
    shutil.copytree(world, a / "world")
    assert_ok(run_script("phase1_text.py", "--world_dir", "world", "--out_dir", "out", *SHORT_P1, cwd=str(a)))
    info = json.load(open(a / "out" / "data.json"))
    assert all(not os.path.isabs(p) for p in info["tokens"].values())
    b = str(tmp_path / "project_b")
    shutil.move(str(a), b)
    before = hashes(os.path.join(b, "out"))
    r = run_script("phase1_text.py", "--world_dir", "world", "--out_dir", "out", "--resume", *SHORT_P1[:-8],
                   "--max_steps", "9", "--eval_interval", "3", "--eval_iters", "1", "--log_interval", "1", cwd=b)
    assert_ok(r)
    after = hashes(os.path.join(b, "out"))
    for name in ("tokenizer.model", "data.json", info["tokens"]["train"], info["tokens"]["val"]):
        assert after[name] == before[name], name  # nothing re-tokenized
    assert "resumed from" in r.stdout
    # another world (a different corpus) is still refused, and the message says which one the out dir holds
    other = os.path.join(b, "world2")
    shutil.copytree(os.path.join(b, "world"), other)
    meta = json.load(open(os.path.join(other, "meta.json")))
    json.dump(dict(meta, seed=1), open(os.path.join(other, "meta.json"), "w"))
    r = run_script("phase1_text.py", "--world_dir", other, "--out_dir", "out", "--resume", *SHORT_P1, cwd=b)
    assert_user_error(r, "holds a tokenizer made from --world_dir", "world2")


def test_progress_bars_only_on_a_terminal(monkeypatch):
    from types import SimpleNamespace
    import common
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not common.show_progress(SimpleNamespace(quiet=False))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert common.show_progress(SimpleNamespace(quiet=False)) and not common.show_progress(SimpleNamespace(quiet=True))


def test_out_dir_lock_in_process(tmp_path):
    """A live owner elsewhere blocks; a lock of a dead process, or one copied along with its folder, is stale."""
    import subprocess as sp
    from common import OutDirLock, UserError
    out = tmp_path / "out"
    out.mkdir()
    holder = sp.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(f"{holder.pid}\n{out}\npython phase1_text.py\n")
        with pytest.raises(UserError, match=f"in use by another run \\(process {holder.pid}"):
            OutDirLock(str(out))
        (out / ".lock").write_text(f"{holder.pid}\n{tmp_path / 'elsewhere'}\npython phase1_text.py\n")  # copied
        lock = OutDirLock(str(out))
        assert (out / ".lock").read_text().split()[0] == str(os.getpid())
        lock.release()
        assert not (out / ".lock").exists()
        (out / ".lock").write_text(f"{dead_pid()}\n{out}\n")
        OutDirLock(str(out)).release()
    finally:
        holder.kill()
        holder.wait()
