"""What the custom ops share about autograd."""

from __future__ import annotations


def refuse_double_backward(
    backward_op, name: str, backends: str = "the fast backends ('torch', 'triton') have", instead: str = "'reference'"
) -> None:
    """Give ``backward_op`` (the backward custom op of the fast backends of ``dynconv.<name>``) an autograd formula
    that says what is missing and what to use instead: a second backward through it (a gradient of a gradient, as
    in a gradient penalty) would otherwise fail with torch's bare "no autograd formula was registered"."""

    def backward(ctx, *grads):
        raise NotImplementedError(
            f"dynconv.{name}: {backends} no double backward (a gradient of a gradient, as in a gradient penalty); "
            f"pass backend={instead} for that: autograd differentiates it twice"
        )

    backward_op.register_autograd(backward)
