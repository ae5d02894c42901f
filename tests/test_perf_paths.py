"""Performance paths in one process: chunked loss, selective checkpointing, CPU-offloaded AdamW.

The 2-rank parity of each path against the reference loop is in test_parity.py;
these tests check that each path really does what it claims.
"""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fsdptrain.data.encode import IGNORE
from fsdptrain.model import models
from fsdptrain.objectives.loss import ChunkedLossHead, install_chunked_loss, token_loss_sum
from fsdptrain.train.optim_offload import CPUOffloadAdamW
from fsdptrain.train.parallelize import apply_activation_checkpointing

SMALL = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 97, "tie_word_embeddings": True}


def tiny_model(seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(SMALL)
    cfg = AutoConfig.for_model(fields.pop("model_type"), use_cache=False, **fields)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (3, 40), generator=g)
    labels = torch.randint(0, 97, (3, 40), generator=g)
    labels[:, :7] = IGNORE
    return {"input_ids": ids, "labels": labels}


def test_chunked_loss_equals_full_logits_loss_and_grads():
    a, b = tiny_model(), tiny_model()
    keys = list(b.state_dict())
    head = install_chunked_loss(b, chunk_tokens=16)  # 120 tokens -> 8 chunks, the last one short
    assert isinstance(b.lm_head, ChunkedLossHead) and b.lm_head.weight is b.model.embed_tokens.weight
    assert list(b.state_dict()) == keys
    x = batch()
    la, lb = token_loss_sum(a, x), token_loss_sum(b, x, head)
    assert lb.dim() == 0
    assert torch.allclose(la, lb, rtol=1e-6), (la, lb)
    la.backward()
    lb.backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n
    assert b(input_ids=x["input_ids"]).logits.shape == (3, 40, 97)  # no targets set: plain logits again


