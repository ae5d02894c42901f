"""Every decoder type of the installed transformers through fsdptrain: step-1 loss and export, one table row each.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/family_sweep.py [--out DIR] [MODEL_TYPE ...]

Per model type (default: every type of transformers' causal-LM mapping whose config is a text decoder), on one
rank, CPU, fp32: a tiny random model (tests/tiny.py's generic builder) is saved with `save_pretrained`, then
fsdptrain trains one step from it through the trainer (`setup`, `loop`, lr 0, no router auxiliary loss) and
exports it. Verdicts:
  exact       step 1's loss equals transformers' own `model(ids, labels=ids).loss` on the same tokens (1e-4),
              and the export holds exactly the original folder's tensors (lr 0: nothing moved);
  wrong       the loss or the export differs (the detail says which, by how much);
  refused     fsdptrain stops at start-up with one line (the detail);
  error       anything else (an internal error: the detail is its type and first line);
  transformers  transformers itself cannot build, run or save the tiny model (not counted as ours).
The table (markdown) goes to stdout; docs/families.md holds the last run's. About 2 s a type on one core.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOLERANCE = 1e-4
N_ROWS, LENGTH = 4, 16


# Encoders (and encoder-decoder halves) that transformers also maps to a causal-LM head: not decoder families.
ENCODERS = {"bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie", "megatron-bert",
            "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "xlm-roberta", "xlm-roberta-xl",
            "xmod", "trocr", "xlm", "xlnet", "reformer", "cpmant"}


def text_decoder_types() -> list[str]:
    """The causal-LM model types whose config has no sub-config (vision, audio and encoder-decoder models have),
    less the encoders with a causal-LM head."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            config = AutoConfig.for_model(model_type)
        except Exception:  # noqa: BLE001 - a config that cannot even be built with defaults: listed by `sweep`
            out.append(model_type)
            continue
        if getattr(config, "sub_configs", None) or config.is_encoder_decoder or model_type in ENCODERS:
            continue
        out.append(model_type)
    return out


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}"


def reference(folder: Path, rows: list[list[int]]) -> tuple[str, float]:
    """transformers' own loss on the rows, and the attention implementation it accepted."""
    from transformers import AutoModelForCausalLM

    for attn in ("sdpa", "eager"):
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation=attn)
        except ValueError:
            continue
        ids = torch.tensor(rows)
        with torch.no_grad():
            return attn, model.eval()(input_ids=ids, labels=ids).loss.item()
    raise RuntimeError("neither sdpa nor eager attention")


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def export_difference(original: Path, exported: Path) -> str | None:
    mine, theirs = tensors(exported), tensors(original)
    if sorted(mine) != sorted(theirs):
        extra = sorted(set(mine) ^ set(theirs))
        return f"export keys differ: {extra[:2]}"
    for key, t in theirs.items():
        if mine[key].shape != t.shape or not torch.equal(mine[key].to(t.dtype), t):
            return f"export differs at {key}"
    return None


def sweep_one(model_type: str, root: Path, info) -> tuple[str, str]:
    """(verdict, detail) of one model type."""
    from fsdptrain.config.schema import load_config
    from fsdptrain.core.errors import UserError
    from fsdptrain.data.encode import Example
    from fsdptrain.trainer import loop, setup
    from tests.helpers import make_model_dir
    from tests.tiny import tiny_fields

    folder = root / model_type / "model"
    rows = torch.randint(3, 100, (N_ROWS, LENGTH), generator=torch.Generator().manual_seed(0)).tolist()
    try:
        make_model_dir(folder, tiny_fields(model_type))
        attn, hf_loss = reference(folder, rows)
    except Exception as e:  # noqa: BLE001 - transformers' own failure on the tiny model
        return "transformers", one_line(e)
    cfg = load_config(None, [
        f"model.path={folder}", f"model.attn_implementation={attn}", f"output_dir={root / model_type / 'run'}",
        "parallel.device=cpu", "parallel.precision=fp32", "seed=0", "train.max_steps=1", "train.lr=0",
        f"train.micro_batch_size={N_ROWS}", "train.router_aux_loss_coef=0", "checkpoint.export_hf=true",
        "checkpoint.export_dtype=fp32", "checkpoint.save_at_end=false", "logging.progress=none",
        "logging.tensorboard=false"])
    run = None
    try:
        run = setup(cfg, info, [Example(r, r) for r in rows])
        loss = loop(run).losses[0]
    except UserError as e:
        return "refused", str(e).replace(str(folder), "<folder>")
    except Exception as e:  # noqa: BLE001 - what the sweep is for
        return "error", one_line(e)
    finally:
        if run is not None and run.lock is not None:
            run.lock.release()
    if abs(loss - hf_loss) > TOLERANCE:
        return "wrong", f"step-1 loss {loss:.5f}, transformers {hf_loss:.5f}"
    diff = export_difference(folder, root / model_type / "run" / "hf")
    return ("wrong", diff) if diff else ("exact", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="*", help="model types (default: every text decoder type)")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)

    from fsdptrain.core import log
    from fsdptrain.dist import distributed

    root = args.out or Path(tempfile.mkdtemp(prefix="family-sweep-"))
    types = args.types or text_decoder_types()
    info = distributed.init("cpu")
    log.configure(False)  # the trainer's own lines would bury the table
    rows = []
    try:
        for model_type in types:
            verdict, detail = sweep_one(model_type, root, info)
            rows.append((model_type, verdict, detail))
            print(f"{model_type}: {verdict} {detail}", file=sys.stderr, flush=True)
    finally:
        distributed.shutdown(info)
    print("| family | verdict | detail |\n| --- | --- | --- |")
    for model_type, verdict, detail in rows:
        print(f"| {model_type} | {verdict} | {detail.replace('|', '/')} |")
    counts = {v: sum(1 for _, x, _ in rows if x == v) for v in ("exact", "wrong", "refused", "error", "transformers")}
    print("\n" + ", ".join(f"{n} {v}" for v, n in counts.items()))


if __name__ == "__main__":
    main()
