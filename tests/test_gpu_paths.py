"""CUDA-only paths checked on CPU with stand-ins: the process-group backend and device of a launch, the
offloaded optimizer's state on load and its pinned staging layout, buffers of an offloaded model, the CPU
threads of an optimizer on the CPU, and the smaller CUDA settings (MFU peaks, TF32, reduce dtype).

Each test fails on the code before the fix it covers; what only a GPU run can confirm is listed in
docs/performance.md ("What the GPU check will confirm").
"""

from __future__ import annotations

import torch
from torch import nn

from fsdptrain.train import optim_offload as oo
from fsdptrain.train.optim_offload import CPUOffloadAdamW
from fsdptrain.train.staging import pinned_size, staging_bytes, staging_chunks, staging_slabs

# ----------------------------------------------------------------------------- offloaded AdamW: state on load


def saved_state(opt: torch.optim.Optimizer, shape: tuple[int, ...]) -> dict:
    groups = opt.state_dict()["param_groups"]
    return {"state": {0: {"step": torch.tensor(4.0), "exp_avg": torch.full(shape, 0.5),
                          "exp_avg_sq": torch.full(shape, 0.25)}}, "param_groups": groups}


def test_offloaded_adamw_state_loads_onto_the_cpu_whatever_device_the_parameters_are_on():
    # meta parameters stand in for CUDA ones: torch's Optimizer.load_state_dict casts every state tensor to its
    # parameter's device, which for CUDA parameters put the "offloaded" moments on the GPU
    p = nn.Parameter(torch.zeros(3, 2, device="meta"))
    opt = CPUOffloadAdamW([p], lr=0.1)
    opt.load_state_dict(saved_state(opt, (3, 2)))
    st = opt.state[p]
    for key, value in (("exp_avg", 0.5), ("exp_avg_sq", 0.25)):
        assert st[key].device.type == "cpu" and st[key].dtype == torch.float32, key
        assert torch.equal(st[key], torch.full((3, 2), value)), key
    assert st["step"].device.type == "cpu" and float(st["step"]) == 4.0
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["params"] == [p]


def test_offloaded_adamw_state_stays_fp32_for_bf16_parameters_and_the_next_step_matches():
    # bf16-pure: torch's load made the moments bf16, and the fused fp32 update then refused them
    ref = nn.Parameter(torch.randn(4, 3))
    mine = nn.Parameter(ref.detach().to(torch.bfloat16))
    a, b = torch.optim.AdamW([ref], lr=1e-2), CPUOffloadAdamW([mine], lr=1e-2)
    g = torch.randn(4, 3)
    ref.grad, mine.grad = g.clone(), g.to(torch.bfloat16)
    a.step()
    b.step()
    b.load_state_dict(b.state_dict())
    assert {v.dtype for v in b.state[mine].values()} == {torch.float32}
    ref.grad, mine.grad = g.clone(), g.to(torch.bfloat16)
    a.step()
    b.step()
    assert float(b.state[mine]["step"]) == 2.0
    assert torch.allclose(b.state[mine]["exp_avg"], a.state[ref]["exp_avg"].float(), atol=1e-2)


# ----------------------------------------------------------------------------- offloaded AdamW: pinned staging


