"""Never lose what the user has: export and resume delete or overwrite nothing fsdptrain did not write.

One tiny run of the built-in demo (2 steps, a checkpoint after each, the in-training export) is trained once per
module; each test works on its own copy. Every refusal is checked with listings (path, size, content hash) of the
folders concerned before and after, the exit status 2 and the one error line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import cli_inproc, run_cli

CKPT1, CKPT2 = "step-00000001", "step-00000002"
TRAIN = ["train.max_steps=2", "data.synthetic_examples=64", "logging.log_every=1", "logging.tensorboard=false",
         "logging.progress=none", "checkpoint.save_every=1", "checkpoint.export_hf=true"]
FIX = "give a new or empty folder for --out"


def listing(folder: Path) -> dict[str, object]:
    """Every entry under `folder`: files with size and content hash, folders, links."""
    found: dict[str, object] = {}
    for p in sorted(Path(folder).rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            found[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            found[rel + "/"] = "dir"
        else:
            found[rel] = (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return found


def assert_unchanged(before: dict, after: dict) -> None:
    gone = sorted(set(before) - set(after))
    new = sorted(set(after) - set(before))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert not (gone or new or changed), f"gone: {gone[:8]} ({len(gone)}), new: {new[:8]} ({len(new)}), " \
                                         f"changed: {changed[:8]} ({len(changed)})"


def assert_one_line_error(proc, expected_start: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fsdptrain: error: " + expected_start), lines[0]
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    proc = run_cli(["train", *TRAIN, f"output_dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "checkpoints" / CKPT2 / "COMPLETE.json").is_file()
    assert (run / "hf" / "fsdptrain_export.json").is_file()
    return run


@pytest.fixture
def work(trained, tmp_path) -> Path:
    """tmp_path/work (the current directory of the CLI runs) with a copy of the run and a file of the user's."""
    work = tmp_path / "work"
    shutil.copytree(trained, work / "run")
    (work / "notes.txt").write_text("the user's notes\n")
    return work


def export(work: Path, *args: str, **env: str):
    """`fsdptrain export` in the test process (tests.helpers.cli_inproc): the same exit status and output."""
    return cli_inproc(["export", *args], cwd=work, **env)


# ----------------------------------------------------------------------------- export refuses, nothing changes


def _user_folder(work: Path) -> None:
    (work / "mine").mkdir()
    (work / "mine" / "data.txt").write_text("keep me\n")


def _other_run(work: Path) -> None:
    shutil.copytree(work / "run", work / "other-run")


def _checkpoint_copy(work: Path) -> None:
    shutil.copytree(work / "run" / "checkpoints" / CKPT1, work / "ckpt-copy")


def _runs_folder(work: Path) -> None:
    shutil.copytree(work / "run", work / "runs" / "r1")


def _export_with_a_user_file(work: Path) -> None:
    shutil.copytree(work / "run" / "hf", work / "model")
    (work / "model" / "README.md").write_text("my model card\n")


def _export_with_a_changed_file(work: Path) -> None:
    shutil.copytree(work / "run" / "hf", work / "model")
    (work / "model" / "generation_config.json").write_text('{"temperature": 0.7, "edited": "by hand"}\n')


def _nothing(work: Path) -> None:
    pass