def test_chunked_loss_never_holds_more_than_one_chunk_of_logits():
    model = tiny_model()
    head = install_chunked_loss(model, chunk_tokens=16)
    x = batch()
    widest = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # vocabulary-wide activations; (32, 97) is the transposed lm_head weight (hidden 32), not logits
            if isinstance(out, torch.Tensor) and out.dim() >= 2 and out.shape[-1] == 97 and out.shape != (32, 97):
                widest.append(out.numel() // 97)
            return out

    with Watch():
        token_loss_sum(model, x, head).backward()
    assert widest and max(widest) == 16  # rows of vocabulary-wide tensors, forward and backward
    widest.clear()
    with Watch():
        token_loss_sum(tiny_model(), x).backward()
    assert max(widest) == 120  # without chunking all 3 x 40 tokens' logits exist at once


class MatmulFlops(TorchDispatchMode):
    """2 m k n per matrix product that runs, whatever the overload (in-place and out= included)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_"):
            a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


def test_chunked_loss_does_no_more_matmul_work_than_full_logits():
    # A checkpointed chunk would run lm_head's forward again in backward: 4 products instead of 3.
    flops = {}
    for chunk in (0, 16, 1000):
        model = tiny_model()
        head = install_chunked_loss(model, chunk)
        with MatmulFlops() as m:
            token_loss_sum(model, batch(), head).backward()
        flops[chunk] = m.flops
    lm_head = 2 * 120 * 32 * 97  # one product of 120 tokens x hidden 32 x vocab 97
    assert flops[0] > 3 * lm_head
    assert flops[16] == flops[0] and flops[1000] == flops[0], flops


def test_fused_linear_cross_entropy_with_bias_matches_autograd():
    from fsdptrain.objectives.loss import _chunk_loss_and_grad, _FusedLinearCrossEntropy

    g = torch.Generator().manual_seed(3)
    h = torch.randn(50, 8, generator=g, requires_grad=True)
    w = torch.randn(13, 8, generator=g, requires_grad=True)
    b = torch.randn(13, generator=g, requires_grad=True)
    y = torch.randint(0, 13, (50,), generator=g)
    y[::4] = IGNORE
    ref = F.cross_entropy(F.linear(h, w, b), y, ignore_index=IGNORE, reduction="sum")
    (ref * 0.37).backward()
    want = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    loss = _FusedLinearCrossEntropy.apply(h, w, b, y, 7, _chunk_loss_and_grad)  # 50 tokens: 7 chunks, last of 1
    assert torch.allclose(loss, ref, rtol=1e-6)
    (loss * 0.37).backward()
    for got, exp in zip((h.grad, w.grad, b.grad), want):
        assert torch.allclose(got, exp, rtol=1e-5, atol=1e-6)


class CountOps(TorchDispatchMode):
    """Counts aten ops that actually run. Pushed before backward, it sits below the checkpoint's own mode,
    so an op whose saved output selective checkpointing hands back is never seen here."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def ops_in_backward(mode) -> dict[str, int]:
    """mode: one checkpointing mode for every block, or a list with one per block."""
    model = tiny_model()
    blocks = models.find_blocks(model)
    apply_activation_checkpointing(blocks, [mode] * len(blocks) if isinstance(mode, str) else mode)
    loss = token_loss_sum(model, batch())
    with CountOps() as c:
        loss.backward()
    return c.counts


def test_selective_checkpointing_recomputes_only_cheap_ops():
    none, full, sel = ops_in_backward("none"), ops_in_backward("full"), ops_in_backward("selective")
    mm = lambda c: c.get("mm", 0) + c.get("addmm", 0) + c.get("bmm", 0)  # noqa: E731
    assert mm(full) > mm(none)  # full checkpointing runs the block's matmuls again
    assert mm(sel) == mm(none)  # selective keeps matmul outputs ...
    sdpa = lambda c: sum(v for k, v in c.items() if k.startswith("_scaled_dot_product"))  # noqa: E731
    assert sdpa(full) > sdpa(none) and sdpa(sel) == sdpa(none)  # ... and attention outputs
    assert sel.get("mul", 0) > none.get("mul", 0)  # ... and recomputes element-wise ops (norms, SiLU, RoPE)


def test_cpu_offload_adamw_matches_torch_adamw(monkeypatch):
    from fsdptrain.train import optim_offload as oo

    monkeypatch.setattr(oo.staging, "CHUNK_BYTES", 100)  # several chunks per group: the pipelined path
    torch.manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(3, 4)),
           torch.nn.Parameter(torch.randn(5))]
    mine = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    a = torch.optim.AdamW([{"params": ref[:2], "weight_decay": 0.1}, {"params": ref[2:], "weight_decay": 0.0}], **kw)
    b = CPUOffloadAdamW([{"params": mine[:2], "weight_decay": 0.1}, {"params": mine[2:], "weight_decay": 0.0}], **kw)
    for _step in range(5):
        g = [torch.randn_like(p) for p in ref]
        for p, q, gi in zip(ref, mine, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        a.step()
        b.step()
    for p, q in zip(ref, mine):
        assert torch.allclose(p, q, atol=1e-6), (p - q).abs().max()
    st = b.state[mine[0]]
    assert st["exp_avg"].device.type == "cpu" and float(st["step"]) == 5
    assert len(b.staged(0)) == 2  # the decay group was updated in two chunks


def test_cpu_offload_adamw_rereads_parameters_after_a_state_load():
    # The host keeps its copy of each fp32 shard between steps; a load (a resumed checkpoint may also replace the
    # parameters) must make the next step read the parameters again.
    torch.manual_seed(0)
    ref, mine = torch.nn.Parameter(torch.randn(6, 3)), None
    mine = torch.nn.Parameter(ref.detach().clone())
    a, b = torch.optim.AdamW([ref], lr=1e-2), CPUOffloadAdamW([mine], lr=1e-2)
    for step in range(4):
        g = torch.randn_like(ref)
        ref.grad, mine.grad = g.clone(), g.clone()
        if step == 2:  # parameters replaced from outside, then the optimizer state reloaded
            with torch.no_grad():
                ref.mul_(0.5)
                mine.mul_(0.5)
            a.load_state_dict(a.state_dict())
            b.load_state_dict(b.state_dict())
        a.step()
        b.step()
        assert torch.allclose(ref, mine, atol=1e-6), step
    assert mine in b._in_sync and b.staged(0)[0].shards[0].data_ptr() != mine.data_ptr()


def test_offloaded_optimizer_state_checkpoints_and_resumes_exactly(tmp_path):
    from fsdptrain.config.schema import load_config
    from fsdptrain.trainer import train

    common = [f"output_dir={tmp_path}", "train.max_steps=4", "data.synthetic_examples=128", "logging.progress=none",
              "logging.log_every=1", "logging.tensorboard=false", "parallel.optimizer_offload=true",
              "checkpoint.save_every=2", "checkpoint.keep_last=0"]
    full = train(load_config(None, common)).losses
    resumed = train(load_config(None, [*common, f"checkpoint.resume={tmp_path}/checkpoints/step-00000002"])).losses
    assert resumed == full[2:]  # bitwise: AdamW moments and step counts came back from the checkpoint


def test_per_block_checkpointing_modes_recompute_only_their_blocks():
    # what activation_checkpointing=auto applies: a plan mixing modes across the 2 blocks
    none, full = ops_in_backward("none"), ops_in_backward("full")
    mm = lambda c: c.get("mm", 0) + c.get("addmm", 0)  # noqa: E731
    silu = lambda c: c.get("silu", 0)  # noqa: E731
    one_block_mm = (mm(full) - mm(none)) // 2
    assert mm(full) - mm(none) == 2 * one_block_mm
    # q, k, v, o, gate, up (+ down, unless non-reentrant recomputation stops once the saved tensors are rebuilt)
    assert one_block_mm in (6, 7)
    assert mm(ops_in_backward(["full", "selective"])) == mm(none) + one_block_mm
    assert mm(ops_in_backward(["none", "full"])) == mm(none) + one_block_mm
    assert silu(ops_in_backward(["selective", "none"])) == silu(none) + 1  # its element-wise ops run again
    assert silu(ops_in_backward(["selective", "selective"])) == silu(none) + 2


def test_auto_checkpointing_plan_is_the_least_recomputation_within_budget():
    from fsdptrain.config.schema import Config
    from fsdptrain.dist.plan import checkpoint_modes, describe_modes
    from fsdptrain.memory import estimate

    shape = estimate.shape_of_model(models.build_meta_model(
        models.load_hf_config(None, {**SMALL, "num_hidden_layers": 6}, None, False), "sdpa", torch.float32, False))
    cfg = Config()  # 1 node x 2 GPUs, micro-batch 4 x 512 tokens, bf16-mixed, defaults otherwise
    cfg.train.micro_batch_size, cfg.data.max_length, cfg.parallel.precision = 4, 512, "bf16-mixed"
    cfg.parallel.activation_checkpointing = "auto"

    def with_mode(mode: str) -> Config:
        return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, activation_checkpointing=mode))

    s = estimate.settings_from_config(cfg, 1, 2, 2**30)
    plans = estimate.candidate_plans(6)
    assert len(plans) == 13 and plans[0] == ["none"] * 6 and plans[6] == ["selective"] * 6
    assert plans[7] == ["full"] + ["selective"] * 5 and plans[-1] == ["full"] * 6
    peaks = [estimate.compute(shape, dataclasses.replace(s, block_modes=tuple(p))).peak for p in plans]
    fixed = {m: estimate.compute(shape, estimate.settings_from_config(with_mode(m), 1, 2, 2**30)).peak
             for m in ("none", "selective", "full")}
    assert (peaks[0], peaks[6], peaks[-1]) == (fixed["none"], fixed["selective"], fixed["full"])
    assert peaks[-1] < peaks[6] < peaks[0]
    for i in (0, 3, 6, 9, 12):  # a budget exactly at a plan's peak picks it, or an earlier plan that also fits
        modes, est = estimate.plan_checkpointing(shape, s, peaks[i])
        j = plans.index(modes)
        assert j <= i and est.peak == peaks[j] <= peaks[i] and all(p > peaks[i] for p in peaks[:j])
    modes, est = estimate.plan_checkpointing(shape, s, peaks[-1] - 1)  # nothing fits: everything full
    assert modes == ["full"] * 6 and est.peak > peaks[-1] - 1
    assert describe_modes(["full", "selective", "selective", "none"]) == "blocks 0 full, 1-2 selective, 3 none"
    assert checkpoint_modes(5, "every_k", 2) == ["full", "none", "full", "none", "full"]


