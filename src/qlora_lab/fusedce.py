"""The LM head and cross-entropy in one autograd function, in chunks, with no host sync.

What Liger's fused linear cross-entropy does (the input gradient is computed in the forward
pass, a chunk of logits at a time, so the tokens x vocab logits never exist and backward only
scales the gradient), without its three waits for the GPU a step: Liger reads the number of
supervised targets on the host (`.item()`) in forward and compares the incoming gradient with
1.0 (`torch.equal`) in backward. Each wait stops the host from queueing work until the GPU
has finished everything before it; the GPU then idles while the host launches what follows
(profile_step_h200_160rows_liger_loss.json: the loss's gaps among the longest of a step).
Here the caller passes targets that are all supervised (the collator gathered their positions
on the host), the count is a shape, and backward multiplies by the incoming gradient on the GPU.

A chunk's softmax and gradient (`logits_gradient`) run as one compiled kernel with
`compiled=True` (CUDA with train.compile, which pays for a compiler anyway); otherwise eagerly,
in place on one fp32 copy of the chunk's logits.
"""

from __future__ import annotations

import functools

import torch


def logits_gradient(logits: torch.Tensor, targets: torch.Tensor,
                    softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the rows' cross-entropy, its gradient with respect to `logits`, in their dtype).

    With `softcap`, the model's logits are tanh(z / c) x c of the head's output z (Gemma 2),
    and the gradient is with respect to z. In fp32 whatever the logits' dtype, as transformers'
    loss upcasts them.
    """
    z = logits.float()
    if softcap is not None:
        capped = torch.tanh(z / softcap)
        z = capped * softcap
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    picked = z.gather(1, targets[:, None])
    loss = (lse - picked).sum()
    if torch.compiler.is_compiling():
        # softmax(z) - onehot(target) as one elementwise expression: the compiler fuses it
        # into one kernel from the 16-bit logits to the 16-bit gradient, no fp32 copy kept (a
        # scatter would need that copy materialized to write into).
        hit = torch.arange(z.shape[1], device=z.device)[None, :] == targets[:, None]
        grad = torch.exp(z - lse) - hit.to(z.dtype)
    else:
        # Eagerly: in place on the one fp32 copy, once the picked logits are read.
        grad = z.sub_(lse).exp_()
        grad.scatter_add_(1, targets[:, None], torch.full_like(picked, -1.0))
    if softcap is not None:
        grad = grad * (1.0 - capped * capped)
    return loss, grad.to(logits.dtype)


def _loss_only(logits: torch.Tensor, targets: torch.Tensor,
               softcap: float | None) -> tuple[torch.Tensor, None]:
    z = logits.float()
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return torch.nn.functional.cross_entropy(z, targets, reduction="sum"), None


@functools.cache
def _compiled_logits_gradient():
    # dynamic: the last chunk and every step's count of supervised tokens differ in length.
    # Never as CUDA graphs, even inside train.cuda_graphs' settings (fastpath.compile_settings):
    # every step's chunk shapes are new, and a graph's outputs are overwritten by its next replay.
    return torch.compile(logits_gradient, dynamic=True, options={"triton.cudagraphs": False})


class LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(states @ weight.T + bias, targets), every target counted."""

    @staticmethod
    def forward(ctx, states, weight, bias, targets, chunk_tokens: int, softcap, compiled: bool,
                grads: bool):
        n = states.shape[0]
        if not grads:  # evaluation: the loss alone, no gradient to compute
            step = _loss_only
        else:
            step = _compiled_logits_gradient() if compiled else logits_gradient
        want_states = grads and ctx.needs_input_grad[0]
        want_weight = grads and ctx.needs_input_grad[1]
        want_bias = grads and bias is not None and ctx.needs_input_grad[2]
        grad_states = torch.empty_like(states) if want_states else None
        # fp32 sums over chunks, cast to the parameters' dtype in backward.
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if want_bias else None
        total = states.new_zeros((), dtype=torch.float32)
        for start in range(0, n, chunk_tokens):
            x = states[start:start + chunk_tokens]
            logits = x @ weight.t()
            if bias is not None:
                logits = logits + bias
            loss, grad = step(logits, targets[start:start + chunk_tokens], softcap)
            del logits
            total += loss
            if grad is None:
                continue
            if grad_states is not None:
                torch.mm(grad, weight, out=grad_states[start:start + chunk_tokens])
            if grad_weight is not None:
                grad_weight.addmm_(grad.t().float(), x.float())
            if grad_bias is not None:
                grad_bias += grad.float().sum(0)
        ctx.save_for_backward(grad_states, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_states, grad_weight, grad_bias = ctx.saved_tensors
        # A multiply on the GPU even where grad_total is 1.0: asking would be a wait.
        scale = grad_total.float()
        if grad_states is not None:
            grad_states = grad_states * scale.to(grad_states.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * scale).to(ctx.dtypes[0])
        if grad_bias is not None:
            grad_bias = (grad_bias * scale).to(ctx.dtypes[1])
        return grad_states, grad_weight, grad_bias, None, None, None, None, None


def linear_cross_entropy(states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk_tokens: int, softcap: float | None = None,
                         compiled: bool = False) -> torch.Tensor:
    """Summed cross-entropy of the head `states @ weight.T + bias` against `targets` (none
    ignored), chunk by chunk; gradients for whichever of states, weight, bias need one."""
    grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (states, weight, bias))
    return LinearCrossEntropy.apply(states, weight, bias, targets, chunk_tokens, softcap,
                                    compiled, grads)