# (name, set-up, export arguments, the error line after "fsdptrain: error: ")
REFUSALS = [
    ("the run itself", _nothing, ["run", "--out", "run"],
     f"export --out run: is the run directory being exported; {FIX}"),
    ("the run itself, --overwrite", _nothing, ["run", "--out", "run", "--overwrite"],
     f"export --out run: is the run directory being exported; {FIX}"),
    ("the checkpoint itself", _nothing, [f"run/checkpoints/{CKPT2}", "--out", f"run/checkpoints/{CKPT2}",
                                         "--overwrite"],
     f"export --out run/checkpoints/{CKPT2}: is the checkpoint being exported; {FIX}"),
    ("the folder holding the checkpoint", _nothing, ["run", "--out", "run/checkpoints", "--overwrite"],
     "export --out run/checkpoints: contains the checkpoint being exported ("),
    ("a user folder", _user_folder, ["run", "--out", "mine"],
     f"export --out mine: folder exists and is not empty; {FIX}, or add --overwrite to replace an earlier "
     "fsdptrain export there"),
    ("a user folder, --overwrite", _user_folder, ["run", "--out", "mine", "--overwrite"],
     "export --out mine: folder is not empty and is not an fsdptrain export (no fsdptrain_export.json): it is not "
     f"ours, so it is not replaced; {FIX}"),
    ("another run", _other_run, ["run", "--out", "other-run"],
     "export --out other-run: is a run directory (config.yaml, metrics.jsonl, checkpoints/), which an export "
     f"never replaces; {FIX}"),
    ("another run, --overwrite", _other_run, ["run", "--out", "other-run", "--overwrite"],
     "export --out other-run: is a run directory (config.yaml, metrics.jsonl, checkpoints/), which an export "
     f"never replaces; {FIX}"),
    ("a checkpoint", _checkpoint_copy, ["run", "--out", "ckpt-copy"],
     f"export --out ckpt-copy: is a checkpoint (COMPLETE.json, .metadata), which an export never replaces; {FIX}"),
    ("a checkpoint, --overwrite", _checkpoint_copy, ["run", "--out", "ckpt-copy", "--overwrite"],
     f"export --out ckpt-copy: is a checkpoint (COMPLETE.json, .metadata), which an export never replaces; {FIX}"),
    ("a folder of runs", _runs_folder, ["run", "--out", "runs"],
     "export --out runs: contains r1, a run directory (config.yaml, metrics.jsonl, checkpoints/), which an export "
     f"never replaces; {FIX}"),
    ("a folder of runs, --overwrite", _runs_folder, ["run", "--out", "runs", "--overwrite"],
     "export --out runs: contains r1, a run directory (config.yaml, metrics.jsonl, checkpoints/), which an export "
     f"never replaces; {FIX}"),
    ("an export with a user file, --overwrite", _export_with_a_user_file, ["run", "--out", "model", "--overwrite"],
     "export --out model: holds files the earlier export did not write, or that changed since (README.md), so it "
     f"is not replaced; {FIX}"),
    ("an export with an edited file, --overwrite", _export_with_a_changed_file,
     ["run", "--out", "model", "--overwrite"],
     "export --out model: holds files the earlier export did not write, or that changed since "
     f"(generation_config.json), so it is not replaced; {FIX}"),
    ("the current directory", _nothing, ["run", "--out", "."],
     f"export --out .: is the current directory; {FIX}"),
    ("the current directory, --overwrite", _nothing, ["run", "--out", ".", "--overwrite"],
     f"export --out .: is the current directory; {FIX}"),
    ("the parent directory", _nothing, ["run", "--out", ".."],
     "export --out ..: contains the current directory ("),
    ("the parent directory, --overwrite", _nothing, ["run", "--out", "..", "--overwrite"],
     "export --out ..: contains the current directory ("),
    ("a file", _nothing, ["run", "--out", "notes.txt", "--overwrite"],
     f"export --out notes.txt: is a file, not a folder; {FIX}"),
]