def test_a_finished_run_frees_its_model_and_optimizer_state(tmp_path, monkeypatch):
    """FSDP2's state and hooks form reference cycles with the modules: without the trainer's own collection the
    model, its parameters and the AdamW moments outlive train() (a second run in the process would start with
    them still held). Automatic collection is off here, as between two runs where Python does not happen to run a
    full one; a failed run frees them too."""
    import gc
    import weakref

    from fsdptrain import trainer
    from fsdptrain.config.schema import load_config
    from fsdptrain.core.errors import TrainingError

    refs: list[weakref.ref] = []
    real_setup = trainer.setup

    def setup(*args, **kwargs):
        run = real_setup(*args, **kwargs)
        param = next(run.model.parameters())
        refs.extend([weakref.ref(run.model), weakref.ref(param), weakref.ref(run.optimizer)])
        return run

    monkeypatch.setattr(trainer, "setup", setup)
    common = ["train.max_steps=2", "data.synthetic_examples=32", "logging.progress=none", "logging.tensorboard=false"]
    gc.collect()
    gc.disable()
    try:
        trainer.train(load_config(None, [f"output_dir={tmp_path / 'a'}", *common]))
        assert len(refs) == 3 and [r() for r in refs] == [None, None, None]
        refs.clear()
        with pytest.raises(TrainingError, match="non-finite"):  # a run that fails frees its model too
            trainer.train(load_config(None, [f"output_dir={tmp_path / 'b'}", *common, "train.lr=1e30"]))
        assert len(refs) == 3 and [r() for r in refs] == [None, None, None]
    finally:
        gc.enable()


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")  # the test's wrapper
def test_a_step_reads_the_device_once_and_agrees_on_stopping_in_its_own_all_gather(tmp_path, monkeypatch):
    """Each host read of a device value (.item(), .tolist()) is a sync on CUDA. A step reads once, after its update
    is queued (train.on_nonfinite stop: a non-finite step ends the run anyway), and the stop agreement rides in the
    step's all_gather: no all_reduce of its own. A request on this rank stops the run at that step."""
    from fsdptrain import trainer
    from fsdptrain.config.schema import load_config
    from fsdptrain.core.errors import RunStopped
    from fsdptrain.dist import distributed, stopping

    reads, events = [], []
    real_item, real_tolist, real_step = torch.Tensor.item, torch.Tensor.tolist, trainer.train_step

    def ours() -> bool:  # the trainer's and the stop agreement's reads (torch.optim reads its CPU step counts)
        return sys._getframe(2).f_code.co_filename.endswith(("fsdptrain/trainer.py", "fsdptrain/dist/stopping.py"))

    def item(t):
        if ours():
            reads.append("item")
        return real_item(t)

    def tolist(t):
        if ours():
            reads.append("tolist")
        return real_tolist(t)

    def step(run, batches, *args, **kwargs):
        if not events:  # once: the optimizer's step notes how many reads came before it
            real_opt_step = run.optimizer.step

            def opt_step(*a, **k):
                events.append(("optimizer.step", len(reads)))
                return real_opt_step(*a, **k)

            monkeypatch.setattr(run.optimizer, "step", opt_step)
        reads.clear()
        stats = real_step(run, batches, *args, **kwargs)
        events.append(("reads", list(reads)))
        if stats.step == 2:
            kwargs["stop"].code = 3  # as SIGUSR1 would: seen by step 3's all_gather
        return stats

    monkeypatch.setattr(torch.Tensor, "item", item)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    monkeypatch.setattr(trainer, "train_step", step)
    monkeypatch.setattr(distributed, "all_reduce_max", lambda t: pytest.fail("a stop collective of its own"))
    monkeypatch.setattr(stopping.StopRequests, "_on_signal", lambda *a: None)

    cfg = load_config(None, [f"output_dir={tmp_path}", "train.max_steps=5", "data.synthetic_examples=32",
                             "logging.progress=none", "logging.tensorboard=false", "logging.log_every=100"])
    with pytest.raises(RunStopped, match="stopped by SIGUSR1 at step 3; checkpoint saved to "):
        trainer.train(cfg)
    per_step = [e for e in events if e[0] == "reads"]
    assert [e[1] for e in per_step] == [["tolist"]] * 3  # one read per step, and steps 4-5 never ran
    assert [e for e in events if e[0] == "optimizer.step"] == [("optimizer.step", 0)] * 3  # queued before it
    assert (tmp_path / "checkpoints" / "step-00000003" / "COMPLETE.json").is_file()


