"""Errors a user can fix: each message names the problem and the fix."""


class UserError(Exception):
    """Bad input (config, data, model or a combination). Printed as one line."""


def fail(problem: str, fix: str) -> "UserError":
    return UserError(f"{problem}. Fix: {fix}")


class DivergedError(RuntimeError):
    """The training loss became non-finite (nan or inf) at an optimizer step: training stopped there.

    Attributes: ``step`` (the optimizer step, 1-based, at which it was seen), ``loss`` (that value) and
    ``total_steps`` (the run's planned steps, or None).
    """

    def __init__(self, step: int, loss: float, total_steps: "int | None" = None) -> None:
        self.step, self.loss, self.total_steps = int(step), float(loss), total_steps
        of = f" of {total_steps}" if total_steps is not None else ""
        super().__init__(
            f"training diverged: loss {self.loss} at step {self.step}{of}. Fix: lower method.lr, clip gradients "
            "(train.max_grad_norm > 0) or train in bf16/fp32"
        )

    def __reduce__(self):  # picklable across processes (the message is rebuilt from the attributes)
        return (type(self), (self.step, self.loss, self.total_steps))