@pytest.mark.parametrize("name,setup,args,expected", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_export_refuses_and_changes_nothing(work, name, setup, args, expected):
    setup(work)
    top = work.parent  # tmp_path: the work folder and its parent (what `--out ..` points at)
    before = listing(top)
    proc = export(work, *args)
    assert_unchanged(before, listing(top))
    assert_one_line_error(proc, expected)


def test_export_refuses_the_home_folder_and_the_root(work, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("export PATH=$PATH\n")
    before = listing(tmp_path)
    proc = export(work, "run", "--out", str(home), "--overwrite", HOME=str(home))
    assert_one_line_error(proc, f"export --out {home}: is your home folder; {FIX}")
    proc = export(work, "run", "--out", str(tmp_path), "--overwrite", HOME=str(home))
    assert_one_line_error(proc, f"export --out {tmp_path}: contains your home folder ({home}); {FIX}")
    proc = export(work, "run", "--out", "/", "--overwrite")
    assert_one_line_error(proc, f"export --out /: is the filesystem root; {FIX}")
    assert_unchanged(before, listing(tmp_path))


# ----------------------------------------------------------------------------- export works


def test_export_to_a_new_folder_then_overwrite_it(work):
    from transformers import AutoModelForCausalLM

    run = work / "run"
    (work / "model.tmp").mkdir()  # a user's folder with the name the old export used as its temporary folder
    (work / "model.tmp" / "keep.txt").write_text("mine\n")
    (work / "empty").mkdir()
    before = listing(run)
    mine = listing(work / "model.tmp")

    proc = export(work, "run", "--out", "model")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "exported run to model"
    marker = json.loads((work / "model" / "fsdptrain_export.json").read_text())
    assert marker["source"] == str((run / "checkpoints" / CKPT2).resolve())
    assert set(marker["files"]) == {p for p, v in listing(work / "model").items()
                                    if v != "dir" and p != "fsdptrain_export.json"}
    first = AutoModelForCausalLM.from_pretrained(str(work / "model"), dtype=torch.float32)
    live = AutoModelForCausalLM.from_pretrained(str(run / "hf"), dtype=torch.float32)  # in-training export
    assert all(torch.equal(t, live.state_dict()[k]) for k, t in first.state_dict().items())

    proc = export(work, f"run/checkpoints/{CKPT1}", "--out", "model", "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"exported run/checkpoints/{CKPT1} to model (replaced the earlier export there)"
    second = AutoModelForCausalLM.from_pretrained(str(work / "model"), dtype=torch.float32)
    assert not torch.equal(second.model.embed_tokens.weight, first.model.embed_tokens.weight)  # step 1, not 2
    assert json.loads((work / "model" / "fsdptrain_export.json").read_text())["source"].endswith(CKPT1)

    proc = export(work, "run", "--out", "empty")  # an existing empty folder needs no --overwrite
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (work / "empty" / "model.safetensors").is_file()

    # nothing else appeared, changed or went: no temporary or set-aside folders are left
    assert sorted(p.name for p in work.iterdir()) == ["empty", "model", "model.tmp", "notes.txt", "run"]
    assert listing(work / "model.tmp") == mine
    assert listing(run) == before


# ----------------------------------------------------------------------------- training: hf/ and checkpoints/


def test_training_export_refuses_a_foreign_hf_folder(work):
    run = work / "run"
    (run / "hf" / "fsdptrain_export.json").unlink()  # now it is a folder fsdptrain did not write
    (run / "hf" / "my-notes.txt").write_text("mine\n")
    before = listing(work)
    proc = run_cli(["train", *TRAIN, "train.max_steps=3", f"output_dir={run}"], cwd=work)
    assert_unchanged(before, listing(work))  # refused before any training: not even a checkpoint or a metrics line
    assert_one_line_error(proc, f"checkpoint.export_hf: {run / 'hf'}: folder is not empty and is not an fsdptrain "
                                "export (no fsdptrain_export.json): it is not ours, so it is not replaced; move it "
                                "out of the way, or set checkpoint.export_hf=false")


def test_resume_leaves_user_folders_alone_and_prunes_only_its_own(work):
    run = work / "run"
    ckpts = run / "checkpoints"
    shutil.copytree(ckpts / CKPT2, ckpts / "best")  # the user's copy of a checkpoint
    (ckpts / CKPT2 / "COMPLETE.json").unlink()  # a complete checkpoint whose marker the user removed
    shutil.copytree(ckpts / CKPT1, ckpts / "step-00000003.tmp")  # an interrupted save: the trainer's own
    (ckpts / "step-00000003.tmp" / "COMPLETE.json").unlink()
    best, unmarked = listing(ckpts / "best"), listing(ckpts / CKPT2)

    proc = run_cli(["train", *TRAIN, "train.max_steps=3", "checkpoint.keep_last=1", f"output_dir={run}"], cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "checkpoint: removed incomplete checkpoint folder(s) left by a crash: step-00000003.tmp" in out
    assert ("checkpoint: left alone under checkpoints/ (not written by this trainer or not complete): "
            f"best, {CKPT2}") in out
    assert f"resumed from {ckpts / CKPT1} at step 1" in out  # the unmarked step 2 is not a checkpoint
    assert f"moved it to {CKPT2}.kept-1, untouched, to save step 2" in out
    # keep_last=1 pruned its own step-1 and step-2, never `best`; the unmarked folder moved aside unchanged
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", f"{CKPT2}.kept-1", "step-00000003"]
    assert listing(ckpts / "best") == best
    assert listing(ckpts / f"{CKPT2}.kept-1") == unmarked
    assert json.loads((run / "hf" / "fsdptrain_export.json").read_text())["files"]  # its own hf/ was replaced


# ----------------------------------------------------------------------------- folder bookkeeping (no processes)


def _folder(path: Path, marker: bool = True, step: int = 1) -> Path:
    path.mkdir(parents=True)
    (path / "x").write_text("1")
    if marker:
        (path / "COMPLETE.json").write_text(json.dumps({"step": step, "files": {"x": 1}}))
    return path


def test_clean_incomplete_removes_only_its_own_leftovers(tmp_path):
    from fsdptrain.run import checkpoint as ck

    root = tmp_path / "checkpoints"
    _folder(root / "step-00000002")
    _folder(root / "best", step=9)  # complete, under the user's name
    _folder(root / "step-00000012", marker=False)  # complete once; marker removed by hand
    _folder(root / "step-00000005.tmp", marker=False)
    _folder(root / "step-00000003.deleting", marker=False)
    _folder(root / "mine.tmp", marker=False)
    _folder(root / "old.deleting", marker=False)
    (root / "README").write_text("notes\n")
    os.symlink(root / "best", root / "step-00000007.tmp")  # a link, even under the trainer's names, is not its own
    kept = {n: listing(root / n) for n in ("best", "step-00000012", "mine.tmp", "old.deleting")}

    removed, left = ck.clean_incomplete(root)
    assert removed == ["step-00000003.deleting", "step-00000005.tmp"]
    assert left == ["README", "best", "mine.tmp", "old.deleting", "step-00000007.tmp", "step-00000012"]
    assert {n: listing(root / n) for n in kept} == kept
    assert (root / "README").read_text() == "notes\n"
    assert ck.resolve_resume("auto", tmp_path) == root / "step-00000002"  # not `best`, not the unmarked step


def test_auto_resume_ignores_folders_that_are_not_step_n(tmp_path):
    from fsdptrain.run import checkpoint as ck

    _folder(tmp_path / "checkpoints" / "best", step=50)
    _folder(tmp_path / "checkpoints" / "step-00000009", marker=False)
    assert ck.resolve_resume("auto", tmp_path) is None
    assert ck.resolve_resume(str(tmp_path / "checkpoints" / "best"), tmp_path) == tmp_path / "checkpoints" / "best"


def test_prune_removes_only_complete_step_folders(tmp_path):
    from fsdptrain.config.schema import CheckpointConfig
    from fsdptrain.run import checkpoint as ck

    root = tmp_path / "checkpoints"
    for s in (1, 2, 3):
        _folder(root / ck.step_name(s), step=s)
    _folder(root / "best")
    _folder(root / "step-00000000", marker=False)
    os.symlink(root / "best", root / "step-00000001x")
    kept = {n: listing(root / n) for n in ("best", "step-00000000")}
    cp = ck.Checkpointer(CheckpointConfig(keep_last=1, async_save=False), tmp_path, 0, 1, "fp32", None,
                         ck.TrainState())
    cp._prune()
    assert sorted(p.name for p in root.iterdir()) == ["best", "step-00000000", "step-00000001x", "step-00000003"]
    assert {n: listing(root / n) for n in kept} == kept


def test_saving_over_an_unmarked_step_folder_moves_it_aside(tmp_path):
    from fsdptrain.run import checkpoint as ck

    root = tmp_path / "checkpoints"
    unmarked = _folder(root / "step-00000004", marker=False)
    (root / "step-00000004.kept-1").mkdir()  # taken: the next free name is used
    before = listing(unmarked)
    kept = ck._make_room(unmarked)
    assert kept == root / "step-00000004.kept-2" and listing(kept) == before and not unmarked.exists()
    complete = _folder(root / "step-00000006", step=6)  # an earlier attempt's checkpoint of the same step
    assert ck._make_room(complete) is None and not complete.exists()
    assert not (root / "step-00000006.deleting").exists()