def test_staging_chunks_and_the_pinned_allocators_rounding():
    assert staging_chunks([12, 5, 4, 30], limit=80) == [[0, 1], [2], [3]]  # 20 fp32 per chunk; 30 alone
    assert staging_chunks([], limit=80) == []
    assert [pinned_size(n) for n in (0, 1, 68, 64, 65, 2**26 + 1)] == [0, 1, 128, 64, 128, 2**27]
    # chunks of 68, 16 and 120 bytes in slabs: one up to 128 (the largest power of two within the 204 bytes left)
    # takes the first two (84 bytes), one up to 64 (of the 120 left) the third, larger, alone
    assert staging_slabs([68, 16, 120]) == [[0, 1], [2]]
    assert staging_slabs([68, 16, 120], slab=64) == [[0], [1], [2]]
    assert staging_slabs([40] * 15, slab=1024) == [list(range(12)), [12], [13], [14]]  # 600: 480 in 512, then 40s
    assert staging_slabs([]) == []
    mib = 2**20  # power-of-two chunks the packing would fragment (320 MiB reserved against 201): each keeps its own
    assert staging_slabs([8 * mib, 64 * mib, 64 * mib, 1 * mib, 64 * mib]) == [[0], [1], [2], [3], [4]]
    # two buffers (gradients, shards) per slab: 84 -> 128, 120 -> 128 bytes each (per chunk: 128 + 16 + 128)
    assert staging_bytes([12, 5, 4, 30], pinned=True, limit=80) == 2 * (128 + 128)
    assert staging_bytes([12, 5, 4, 30], pinned=False, limit=80) == 2 * 4 * 51


