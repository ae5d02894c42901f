"""The training loss: summed token cross-entropy, from full logits or chunked through lm_head.

Full logits cost tokens x vocab x 4 bytes in fp32, several times over during
cross-entropy (8.4 GB per copy at 16k tokens and a 128k vocabulary): often the
largest spike of a step. With `train.loss_chunk_tokens > 0` the lm_head is
swapped (class only: same weight, same state-dict key) for `ChunkedLossHead`,
which, while targets are set, returns the summed loss instead of logits.

It is a fused linear cross-entropy: one chunk of tokens at a time, the forward
computes the chunk's logits, its loss and at once the gradient of the loss
with respect to the chunk's logits, turns that into the gradients for the
hidden states and the lm_head weight, and drops the logits. So at most one
chunk of logits exists, and the lm_head does exactly the three matmuls of the
unchunked path (no recomputed forward, as a checkpointed chunk would need).
Backward only scales the stored gradients. It runs inside the model's forward,
where FSDP has gathered the lm_head weight, so sharding, mixed precision, tied
embeddings and gradient reduction work as usual. With `parallel.compile` the
per-chunk arithmetic is compiled, which fuses the softmax into few kernels.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..data.encode import IGNORE


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of one chunk, no gradient work (evaluation)."""
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")


def _chunk_loss_and_grad(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of one chunk and its gradient w.r.t. the chunk's logits (in the compute dtype).

    d loss / d logits = softmax(logits) - onehot(label) on target rows, 0 on ignored rows. The fp32 logits
    buffer is reused for the softmax, so one chunk costs vocab x (2 + 4 + 2) bytes per token in bf16.
    """
    logits = F.linear(hidden, weight, bias).float()
    valid = labels != IGNORE
    safe = torch.where(valid, labels, 0).unsqueeze(1)
    lse = torch.logsumexp(logits, dim=-1)
    loss = ((lse - logits.gather(1, safe).squeeze(1)) * valid).sum()
    probs = logits.sub_(lse.unsqueeze(1)).exp_()
    probs.scatter_add_(1, safe, -valid.unsqueeze(1).to(probs.dtype))
    probs.mul_(valid.unsqueeze(1))
    return loss, probs.to(hidden.dtype)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """loss = sum CE(hidden @ weight.T + bias, labels), gradients computed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_tokens, step):  # type: ignore[override]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        # Accumulated across chunks in the weight's dtype with addmm_ (one rounding per chunk, as autograd's own
        # accumulation of per-chunk gradients would do), so no full-size fp32 buffer is needed.
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.size(0), chunk_tokens):
            h, y = hidden[start:start + chunk_tokens], labels[start:start + chunk_tokens]
            loss, dlogits = step(h, weight, bias, y)
            total += loss
            if need_h:
                torch.mm(dlogits, weight, out=grad_h[start:start + chunk_tokens])
            if need_w:
                grad_w.addmm_(dlogits.t(), h)
            if need_b:
                grad_b += dlogits.float().sum(0)
            del dlogits
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        # The loss scale (world size / global target tokens) is applied here, after the compute-dtype matmuls:
        # in bf16 that is one more rounding than the unchunked path, which scales the fp32 logits' gradient.
        grad_h, grad_w, grad_b = (None if g is None else g.mul_(grad_out.to(g.dtype)) for g in ctx.grads)
        ctx.grads = None  # the buffers now belong to autograd
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        return grad_h, grad_w, grad_b, None, None, None


class ChunkedLossHead(nn.Linear):
    """nn.Linear whose forward returns the summed loss while `targets` is set."""

    chunk_tokens: int = 4096
    targets: Optional[torch.Tensor] = None
    step = staticmethod(_chunk_loss_and_grad)  # replaced by a compiled version with parallel.compile

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.targets is None:
            return super().forward(hidden)
        h = hidden.reshape(-1, hidden.size(-1))
        y = self.targets.reshape(-1)
        if torch.is_grad_enabled() and (h.requires_grad or self.weight.requires_grad):
            return _FusedLinearCrossEntropy.apply(h, self.weight, self.bias, y, self.chunk_tokens, self.step)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, h.size(0), self.chunk_tokens):
            end = start + self.chunk_tokens
            total = total + _chunk_loss(h[start:end], self.weight, self.bias, y[start:end])
        return total


def install_chunked_loss(model: nn.Module, chunk_tokens: int,
                         compile_backend: Optional[str] = None) -> Optional[ChunkedLossHead]:
    """Swap the output projection's class; None when chunking is off. compile_backend: compile the per-chunk
    arithmetic with it (shapes start static; a differently sized last chunk makes that dimension dynamic)."""
    if chunk_tokens <= 0:
        return None
    head = model.get_output_embeddings()
    if type(head) not in (nn.Linear, ChunkedLossHead):
        raise ConfigError(f"train.loss_chunk_tokens: {type(model).__name__} has no plain nn.Linear lm_head; "
                          "set it to 0")
    if getattr(model.config, "final_logit_softcapping", None):
        raise ConfigError(f"train.loss_chunk_tokens: {model.config.model_type} applies logit soft-capping after "
                          "lm_head, which the chunked loss would skip; set train.loss_chunk_tokens=0")
    head.__class__ = ChunkedLossHead
    head.chunk_tokens = chunk_tokens
    head.targets = None
    if compile_backend:
        head.step = torch.compile(_chunk_loss_and_grad, backend=compile_backend)
    return head


@contextmanager
def targets_set(head: ChunkedLossHead, labels: torch.Tensor) -> Iterator[None]:
    head.targets = labels
    try:
        yield
    finally:
        head.targets = None


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor],
                   head: Optional[ChunkedLossHead] = None, router_aux: Optional[list] = None) -> torch.Tensor:
    """Sum of per-token cross-entropy over the batch's target tokens (fp32).

    router_aux: a list to receive the MoE router's auxiliary loss of this forward (transformers' own
    `outputs.aux_loss`, asked for with output_router_logits=True); None: not computed."""
    # use_cache=False: a KV cache would grow again when checkpointed blocks recompute their forward
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "n_tokens")} | {"use_cache": False}
    if router_aux is not None:
        inputs["output_router_logits"] = True
    if head is not None:
        with targets_set(head, batch["labels"]):
            out = model(**inputs)
            loss = out.logits  # the head returned the summed loss
    else:
        out = model(**inputs)
        logits = out.logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), batch["labels"].view(-1),
                               ignore_index=IGNORE, reduction="sum")
    if router_aux is not None:
        router_aux.append(out.aux_loss.float())
    return loss
