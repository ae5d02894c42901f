"""The families of issue 26, in-process and fast: what was wrong with each, checked at its cause.

The 2-rank family matrix (tests/test_family_matrix.py, slow) trains every fixed family end to end; here, in one
process: a persistent buffer stored under a renamed key is loaded (MiniMax-M2's router correction bias), Mamba's
blocks are its blocks and not also the mixers inside them, a dense Doge and an all-hash DeepSeek-V4 have no router
auxiliary loss, and a model whose layers share weights (Zamba2) is refused in one line before a weight is read.
The tiny configs come from tests/tiny.py (the generic builder the sweep, benchmarks/family_sweep.py, uses).
"""

from __future__ import annotations

import json

import pytest
import torch

from fsdptrain.core.errors import ConfigError
from fsdptrain.model import models, moe
from tests.helpers import cli_inproc, make_model_dir
from tests.tiny import tiny_fields


def meta_model(model_type: str, **extra):
    fields = {**tiny_fields(model_type, vocab_size=100), **extra}
    hf = models.load_hf_config(None, fields, None, False)
    return models.build_meta_model(hf, "eager", torch.float32, False)


def test_renamed_persistent_buffer_is_loaded_like_from_pretrained(tmp_path):
    """minimax_m2's checkpoint stores `block_sparse_moe.e_score_correction_bias`, transformers renames it to
    `mlp.e_score_correction_bias`: the loader read buffers by their in-memory name only and kept the init value,
    so step 1's loss differed from transformers' (issue 26: 6.30928 vs 6.31377)."""
    from transformers import AutoModelForCausalLM

    from fsdptrain.config.schema import load_config
    from fsdptrain.dist import distributed
    from fsdptrain.train.build import build_sharded_model

    folder = make_model_dir(tmp_path / "m", tiny_fields("minimax_m2"))
    from safetensors.torch import load_file

    assert any(k.endswith("block_sparse_moe.e_score_correction_bias") for k in load_file(folder / "model.safetensors"))
    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    cfg = load_config(None, [f"model.path={folder}", "parallel.device=cpu", "parallel.precision=fp32",
                             f"output_dir={tmp_path / 'run'}"])
    info = distributed.init("cpu")
    try:
        hf = models.load_hf_config(str(folder), None, None, False)
        model = build_sharded_model(cfg, info, hf).model
        mine = {k: b.clone() for k, b in model.named_buffers()}
        ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
    finally:
        distributed.shutdown(info)
    theirs = dict(ref.named_buffers())
    biases = [k for k in theirs if k.endswith("mlp.e_score_correction_bias")]
    assert len(biases) == 2
    for key in theirs:
        assert torch.equal(mine[key], theirs[key]), key
    with torch.no_grad():
        assert abs(loss - ref(input_ids=ids, labels=ids).loss.item()) < 1e-6


@pytest.mark.parametrize("model_type,block", [("mamba", "MambaBlock"), ("falcon_mamba", "FalconMambaBlock")])
def test_mamba_blocks_are_the_outermost_no_split_modules(model_type, block):
    """_no_split_modules names the block and the mixer inside it: both became FSDP units, the mixer's after its
    block's, and its weights stayed sharded in the block's forward (`aten.mm.default got mixed torch.Tensor and
    DTensor`)."""
    blocks = models.find_blocks(meta_model(model_type))
    assert [type(b).__name__ for b in blocks] == [block] * 2


@pytest.mark.parametrize("model_type,extra,why", [
    ("doge", {}, "is_moe is false: the MLPs are dense"),
    ("deepseek_v4", {"num_hidden_layers": 2, "layer_types": ["heavily_compressed_attention"] * 2,
                     "mlp_layer_types": ["hash_moe"] * 2},
     "every MoE layer is hash-routed (no 'moe' in mlp_layer_types)"),
])
def test_a_config_without_a_learned_router_has_no_aux_loss(model_type, extra, why):
    """The config's router_aux_loss_coef (0.001) was used: dense Doge's forward returns aux_loss None
    (`'NoneType' object has no attribute 'float'`), an all-hash DeepSeek-V4 fails in transformers'
    load_balancing_loss_func (`IndexError: tuple index out of range`)."""
    model = meta_model(model_type, **extra)
    assert model.config.router_aux_loss_coef > 0
    assert moe.resolve_aux_coef(None, model) == 0.0
    with pytest.raises(ConfigError) as e:
        moe.resolve_aux_coef(0.01, model)
    assert str(e.value) == (f"train.router_aux_loss_coef: model_type '{model_type}' has no router auxiliary loss in "
                            f"transformers ({why}); set it to null or 0")
    assert moe.resolve_aux_coef(None, meta_model("deepseek_v4")) == 0.001  # with learned routers: the config's