def test_offloaded_adamw_stages_each_slab_of_chunks_in_one_flat_buffer(monkeypatch):
    # One allocation per slab of chunks and kind, views handed out: pinned per parameter, every request was rounded
    # up to a power of two (up to 2x the planned 8 bytes per parameter), per chunk again up to 2x
    monkeypatch.setattr(oo.staging, "CHUNK_BYTES", 80)
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(2, 2)),
              nn.Parameter(torch.randn(30))]
    opt = CPUOffloadAdamW([{"params": params, "weight_decay": 0.0}], lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    chunks = opt.staged(0)
    assert [[next(i for i, q in enumerate(params) if q is p) for p in c.params] for c in chunks] == [[0, 1], [2], [3]]
    # chunks of 68, 16 and 120 bytes: the first two in one slab (staging_slabs), the third in another
    for kind in ("grads", "shards"):
        views = [v for c in chunks for v in getattr(c, kind)]
        storages = [v.untyped_storage() for v in views]
        assert [s.data_ptr() for s in storages[:3]] == [storages[0].data_ptr()] * 3
        assert storages[3].data_ptr() != storages[0].data_ptr()
        assert [v.storage_offset() for v in views] == [0, 12, 17, 0]
        assert [s.nbytes() for s in (storages[0], storages[3])] == [4 * 21, 4 * 30]  # exact: the allocator rounds
        assert [v.shape for v in views] == [p.shape for p in params]
    for c in chunks:
        for p, g, s in zip(c.params, c.grads, c.shards):
            assert torch.equal(g, p.grad) and torch.equal(s, p.detach())  # staged gradient, updated shard


def test_estimated_host_memory_counts_the_pinned_staging(tmp_path):
    from fsdptrain.config.schema import load_config
    from fsdptrain.core.units import GIB
    from fsdptrain.memory import estimate

    cfg = load_config(None, ["parallel.optimizer_offload=true"])
    shape = estimate.shape_from_config(cfg)
    est = estimate.estimate(cfg, 1, 2, 80 * GIB, shape=shape)  # a CUDA estimate: the staging is pinned
    decay = [estimate.shard_rows(s[0], 2, 0)[0] * (s[1] if len(s) > 1 else 1)
             for u in shape.units for s in u if len(s) >= 2]
    plain = [estimate.shard_rows(s[0], 2, 0)[0] for u in shape.units for s in u if len(s) < 2]
    staging = staging_bytes(decay, pinned=True) + staging_bytes(plain, pinned=True)
    assert est.cpu_per_rank == est.state.optimizer + staging
    assert staging > 8 * est.state.trained_local  # rounded up: more than the 8 bytes per parameter of payload


# ----------------------------------------------------------------------------- process group and device


def test_a_cuda_launch_uses_nccl_for_cuda_tensors_and_gloo_for_cpu_tensors():
    from torch.distributed.distributed_c10d import Backend, BackendConfig

    from fsdptrain.dist.distributed import process_group_backend

    assert process_group_backend("cuda") == "cuda:nccl,cpu:gloo"
    parsed = BackendConfig(Backend(process_group_backend("cuda"))).get_device_backend_map()  # torch's own parser
    assert parsed == {"cuda": "nccl", "cpu": "gloo"}
    assert process_group_backend("cpu") == "gloo"


def test_a_cpu_run_keeps_its_gloo_only_group():
    import torch.distributed as dist

    from fsdptrain.dist import distributed

    info = distributed.init("cpu")
    try:
        assert (info.backend, dist.get_backend(), info.device) == ("gloo", "gloo", torch.device("cpu"))
        assert (info.local_rank, info.local_world_size) == (0, 1)
    finally:
        distributed.shutdown(info)


def test_the_local_rank_comes_from_the_launcher_that_set_it():
    from fsdptrain.dist.distributed import local_layout

    assert local_layout({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}, 5, 8) == (1, 4)
    assert local_layout({"SLURM_LOCALID": "3", "SLURM_NTASKS_PER_NODE": "4"}, 7, 8) == (3, 4)
    assert local_layout({"OMPI_COMM_WORLD_LOCAL_RANK": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}, 10, 16) == (2, 8)
    # torchrun under srun (launch/slurm.sbatch: one torchrun per node, SLURM_LOCALID 0 for all its workers)
    assert local_layout({"LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8", "SLURM_LOCALID": "0",
                         "SLURM_NTASKS_PER_NODE": "1"}, 13, 16) == (5, 8)
    assert local_layout({}, 0, 1) == (0, 1)  # one process: nothing to place


def test_a_launch_without_a_local_rank_is_refused_in_one_line():
    import pytest

    from fsdptrain.core.errors import LaunchError
    from fsdptrain.dist.distributed import local_layout

    with pytest.raises(LaunchError) as e:
        local_layout({}, 3, 8)
    assert str(e.value) == (
        "RANK=3 WORLD_SIZE=8 are set but not LOCAL_RANK (nor SLURM_LOCALID or OMPI_COMM_WORLD_LOCAL_RANK), so every "
        "process would use the same device; set LOCAL_RANK and LOCAL_WORLD_SIZE for each process, or launch with "
        "torchrun (launch/torchrun.sh)")
    with pytest.raises(LaunchError, match=r"^SLURM_LOCALID=1 is set but SLURM_NTASKS_PER_NODE is not; set "):
        local_layout({"SLURM_LOCALID": "1"}, 1, 8)
    with pytest.raises(LaunchError, match=r"^LOCAL_RANK=4, LOCAL_WORLD_SIZE=4 with WORLD_SIZE=8: need 0 <= "):
        local_layout({"LOCAL_RANK": "4", "LOCAL_WORLD_SIZE": "4"}, 4, 8)
    with pytest.raises(LaunchError, match=r"^environment variable SLURM_LOCALID='x' is not an integer$"):
        local_layout({"SLURM_LOCALID": "x", "SLURM_NTASKS_PER_NODE": "2"}, 0, 2)


def test_every_cuda_branch_sets_the_device_also_in_an_existing_group(monkeypatch):
    import torch.distributed as dist

    from fsdptrain.dist import distributed

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # made by someone else
    try:
        info = distributed.init("cuda")
        assert chosen == [0] and info.device == torch.device("cuda", 0) and not info.owns_group
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- the optimizer on the CPU


def test_cpu_offload_runs_fused_adamw_and_cpu_runs_keep_foreach():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from fsdptrain.config.schema import load_config
    from fsdptrain.train.optim import adamw_fused, build_optimizer

    assert adamw_fused("cuda") and not adamw_fused("cpu")  # CUDA: GPU parameters and cpu_offload's CPU ones
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:  # what cpu_offload's optimizer sees: DTensors with CPU local shards; the fused CPU kernel takes them
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        w, g = torch.randn(8, 4), torch.randn(8, 4)
        models = [nn.Linear(4, 8, bias=False) for _ in range(2)]
        for m in models:
            m.weight = nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)]))
            m.weight.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        fused, foreach = (build_optimizer(m, load_config(None, []).train, fused=f) for m, f in zip(models, (1, 0)))
        assert fused.defaults["fused"] and foreach.defaults["foreach"] and not foreach.defaults["fused"]
        fused.step()
        foreach.step()
        assert torch.allclose(models[0].weight.full_tensor(), models[1].weight.full_tensor(), atol=1e-7)
        assert fused.state[models[0].weight]["step"].device.type == "cpu"
    finally:
        dist.destroy_process_group()


