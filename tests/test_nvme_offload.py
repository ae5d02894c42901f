"""parallel.optimizer_offload: nvme: the moments in files, bitwise the in-memory offload's arithmetic; the offload
folder's safety rules; checkpoints between the two offloads."""

from __future__ import annotations

import copy
import errno
import json
import os
import time
from pathlib import Path

import pytest
import torch
import yaml

from fsdptrain.config.schema import load_config
from fsdptrain.core.errors import ConfigError
from fsdptrain.train import offload_dir, optim_nvme
from fsdptrain.train.offload_dir import OffloadDirError
from fsdptrain.train.optim_nvme import NVMeOffloadAdamW
from fsdptrain.train.optim_offload import CPUOffloadAdamW
from tests.helpers import LLAMA, cli_inproc, make_model_dir, read_metrics, torchrun
from tests.reference import base_config

HYPER = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8}
SHAPES = [(37, 11), (64,), (5, 7, 3), (300,), (1,), (19, 2)]


def make_params(seed: int = 0) -> list[list[torch.nn.Parameter]]:
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    return [ps[:4], ps[4:]]


def groups(params: list[list[torch.nn.Parameter]]) -> list[dict]:
    return [{"params": params[0], "weight_decay": 0.1}, {"params": params[1], "weight_decay": 0.0}]


def set_grads(params: list[list[torch.nn.Parameter]], step: int, skip: int = -1) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(q for group in params for q in group):
        p.grad = None if i == skip else torch.randn(p.shape, generator=g)


def nvme_opt(params, tmp_path: Path, buffer_bytes: int = 12 * 512) -> NVMeOffloadAdamW:
    scratch = offload_dir.claim(str(tmp_path / "off"), tmp_path / "run", 0, 1)
    return NVMeOffloadAdamW(groups(params), scratch, buffer_bytes, **HYPER)


def flat_state(opt: torch.optim.Optimizer) -> dict:
    sd = opt.state_dict()
    return {(k, name): v.clone() for k, st in sd["state"].items() for name, v in st.items()}