ZAMBA2 = ("fsdptrain: error: model: zamba2: its shared transformer block is used from several layers "
          "(model.layers.1 and model.layers.3 hold the same 'shared_transformer.self_attn.q_proj.weight'), which "
          "FSDP2 per-block sharding cannot train; fsdptrain cannot train this family: use a model whose layers do "
          "not share weights\n")


def test_shared_weights_across_blocks_are_refused_before_any_weight_is_read(tmp_path):
    """zamba2 crashed (`aten.mul.Tensor got mixed torch.Tensor and DTensor`) or failed to find its second copy of
    the shared block's weights; now one line, exit 2, from a folder whose weights file is garbage (never read)."""
    from transformers import AutoConfig

    fields = tiny_fields("zamba2", vocab_size=100)
    AutoConfig.for_model(fields.pop("model_type"), **fields).save_pretrained(str(tmp_path / "m"))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not safetensors")
    res = cli_inproc(["train", f"model.path={tmp_path / 'm'}", f"output_dir={tmp_path / 'run'}",
                      "parallel.device=cpu", "data.synthetic_examples=40", "train.micro_batch_size=2",
                      "logging.progress=none"])
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr == ZAMBA2
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "zamba2"


# The three families transformers loads through a conversion fsdptrain refused (issue 26): the file key in the
# hub's layout, and the parameter it becomes.
CONVERTED = {
    "sarvam_moe": ("model.layers.0.attention.query_key_value.weight", "model.layers.0.self_attn.k_proj.weight"),
    "param2moe": ("model.layers.0.attention.query_key_value.weight", "model.layers.0.self_attn.v_proj.weight"),
    "inkling2_text": ("model.llm.layers.0.mlp.experts.w13_weight", "model.layers.0.mlp.experts.gate_up_proj"),
    "ergo": ("layers.1.feed_forward.gate_kernel", "model.layers.1.mlp.gate.linear.weight"),  # stored [in, out]
}