def test_an_optimizer_on_the_cpu_gets_its_share_of_the_cpus_unless_the_user_chose():
    from fsdptrain.train.optim import OMP_UNSET_MARKER, cpu_optimizer_threads

    torchrun = {"TORCHELASTIC_RUN_ID": "r1"}
    assert cpu_optimizer_threads({}, 64, 8) == 8
    assert cpu_optimizer_threads({**torchrun, "OMP_NUM_THREADS": "1"}, 64, 8) == 8  # torchrun's own default
    assert cpu_optimizer_threads({**torchrun, "OMP_NUM_THREADS": "1", OMP_UNSET_MARKER: "1"}, 64, 8) == 8
    # the user's 1, recorded by fsdptrain's launcher before torchrun set it
    assert cpu_optimizer_threads({**torchrun, "OMP_NUM_THREADS": "1", OMP_UNSET_MARKER: "0"}, 64, 8) is None
    assert cpu_optimizer_threads({**torchrun, "OMP_NUM_THREADS": "4"}, 64, 8) is None
    assert cpu_optimizer_threads({"OMP_NUM_THREADS": "1"}, 64, 8) is None  # no torchrun: the user's
    assert cpu_optimizer_threads({**torchrun, "OMP_NUM_THREADS": "1"}, 64, 1) is None  # torchrun sets none for 1
    assert cpu_optimizer_threads({}, 4, 8) == 1 and cpu_optimizer_threads({}, 2, 1) == 2


def test_the_launcher_records_whether_the_user_set_omp_num_threads(monkeypatch):
    from fsdptrain import launch

    seen = []
    monkeypatch.setattr(launch.os, "execvpe", lambda cmd0, cmd, env: seen.append(env))
    monkeypatch.setattr(launch.signal, "signal", lambda *a: None)
    monkeypatch.setenv("FSDPTRAIN_SKIP_PREFLIGHT", "1")
    for key in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID", "NPROC_PER_NODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert launch.main(["train.max_steps=1"]) == 0
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert launch.main(["train.max_steps=1"]) == 0
    assert [env["FSDPTRAIN_OMP_NUM_THREADS_UNSET"] for env in seen] == ["1", "0"]


# ----------------------------------------------------------------------------- buffers of an offloaded model


def test_cpu_offload_puts_the_buffers_on_the_compute_device(monkeypatch):
    # FSDP2 keeps offloaded shards on the CPU and moves no buffers; the compute device is CUDA in a real run, the
    # meta device here (a stand-in nothing else uses), so where each buffer ended up is visible on a CPU machine
    import dataclasses
    import json

    from torch.distributed.fsdp import CPUOffloadPolicy

    from fsdptrain.config.schema import load_config
    from fsdptrain.dist import distributed
    from fsdptrain.dist.mesh import build_mesh
    from fsdptrain.model import models
    from fsdptrain.train import parallelize
    from fsdptrain.train.build import build_sharded_model
    from tests.helpers import FAMILIES

    monkeypatch.setattr(parallelize, "CPUOffloadPolicy", lambda pin_memory: CPUOffloadPolicy(pin_memory=False))
    cfg = load_config(None, [f"model.hf_config={json.dumps(FAMILIES['deepseek_v3'])}", "model.random_init=true",
                             "parallel.cpu_offload=true", "model.attn_implementation=eager"])
    info = distributed.init("cpu")
    try:
        hf = models.load_hf_config(None, cfg.model.hf_config, 256, False)
        mesh = build_mesh(info, cfg.parallel)
        built = build_sharded_model(cfg, dataclasses.replace(info, device=torch.device("meta")), hf, mesh=mesh,
                                    fill=False)
        buffers = dict(built.model.named_buffers())
        assert any(n.endswith("e_score_correction_bias") for n in buffers) and any("inv_freq" in n for n in buffers)
        assert {n: b.device.type for n, b in buffers.items()} == dict.fromkeys(buffers, "meta")
        assert {p.to_local().device.type for p in built.model.parameters()} == {"cpu"}  # the shards stay offloaded
    finally:
        distributed.shutdown(info)