@pytest.mark.parametrize("direct", [True, False])
def test_moments_on_file_update_bitwise_like_in_memory(tmp_path, monkeypatch, direct):
    """Six steps (one with a parameter without gradient) through chunks of at most 512 bytes of parameters: many
    chunks, each slot reused; parameters and state bitwise the in-memory offload's, and the file holds the moments.
    With direct I/O (where /tmp's file system has it) and through the page cache."""
    if not direct:
        monkeypatch.setattr(optim_nvme, "open_direct", lambda path: None)
    mem_p, nvme_p = make_params(), make_params()
    mem = CPUOffloadAdamW(groups(mem_p), **HYPER)
    nvme = nvme_opt(nvme_p, tmp_path)
    assert len(nvme._regions[0]) >= 4 and nvme.slots == 3
    if direct:  # direct I/O wherever the file system takes it (ext4, xfs: yes; tmpfs: no)
        (tmp_path / "probe").touch()
        probe = optim_nvme.open_direct(tmp_path / "probe")
        assert nvme.direct == (probe is not None)
        if probe is not None:
            os.close(probe)
    else:
        assert not nvme.direct
    for step in range(6):
        for ps in (mem_p, nvme_p):
            set_grads(ps, step, skip=2 if step == 3 else -1)
        mem.step()
        nvme.step()
    for a, b in zip(sum(mem_p, []), sum(nvme_p, [])):
        assert torch.equal(a, b)
    ms, ns = flat_state(mem), flat_state(nvme)
    assert ms.keys() == ns.keys() and all(torch.equal(ms[k], ns[k]) for k in ms)
    assert ms[(2, "step")].item() == 5.0  # the step without its gradient left it alone, as in memory
    # what a checkpoint save gets: views of the file's memory map, no copy of the state
    view = nvme.state_dict()["state"][0]["exp_avg"]
    assert view.untyped_storage().data_ptr() == nvme._flat.untyped_storage().data_ptr()
    on_disk = torch.from_file(str(nvme.path), size=nvme.nbytes // 4, dtype=torch.float32)
    first = nvme._regions[0][0]
    n0 = SHAPES[0][0] * SHAPES[0][1]
    assert torch.equal(on_disk[first.start:first.start + n0], ms[(0, "exp_avg")].flatten())
    nvme.close()
    assert not list((tmp_path / "off").iterdir())  # the rank's subfolder and file deleted


def test_state_moves_between_in_memory_and_file(tmp_path):
    """A state dict of the in-memory offload loads into the file-backed one and back; both continue alike."""
    mem_p, nvme_p = make_params(), make_params()
    mem = CPUOffloadAdamW(groups(mem_p), **HYPER)
    for step in range(2):
        set_grads(mem_p, step)
        mem.step()
    with torch.no_grad():
        for a, b in zip(sum(mem_p, []), sum(nvme_p, [])):
            b.copy_(a)
    nvme = nvme_opt(nvme_p, tmp_path)
    nvme.load_state_dict(copy.deepcopy(mem.state_dict()))  # as from a checkpoint: no tensor shared
    back = CPUOffloadAdamW(groups(make_params(1)), **HYPER)
    for step in range(2, 4):
        for ps in (mem_p, nvme_p):
            set_grads(ps, step)
        mem.step()
        nvme.step()
    back.load_state_dict(copy.deepcopy(nvme.state_dict()))
    ms, ns, bs = flat_state(mem), flat_state(nvme), flat_state(back)
    assert all(torch.equal(ms[k], ns[k]) and torch.equal(ms[k], bs[k]) for k in ms)
    assert all(torch.equal(a, b) for a, b in zip(sum(mem_p, []), sum(nvme_p, [])))
    nvme.close()


def test_reads_ahead_and_writes_behind_across_steps(tmp_path, monkeypatch):
    """A step returns with its last chunks' writes running and the next step's first chunks being read into the
    buffers: a state dict then waits for the writes, a state loaded then replaces what was read ahead, and the
    updates stay bitwise the in-memory offload's (slow writes make a missing wait show)."""
    write = optim_nvme.write_from

    def slow_write(fd, buf, offset):
        time.sleep(0.02)
        write(fd, buf, offset)

    monkeypatch.setattr(optim_nvme, "write_from", slow_write)
    mem_p, nvme_p = make_params(), make_params()
    mem = CPUOffloadAdamW(groups(mem_p), **HYPER)
    nvme = nvme_opt(nvme_p, tmp_path)
    for ps in (mem_p, nvme_p):
        set_grads(ps, 0)
    mem.step()
    nvme.step()
    assert sorted(nvme._prefetched) == [0, 1, 2]  # the first group's first chunks, one per buffer
    ms, ns = flat_state(mem), flat_state(nvme)
    assert all(torch.equal(ms[k], ns[k]) for k in ms)
    for slot, (index, k, fut) in nvme._prefetched.items():  # read after their buffers' writes: the new state
        fut.result()
        region = nvme._regions[index][k]
        assert torch.equal(nvme._buffers[slot][:2 * region.numel], nvme._flat[region.start:][:2 * region.numel])
    set_grads(mem_p, 1)
    mem.step()  # the in-memory run goes one step further; its state replaces what the file-backed one read ahead
    with torch.no_grad():
        for a, b in zip(sum(mem_p, []), sum(nvme_p, [])):
            b.copy_(a)
    nvme.load_state_dict(copy.deepcopy(mem.state_dict()))
    for step in (2, 3):
        for ps in (mem_p, nvme_p):
            set_grads(ps, step)
        mem.step()
        nvme.step()
    ms, ns = flat_state(mem), flat_state(nvme)
    assert all(torch.equal(ms[k], ns[k]) for k in ms)
    assert all(torch.equal(a, b) for a, b in zip(sum(mem_p, []), sum(nvme_p, [])))
    nvme.close()


def test_a_failed_write_is_one_line(tmp_path, monkeypatch):
    nvme = nvme_opt(make_params(), tmp_path)

    def full(fd, buf, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(optim_nvme, "write_from", full)
    set_grads(make_params(), 0)
    for p in sum([g["params"] for g in nvme.param_groups], []):
        p.grad = torch.ones_like(p)
    with pytest.raises(OffloadDirError) as e:
        nvme.step()
    msg = str(e.value)
    assert msg.startswith(f"parallel.offload_dir: could not write the optimizer state in {nvme.path} (No space "
                          "left on device; ")
    assert msg.endswith("free there); the run stops without saving, its earlier checkpoints are intact: fix the "
                        "drive and rerun the same command to continue from the newest")
    nvme.close()


def test_not_enough_space_is_one_line_with_the_numbers(tmp_path, monkeypatch):
    # 5 chunks of at most 512 bytes of parameters, each region rounded up to 4 KiB (direct I/O's blocks)
    monkeypatch.setattr(optim_nvme, "free_bytes", lambda folder: 1000)
    scratch = offload_dir.claim(str(tmp_path / "off"), tmp_path / "run", 0, 1)
    with pytest.raises(OffloadDirError) as e:
        NVMeOffloadAdamW(groups(make_params()), scratch, 12 * 512, local_world=8, **HYPER)
    assert str(e.value) == (f"parallel.offload_dir: {tmp_path / 'off'} has 1000 B free and this rank's optimizer "
                            "state needs 20.00 KiB (8 ranks on this node: 160.00 KiB in all); free space there, or "
                            "give a larger drive")


# ----------------------------------------------------------------------------- the offload folder's rules


def test_foreign_content_is_refused(tmp_path):
    root = tmp_path / "off"
    root.mkdir()
    (root / "data.bin").write_text("mine")
    (root / "fsdptrain-offload-nothex-rank00000").mkdir()
    with pytest.raises(OffloadDirError) as e:
        offload_dir.claim(str(root), tmp_path / "run", 0, 1)
    assert str(e.value) == (f"parallel.offload_dir: {root} holds data.bin, fsdptrain-offload-nothex-rank00000, not "
                            "written by fsdptrain; give an empty folder (or a new one) that only fsdptrain's "
                            "optimizer offload uses")
    assert (root / "data.bin").read_text() == "mine"


def test_unusable_folders_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OffloadDirError) as e:
        offload_dir.claim(str(tmp_path / "file"), tmp_path / "run", 0, 1)
    assert str(e.value) == f"parallel.offload_dir: {tmp_path / 'file'} is a file; give a folder (new or empty)"
    with pytest.raises(OffloadDirError) as e:
        offload_dir.claim(str(tmp_path / "file" / "sub"), tmp_path / "run", 0, 1)
    assert str(e.value) == (f"parallel.offload_dir: cannot create {tmp_path / 'file' / 'sub'} (Not a directory); "
                            "give a folder this user can write")
    monkeypatch.setattr(offload_dir.os, "access", lambda path, mode: False)  # root passes every permission check
    with pytest.raises(OffloadDirError) as e:
        offload_dir.claim(str(tmp_path / "ro"), tmp_path / "run", 0, 1)
    assert str(e.value) == (f"parallel.offload_dir: {tmp_path / 'ro'} is not writable for this user; give a folder "
                            "this user can write (node-local, e.g. on an NVMe drive)")


def test_stale_files_of_this_run_are_cleared_and_others_kept(tmp_path):
    root = tmp_path / "off"
    key, other = offload_dir.run_key(tmp_path / "run"), offload_dir.run_key(tmp_path / "other")
    for name in (offload_dir.folder_name(key, 1), offload_dir.folder_name(key, 5),
                 offload_dir.folder_name(other, 1), offload_dir.folder_name(key, 0) + ".creating"):
        (root / name).mkdir(parents=True)
        (root / name / "moments.bin").write_bytes(b"old")
    scratch = offload_dir.claim(str(root), tmp_path / "run", 1, 4)
    names = sorted(p.name for p in root.iterdir())
    # rank 1's crashed folder replaced by a fresh one, rank 5 (beyond the world) gone; rank 0's and the other
    # run's left to them
    assert names == sorted([offload_dir.folder_name(key, 1), offload_dir.folder_name(other, 1),
                            offload_dir.folder_name(key, 0) + ".creating"])
    assert sorted(p.name for p in scratch.folder.iterdir()) == [offload_dir.MARKER]
    marker = json.loads((scratch.folder / offload_dir.MARKER).read_text())
    assert marker["rank"] == 1 and marker["output_dir"] == str((tmp_path / "run").resolve())
    scratch.close()
    assert not scratch.folder.exists()


def test_train_refuses_a_foreign_folder_in_one_line_before_building_the_model(tmp_path):
    from tests.test_bad_inputs import one_line_error

    off = tmp_path / "scratch"
    off.mkdir()
    (off / "notes.txt").write_text("keep me")
    proc = cli_inproc(["train", f"output_dir={tmp_path / 'run'}", "parallel.device=cpu", "train.max_steps=1",
                       "parallel.optimizer_offload=nvme", f"parallel.offload_dir={off}"])
    one_line_error(proc, f"parallel.offload_dir: {off} holds notes.txt, not written by fsdptrain")
    assert "model:" not in proc.stdout  # said before the model was built
    assert os.listdir(off) == ["notes.txt"] and (off / "notes.txt").read_text() == "keep me"


def test_train_says_a_too_small_drive_before_building_the_model(tmp_path, monkeypatch):
    from tests.test_bad_inputs import one_line_error

    monkeypatch.setattr(offload_dir, "free_bytes", lambda folder: 1000)
    off = tmp_path / "scratch"
    proc = cli_inproc(["train", f"output_dir={tmp_path / 'run'}", "parallel.device=cpu", "train.max_steps=1",
                       "parallel.optimizer_offload=nvme", f"parallel.offload_dir={off}"])
    # the demo model's state as the estimator predicts it (the file the optimizer would make: 6.11 MiB)
    one_line_error(proc, f"parallel.offload_dir: {off} has 1000 B free and this rank's optimizer state needs "
                         "6.11 MiB; free space there, or give a larger drive")
    assert "model:" not in proc.stdout
    assert os.listdir(off) == []  # the rank's subfolder removed again


def test_a_failed_start_deletes_the_offload_files(tmp_path, monkeypatch):
    """The optimizer made its file, then the resume failed: the rank's subfolder goes with the run."""
    from fsdptrain import trainer
    from fsdptrain.run.checkpoint import CheckpointError
    from tests.test_bad_inputs import one_line_error

    def damaged(self, total_steps):
        raise CheckpointError("checkpoints/step-00000002: damaged; checkpoint.resume=none starts fresh")

    monkeypatch.setattr(trainer.Checkpointer, "resume", damaged)
    off = tmp_path / "scratch"
    proc = cli_inproc(["train", f"output_dir={tmp_path / 'run'}", "parallel.device=cpu", "train.max_steps=1",
                       "parallel.optimizer_offload=nvme", f"parallel.offload_dir={off}"])
    one_line_error(proc, "checkpoints/step-00000002: damaged")
    assert "optimizer: AdamW moments in" in proc.stdout and os.listdir(off) == []


def test_network_file_systems_are_named():
    mounts = ("/dev/nvme0n1p1 / ext4 rw 0 0\n"
              "server:/export /shared nfs4 rw 0 0\n"
              "/dev/nvme1n1 /shared/local xfs rw 0 0\n")
    assert offload_dir.mount_type(Path("/shared/x/y"), mounts) == ("/shared", "nfs4")
    assert offload_dir.network_warning(Path("/shared/local/off"), mounts) is None
    assert offload_dir.network_warning(Path("/shared/off"), mounts) == (
        "parallel.offload_dir: /shared/off is on nfs4 (mounted at /shared), a network file system: every step "
        "streams the moments over the network and nodes share its bandwidth; give a node-local folder (an NVMe "
        "drive) for speed")


def test_config_lines():
    cases = {
        ("parallel.optimizer_offload=nvme",): "parallel.optimizer_offload: nvme needs parallel.offload_dir; give a "
                                              "node-local folder on an NVMe drive, e.g. "
                                              "parallel.offload_dir=/local_nvme/fsdptrain",
        ("parallel.optimizer_offload=disk",): "parallel.optimizer_offload: expected true, false or nvme, got 'disk'",
        ("parallel.offload_dir=/x",): "parallel.offload_dir is set but parallel.optimizer_offload is false; set "
                                      "parallel.optimizer_offload=nvme, or remove offload_dir",
        ("parallel.optimizer_offload=nvme", "parallel.offload_dir=/x", "parallel.cpu_offload=true"):
            "parallel.cpu_offload already keeps the optimizer state on the CPU; set "
            "parallel.optimizer_offload=false (or cpu_offload=false to keep parameters on the GPU)",
    }
    for overrides, line in cases.items():
        with pytest.raises(ConfigError) as e:
            load_config(None, list(overrides))
        assert str(e.value).endswith(line), str(e.value)
    cfg = load_config(None, ["parallel.optimizer_offload=nvme", "parallel.offload_dir=/x"])
    assert cfg.parallel.optimizer_offload == "nvme" and cfg.parallel.offload_buffer_size == "256MiB"


# ----------------------------------------------------------------------------- 2-rank runs


def dcp_state(ckpt: Path, tmp: Path) -> dict:
    """Every tensor and value of a DCP checkpoint, flattened (read in this process, no pickle of tensors)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    flat: dict = {}

    def walk(obj, prefix: str) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat[prefix[:-1]] = obj
    walk(_load_state_dict_from_keys(checkpoint_id=str(ckpt)), "")
    return flat


PAIRS = {"plain": {}, "accum": {"train": {"micro_batch_size": 1, "grad_accum_steps": 2}},
         "lora": {"finetune": {"method": "lora", "lora": {"rank": 8, "alpha": 16, "target": "all"}}},
         "hybrid": {"parallel": {"sharding": "hybrid", "shard_group_size": 1}}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("nvme")
    llama = make_model_dir(root / "llama", LLAMA, seed=1)
    nvme = {"optimizer_offload": "nvme", "offload_dir": str(root / "off"), "offload_buffer_size": "96KiB"}
    keep = {"save_every": 3, "keep_last": 0}
    cases = {}
    for name, extra in PAIRS.items():
        sections = {k: dict(v) for k, v in extra.items()}
        par = sections.pop("parallel", {})
        cases[f"mem_{name}"] = base_config(root / f"mem_{name}", llama, parallel={"optimizer_offload": True, **par},
                                           checkpoint=keep, **sections)
        cases[f"nvme_{name}"] = base_config(root / f"nvme_{name}", llama, parallel={**nvme, **par}, checkpoint=keep,
                                            **sections)
    # resumes across the two offloads from step 3
    cases["nvme_from_mem"] = base_config(root / "nvme_from_mem", llama, parallel=nvme, checkpoint={
        "resume": str(root / "mem_plain" / "checkpoints" / "step-00000003")})
    cases["mem_from_nvme"] = base_config(root / "mem_from_nvme", llama, parallel={"optimizer_offload": True},
                                         checkpoint={"resume": str(root / "nvme_plain" / "checkpoints" /
                                                                   "step-00000003")})
    spec = {"cases": []}
    for name, cfg in cases.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        spec["cases"].append({"name": name, "config": str(path)})
    (root / "spec.json").write_text(json.dumps(spec))
    proc = torchrun(2, ["-m", "tests.workers.dist_cases", str(root / "spec.json")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run) if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PAIRS))
def test_two_ranks_bitwise_like_in_memory_offload(runs, name, tmp_path):
    """Losses over 6 steps, and the final checkpoint's parameters and AdamW state (saved from the file), bitwise
    equal to the in-memory offload's; the offload folder is empty after the runs."""
    mem, nvme = runs / f"mem_{name}", runs / f"nvme_{name}"
    assert len(losses(mem)) == 6 and losses(mem) == losses(nvme)
    a = dcp_state(mem / "checkpoints" / "step-00000006", tmp_path)
    b = dcp_state(nvme / "checkpoints" / "step-00000006", tmp_path)
    assert a.keys() == b.keys() and any("exp_avg_sq" in k for k in a)
    different = [k for k in a if isinstance(a[k], torch.Tensor) and not torch.equal(a[k], b[k])]
    assert different == []
    assert os.listdir(runs / "off") == []


@pytest.mark.slow
@pytest.mark.parametrize("resumed, source", [("nvme_from_mem", "mem_plain"), ("mem_from_nvme", "nvme_plain")])
def test_resume_across_the_two_offloads(runs, resumed, source, tmp_path):
    """A step-3 checkpoint of one offload resumes with the other: steps 4-6 and the end state bitwise those of the
    uninterrupted run."""
    assert losses(runs / resumed) == losses(runs / source)[3:]
    a = dcp_state(runs / source / "checkpoints" / "step-00000006", tmp_path)
    b = dcp_state(runs / resumed / "checkpoints" / "step-00000006", tmp_path)
    assert [k for k in a if isinstance(a[k], torch.Tensor) and not torch.equal(a[k], b[k])] == []


def near(got: list[float], ref: list[float]) -> bool:
    return len(got) == len(ref) and max(abs(a - b) for a, b in zip(got, ref)) < 1e-5


@pytest.fixture(scope="module")
def one_rank(runs):
    """nvme_plain's step-3 checkpoint (2 ranks) resumed on 1 rank with nvme offload, saving every step."""
    from fsdptrain.trainer import train

    llama = runs / "llama"
    cfg = base_config(runs / "one", llama, train={"micro_batch_size": 4},
                      parallel={"optimizer_offload": "nvme", "offload_dir": str(runs / "off1")},
                      checkpoint={"resume": str(runs / "nvme_plain" / "checkpoints" / "step-00000003"),
                                  "save_every": 1, "keep_last": 0})
    (runs / "one.yaml").write_text(yaml.safe_dump(cfg))
    return train(load_config(str(runs / "one.yaml")))


@pytest.mark.slow
def test_nvme_checkpoint_reshards_two_to_one(runs, one_rank):
    assert near(one_rank.losses, losses(runs / "nvme_plain")[3:]), one_rank.losses
    assert os.listdir(runs / "off1") == []


@pytest.mark.slow
def test_nvme_checkpoint_reshards_one_to_four(runs, one_rank):
    cfg = base_config(runs / "four", runs / "llama", train={"micro_batch_size": 1},
                      parallel={"optimizer_offload": "nvme", "offload_dir": str(runs / "off4")},
                      checkpoint={"resume": str(runs / "one" / "checkpoints" / "step-00000004")})
    (runs / "four.yaml").write_text(yaml.safe_dump(cfg))
    (runs / "spec4.json").write_text(json.dumps({"cases": [{"name": "four", "config": str(runs / "four.yaml")}]}))
    proc = torchrun(4, ["-m", "tests.workers.dist_cases", str(runs / "spec4.json")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert near(losses(runs / "four"), losses(runs / "nvme_plain")[4:])
    assert os.listdir(runs / "off4") == []


def test_estimate_puts_the_state_on_the_drive_for_70b():
    """Llama-3-70B full fine-tuning on 2 x 8 x 80 GiB: nvme moves the AdamW state from host memory to the drive
    (its own line) and the host keeps only the stream buffers."""
    from fsdptrain.core.units import GIB
    from fsdptrain.memory import estimate
    from fsdptrain.train import staging
    from tests.helpers import REPO

    path = str(REPO / "configs" / "estimate-llama3-70b-2x8-lora.yaml")
    full = ["finetune.method=full", "finetune.lora.rank=8", "finetune.lora.alpha=null"]
    shape = estimate.shape_from_config(load_config(path, full, quiet=True))
    mem = estimate.estimate(load_config(path, full + ["parallel.optimizer_offload=true"], quiet=True), 2, 8,
                            80 * GIB, shape=shape)
    nvme = estimate.estimate(load_config(path, full + ["parallel.optimizer_offload=nvme",
                                                       "parallel.offload_dir=/nvme"], quiet=True), 2, 8, 80 * GIB,
                             shape=shape)
    assert mem.nvme_per_rank == 0 and nvme.nvme_per_rank == mem.state.optimizer
    assert nvme.nvme_per_node == 8 * nvme.nvme_per_rank
    # 3 buffers, each for the largest shard (embed_tokens / lm_head: 128256 x 8192 / 16 rows): both moments with
    # 4 KiB to align its address, and the pinned staging of its gradient and shard (rounded to a power of two)
    largest = (128256 // 16) * 8192
    buffers = 3 * (2 * 4 * largest + 4096 + staging.pinned_size(2 * 4 * largest))
    assert nvme.cpu_per_rank == buffers == 3_186_634_752  # 2.97 GiB per rank, where in-memory offload holds:
    assert mem.cpu_per_rank == 70_711_384_908  # 65.86 GiB per rank: the moments (32.85) and the staging (33.00)
    assert nvme.peak == mem.peak
    text = estimate.render(nvme)
    assert (f"NVMe (optimizer_offload nvme): {estimate.format_bytes(nvme.nvme_per_rank)} per rank, "
            f"{estimate.format_bytes(nvme.nvme_per_node)} per node (AdamW state, in parallel.offload_dir)") in text


def test_estimated_host_memory_is_what_the_optimizer_allocates(tmp_path):
    """The estimator's host line for nvme against the optimizer's own allocations on a tiny model (one rank, a
    64 KiB buffer: many chunks): the stream buffers, the moments' with their 4 KiB alignment and the staging's
    (rounded to a power of two when pinned on CUDA), to the byte; no other host buffer."""
    from transformers import AutoModelForCausalLM

    from fsdptrain.core.units import GIB
    from fsdptrain.memory import estimate
    from fsdptrain.train import staging
    from fsdptrain.train.optim import build_optimizer

    model_dir = make_model_dir(tmp_path / "model", LLAMA)
    raw = base_config(tmp_path / "run", model_dir)
    raw["parallel"].update(optimizer_offload="nvme", offload_dir=str(tmp_path / "off"), offload_buffer_size="64KiB")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(str(tmp_path / "c.yaml"), quiet=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    opt = build_optimizer(model, cfg.train, False, "nvme", offload_dir.claim(str(tmp_path / "off"), tmp_path / "run",
                                                                                0, 1), 64 * 1024)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    flats = [b.untyped_storage().nbytes() for b in opt._staging_buffers]
    buffers = sum(b.untyped_storage().nbytes() for b in opt._buffers)
    assert opt._staging == {} and not opt._in_sync  # no staging kept: every step copies the shards down
    chunks = sum(len(r) for r in opt._regions)
    opt.close()
    shape = estimate.shape_from_config(cfg)
    assert chunks > 10 and opt.slots == 3 == len(flats)
    assert estimate.estimate(cfg, 1, 1, 80 * GIB, shape=shape).cpu_per_rank == sum(flats) + buffers
    pinned = estimate.nvme_buffers(shape, 1, 0, 64 * 1024, True)
    assert pinned == sum(staging.pinned_size(n) for n in flats) + buffers


@pytest.mark.parametrize("precision", ["fp32", "bf16-pure"])
def test_in_memory_offload_host_line_is_what_the_optimizer_allocates(tmp_path, precision):
    """optimizer_offload: true on one rank: the estimator's host line equals the optimizer's fp32 moments and step
    counters plus its staging slabs, to the byte, also when the parameters are bf16 (its state stays fp32)."""
    from transformers import AutoModelForCausalLM

    from fsdptrain.core.units import GIB
    from fsdptrain.memory import estimate
    from fsdptrain.train.optim import build_optimizer

    model_dir = make_model_dir(tmp_path / "model", LLAMA)
    raw = base_config(tmp_path / "run", model_dir)
    raw["parallel"].update(optimizer_offload=True, precision=precision)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(str(tmp_path / "c.yaml"), quiet=True)
    dtype = torch.bfloat16 if precision == "bf16-pure" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    opt = build_optimizer(model, cfg.train, False, True)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    state = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    assert {v.dtype for v in state} == {torch.float32}
    slabs = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
             for i in range(len(opt.param_groups)) for c in opt.staged(i) for views in (c.grads, c.shards)
             for v in views}
    allocated = sum(v.numel() * v.element_size() for v in state) + sum(slabs.values())
    est = estimate.estimate(cfg, 1, 1, 80 * GIB, shape=estimate.shape_from_config(cfg))
    assert est.cpu_per_rank == allocated