def safetensors_tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("model_type,extra", [(t, {}) for t in sorted(CONVERTED)] + [
    ("inkling2_text", {"unpadded_vocab_size": 90}),  # the unembedding stored padded: 100 rows, 90 used
])
def test_split_and_interleaved_checkpoints_load_train_and_export_like_transformers(tmp_path, model_type, extra):
    """sarvam_moe and param2moe store q, k and v fused (`query_key_value`, transformers `Split`s it by the
    projections' sizes), inkling2_text its experts' gate and up rows alternating (`w13_weight`, `Interleave`): the
    loader refused them (`... converts its checkpoint with Split ..., which fsdptrain cannot read shard by
    shard`); ergo stores its router and shared expert [in, out] (`Transpose`, refused the same way). Now every
    parameter and buffer equals from_pretrained's after loading, step 1's loss (lr 0) equals
    transformers' own on the same tokens, and the export holds exactly the tensors save_pretrained wrote, in the
    hub's layout (the fused tensor again). With `unpadded_vocab_size` below the vocabulary, inkling2_text's
    stored unembedding has padding rows that transformers drops (`Inkling2UnpadVocab`) and saving writes back as
    zeros: the loader reads the leading rows only."""
    from transformers import AutoModelForCausalLM

    from fsdptrain.config.schema import load_config
    from fsdptrain.data.encode import Example
    from fsdptrain.dist import distributed
    from fsdptrain.trainer import loop, setup

    hub_key, param = CONVERTED[model_type]
    folder = make_model_dir(tmp_path / "m", {**tiny_fields(model_type), **extra})
    original = safetensors_tensors(folder)
    assert hub_key in original and param not in original
    attn = "eager" if model_type == "inkling2_text" else "sdpa"  # transformers has no sdpa for inkling2
    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation=attn).eval()
    vocab = extra.get("unpadded_vocab_size", 100)
    rows = torch.randint(3, vocab, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_loss = ref(input_ids=rows, labels=rows).loss.item()
    cfg = load_config(None, [
        f"model.path={folder}", f"model.attn_implementation={attn}", f"output_dir={tmp_path / 'run'}",
        "parallel.device=cpu", "parallel.precision=fp32",
        "train.max_steps=1", "train.lr=0", "train.micro_batch_size=4", "train.router_aux_loss_coef=0",
        "checkpoint.export_hf=true", "checkpoint.export_dtype=fp32", "checkpoint.save_at_end=false",
        "logging.progress=none", "logging.tensorboard=false"])
    info = distributed.init("cpu")
    run = None
    try:
        run = setup(cfg, info, [Example(r, r) for r in rows.tolist()])
        model = run.sharded.model
        mine = {k: models.local_tensor(v).clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
        loss = loop(run).losses[0]
    finally:
        if run is not None and run.lock is not None:
            run.lock.release()
        distributed.shutdown(info)
    theirs = dict([*ref.named_parameters(), *ref.named_buffers()])
    assert sorted(mine) == sorted(theirs)
    for key, t in theirs.items():
        assert torch.equal(mine[key], t), key
    assert abs(loss - ref_loss) < 1e-5, (loss, ref_loss)
    exported = safetensors_tensors(tmp_path / "run" / "hf")
    assert sorted(exported) == sorted(original)
    for key, t in original.items():
        assert exported[key].dtype == t.dtype and torch.equal(exported[key], t), key


def test_a_rank_reads_only_its_rows_of_split_and_interleaved_tensors(tmp_path, monkeypatch):
    """The pieces of a Split target (a row window of the fused tensor), of a Transpose (a rank's rows are file
    columns) and of an Interleave, along the sharded dim (every other row) or a later one (inkling2's experts: gate
    and up rows alternate within each expert), give, for any rank's rows, exactly those rows of transformers' own
    conversion, read as plain byte ranges (never through safetensors' memory-mapped fallback)."""
    from safetensors.torch import save_file
    from transformers.core_model_loading import Interleave

    from fsdptrain.model.safetensors_io import SafetensorsFile
    from fsdptrain.model.weightmap import Piece

    def no_mmap(self, key, index):
        raise AssertionError(f"memory-mapped read of {key}{index}")

    monkeypatch.setattr(SafetensorsFile, "_slow", no_mmap)
    fused = torch.arange(10 * 3, dtype=torch.float32).reshape(10, 3)
    experts = torch.arange(4 * 6 * 2, dtype=torch.float32).reshape(4, 6, 2)
    save_file({"qkv": fused, "w13": fused.clone(), "experts": experts}, str(tmp_path / "w.safetensors"))
    index = dict.fromkeys(("qkv", "w13", "experts"), tmp_path / "w.safetensors")
    shapes = {"qkv": (10, 3), "w13": (10, 3), "experts": (4, 6, 2)}
    k_proj = [Piece("qkv", (0, 0), False, start=(4, 0), extent=(4, 3))]  # q 4 rows, k 4, v 2
    rows = [Piece("w13", (0, 0), False, start=(0, 0), extent=(5, 3), step=(2, 1)),
            Piece("w13", (5, 0), False, start=(1, 0), extent=(5, 3), step=(2, 1))]
    per_expert = [Piece("experts", (0, 0, 0), False, start=(0, 0, 0), extent=(4, 3, 2), step=(1, 2, 1)),
                  Piece("experts", (0, 3, 0), False, start=(0, 1, 0), extent=(4, 3, 2), step=(1, 2, 1))]
    transposed = [Piece("qkv", (0, 0), False, dims=(1, 0))]  # parameter [3, 10] of the file's [10, 3]
    cases = [(k_proj, fused[4:8]), (transposed, fused.T),
             (rows, Interleave(dim=0).convert({"w13": [fused]}, ["w13"], ["t"])["t"]),
             (per_expert, Interleave(dim=1).convert({"experts": [experts]}, ["experts"], ["t"])["t"])]
    handles: dict = {}
    try:
        for pieces, want in cases:
            rest = tuple(slice(0, n) for n in want.shape[1:])
            for lo, hi in ((0, len(want)), (1, 3), (3, len(want)), (2, 4)):
                if hi > len(want):
                    continue
                out = torch.full((hi - lo, *want.shape[1:]), -1.0)
                models.read_pieces(pieces, shapes, index, handles, (slice(lo, hi), *rest), out)
                assert torch.equal(out, want[lo:hi]), (pieces[0].key, lo, hi)
    finally:
        for h in handles.values():
            h.close()