def test_moving_buffers_keeps_a_shared_buffer_shared():
    from fsdptrain.model.models import move_buffers

    a, b = nn.Module(), nn.Module()
    shared = torch.arange(3.0)
    a.register_buffer("x", shared)
    b.register_buffer("x", shared)
    root = nn.Sequential(a, b)
    move_buffers(root, torch.device("meta"))
    assert a.x.device.type == "meta" and a.x is b.x


# ----------------------------------------------------------------------------- smaller items


def test_ranks_waiting_for_the_data_wait_on_the_store_and_end_in_one_line(tmp_path, monkeypatch):
    # the waiting ranks used an NCCL all_gather_object: past the process-group timeout NCCL's watchdog aborted
    # them without a word. Here rank 1 (local rank 1) waits for a rank 0 that never answers (a stand-in second
    # rank: the group has one process, its size is patched to 2)
    import pytest
    import torch.distributed as dist

    from fsdptrain.core.errors import UserError
    from fsdptrain.data import cache
    from fsdptrain.dist import distributed

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert distributed.exchange_by_store("only", 1.0, lambda r: "late") == ["only"]
        monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
        monkeypatch.setattr(dist, "get_rank", lambda *a: 1)
        with pytest.raises(UserError) as e:
            cache.prepare([], None, None, tmp_path / "c", 1, 1, False, lambda m: None, wait_minutes=0.01)
        assert str(e.value) == (
            f"data: rank(s) [0] (local rank 0 of their node) still tokenising after 0.01 minutes "
            f"(parallel.timeout_minutes); fill the cache {tmp_path / 'c'} before launching (`fsdptrain data CONFIG` "
            "on each node, or once when data.cache_dir is shared) or raise parallel.timeout_minutes")
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()


def test_mfu_peaks_of_the_h100_and_h200_variants():
    from fsdptrain.run.metrics import peak_for_name

    assert peak_for_name("NVIDIA H100 80GB HBM3") == 989.0  # SXM
    assert peak_for_name("NVIDIA H100 PCIe") == 756.0
    assert peak_for_name("NVIDIA H100 NVL") == 835.0
    assert peak_for_name("NVIDIA H200") == 989.0 and peak_for_name("NVIDIA H200 NVL") == 835.0
    assert peak_for_name("NVIDIA A100-SXM4-80GB") == 312.0 and peak_for_name("Tesla T4") is None


def test_fp32_on_cuda_uses_tf32_matmuls_and_cpu_runs_do_not(monkeypatch):
    from fsdptrain.dist.plan import matmul_tf32
    from fsdptrain.train.build import use_matmul_precision

    assert matmul_tf32("fp32", "cuda") and not matmul_tf32("bf16-mixed", "cuda") and not matmul_tf32("fp32", "cpu")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    use_matmul_precision("fp32", "cpu")
    assert not torch.backends.cuda.matmul.allow_tf32
    use_matmul_precision("fp32", "cuda")
    assert torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.mkldnn.matmul.fp32_precision == "none"  # CPU matmuls untouched