def _sharded_tiny(overrides: list[str], backend=None):
    """A 3-block Llama through the trainer's own builder (fully_shard on a one-rank gloo group); `backend`: a
    compile backend object for parallel.compile_backend."""
    from fsdptrain.config.schema import load_config
    from fsdptrain.dist import distributed
    from fsdptrain.model import models
    from fsdptrain.train.build import build_sharded_model

    cfg = load_config(None, ["parallel.device=cpu", "parallel.precision=fp32", *overrides])
    if backend is not None:
        cfg.parallel.compile_backend = backend
    cfg.model.hf_config = {**SMALL, "num_hidden_layers": 3, "max_position_embeddings": 256}
    info = distributed.init("cpu")
    return build_sharded_model(cfg, info, models.load_hf_config(None, cfg.model.hf_config, None, False)), info


def test_selective_checkpointing_under_compile_keeps_matmul_outputs_inside_the_graph():
    """Selective checkpointing of compiled blocks: the checkpoint is inside what compile traces, so the
    partitioner applies the policy to the graph's ops. The compiled forward runs once per block (hooks outside the
    graph would re-run it whole in backward, as full checkpointing does, because inductor's matmuls are
    invisible to the policy), backward has only the matmuls of the gradients and recomputes the cheap ops, and the
    state-dict keys stay Hugging Face's. A counting backend with inductor's partitioner stands in for inductor."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from fsdptrain.dist import distributed

    graphs: dict[str, dict] = {}

    def counting(kind: str):
        def compile_graph(gm, example_inputs):
            ops = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
            g = graphs.setdefault(f"{kind}{len(graphs)}", {"mm": ops.count("aten.mm.default"),
                                                            "silu": ops.count("aten.silu.default"), "calls": 0})
            run = make_boxed_func(gm.forward)

            def counted(args):
                g["calls"] += 1
                return run(args)

            counted._boxed_call = True
            return counted
        return compile_graph

    backend = aot_autograd(fw_compiler=counting("forward"), bw_compiler=counting("backward"),
                           partition_fn=min_cut_rematerialization_partition)
    torch._dynamo.reset()
    sharded, info = _sharded_tiny(["parallel.compile=true", "parallel.activation_checkpointing=selective"], backend)
    try:
        model, steps = sharded.model, 2
        for _ in range(steps):
            token_loss_sum(model, batch()).backward()
        fwd = [g for k, g in graphs.items() if k.startswith("forward")]
        bwd = [g for k, g in graphs.items() if k.startswith("backward")]
        assert len(fwd) == len(bwd) == 1  # one graph for all 3 blocks
        assert fwd[0]["calls"] == 3 * steps  # not 6 * steps: backward does not re-run the compiled forward
        assert fwd[0]["mm"] == 7 and bwd[0]["mm"] == 2 * 7  # q k v o gate up down; their input and weight grads
        assert bwd[0]["silu"] == 1  # the cheap ops are recomputed (selective, not "save everything")
        keys = set(model.state_dict())
        assert "model.layers.0.mlp.up_proj.weight" in keys and not any("checkpoint" in k for k in keys)
    finally:
        distributed.shutdown(info)
        torch._dynamo.reset()


@pytest.mark.slow
def test_selective_checkpointing_under_inductor_trains_like_eager():
    """The same with real inductor (CPU C++ kernels): three SGD steps give the losses of uncompiled selective
    checkpointing."""
    from fsdptrain.dist import distributed

    def losses(overrides: list[str]) -> list[float]:
        sharded, info = _sharded_tiny(["parallel.activation_checkpointing=selective", *overrides])
        try:
            opt = torch.optim.SGD(sharded.model.parameters(), lr=0.1)
            out = []
            for _ in range(3):
                loss = token_loss_sum(sharded.model, batch())
                loss.backward()
                opt.step()
                opt.zero_grad()
                out.append(loss.item())
            return out
        finally:
            distributed.shutdown(info)

    torch._dynamo.reset()
    try:
        eager, compiled = losses([]), losses(["parallel.compile=true", "parallel.compile_backend=inductor"])
    finally:
        torch._dynamo.reset()
    assert compiled == pytest.approx(eager, rel=1e-5)