def test_reduce_dtype_bf16_is_offered_for_bf16_compute_and_refused_for_fp32():
    import pytest

    from fsdptrain.config.schema import load_config
    from fsdptrain.core.errors import ConfigError
    from fsdptrain.dist.plan import check_device_support
    from fsdptrain.train.parallelize import mixed_precision_policy

    assert load_config(None, []).parallel.reduce_dtype == "fp32"
    assert mixed_precision_policy("bf16-mixed").reduce_dtype == torch.float32
    assert mixed_precision_policy("bf16-mixed", "bf16").reduce_dtype == torch.bfloat16
    assert mixed_precision_policy("bf16-pure", "bf16").param_dtype == torch.bfloat16
    check_device_support(load_config(None, ["parallel.reduce_dtype=bf16"]).parallel, "cuda")  # auto: bf16-mixed
    with pytest.raises(ConfigError) as e:
        check_device_support(load_config(None, ["parallel.reduce_dtype=bf16"]).parallel, "cpu")
    assert str(e.value) == ("parallel.reduce_dtype: bf16 needs bf16 compute, but precision auto is fp32 on cpu; set "
                            "parallel.reduce_dtype=fp32 or parallel.precision=bf16-mixed")
    with pytest.raises(ConfigError, match="parallel.reduce_dtype: 'fp16' is not allowed; choose one of fp32, bf16$"):
        load_config(None, ["parallel.reduce_dtype=fp16"])


def test_estimated_reduce_scatter_input_follows_reduce_dtype():
    from fsdptrain.config.schema import load_config
    from fsdptrain.core.units import GIB
    from fsdptrain.memory import estimate

    cfg = load_config(None, ["parallel.precision=bf16-mixed"])
    shape = estimate.shape_from_config(cfg)
    fp32 = estimate.estimate(cfg, 1, 2, 80 * GIB, shape=shape).terms["unit gradient + reduce-scatter input"]
    bf16 = estimate.estimate(load_config(None, ["parallel.precision=bf16-mixed", "parallel.reduce_dtype=bf16"]),
                             1, 2, 80 * GIB, shape=shape).terms["unit gradient + reduce-scatter input"]
    assert fp32 * 4 == bf16 * 6  # (2 + 4) vs (2 + 2) bytes per element of the largest unit


def test_compiled_blocks_get_a_recompile_limit_of_32(monkeypatch):
    import torch._dynamo

    from fsdptrain.train.parallelize import compile_blocks

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    compile_blocks([nn.Linear(2, 2)], "eager")
    assert torch._dynamo.config.recompile_limit == 32


def test_two_ranks_wait_for_the_data_on_the_store(tmp_path):
    import json
    import re

    from tests.helpers import torchrun

    docs = "".join(json.dumps({"text": f"document {i} " * 5}) + "\n" for i in range(20))
    (tmp_path / "docs.jsonl").write_text(docs)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"docs": {"file_name": "docs.jsonl",
                                                                     "columns": {"prompt": "text"}}}))
    proc = torchrun(2, ["-m", "tests.workers.data_wait", str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = sorted(x for x in proc.stdout.splitlines() if re.match(r"rank \d case \d: ", x))
    first = [x.split(": ", 1)[1] for x in lines if " case 1: " in x]
    assert len(first) == 2 and first[0] == first[1] and first[0].endswith("hit=False"), lines  # the same cache
    late = [x for x in lines if x.startswith("rank 1 case 2: ")]
    assert late == [f"rank 1 case 2: error: data: rank(s) [0] (local rank 0 of their node) still tokenising after "
                    f"0.05 minutes (parallel.timeout_minutes); fill the cache {tmp_path / 'cache'} before launching "
                    "(`fsdptrain data CONFIG` on each node, or once when data.cache_dir is shared) or raise "
                    "parallel.timeout_minutes"], lines
    assert any(x.startswith("rank 0 case 2: ") and x.endswith("hit=False") for x in lines), lines
