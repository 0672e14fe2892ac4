"""The consumption audit (bench.audit) judges a loop from what each optimizer step consumed against what its backward
passes produced, with no criterion and no baseline. Each loop below is a few lines; its expected judgement is worked
out from the code in the comment beside it."""

import pytest
import torch
from torch import nn

from bench.audit import Audit, verdict

CRITERION = nn.CrossEntropyLoss()


def batches(n: int = 6):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def audited(loop):
    """Run `loop(model, optimizer, audit)` on a seeded MLP under SGD with momentum; its (verdict, reason, kinds)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with Audit() as audit:
        audit.watch(optimizer)
        loop(model, optimizer, audit)
    return (*verdict(audit.findings), [f.kind for f in audit.findings])


def correct(model, optimizer, audit):  # each step consumes its own backward pass: consistent
    for x, y in batches():
        optimizer.zero_grad()
        CRITERION(model(x), y).backward()
        optimizer.step()


def missing_zero_grad(model, optimizer, audit):  # step 2 on: .grad holds the earlier steps' gradients
    for x, y in batches():
        CRITERION(model(x), y).backward()
        optimizer.step()


def zeroed_before_step(model, optimizer, audit):  # the step consumes zeros: broken from step 1
    for x, y in batches():
        CRITERION(model(x), y).backward()
        optimizer.zero_grad(set_to_none=False)
        optimizer.step()


def accumulation(inner_zero_grad: bool):
    def loop(model, optimizer, audit):  # 2 micro-batches of each batch, each loss / 2
        for x, y in batches():
            optimizer.zero_grad()
            for xc, yc in zip(x.chunk(2), y.chunk(2)):
                if inner_zero_grad:  # the bug: the step consumes the last micro-batch alone
                    optimizer.zero_grad()
                (CRITERION(model(xc), yc) / 2).backward()
            optimizer.step()
    return loop


def double_step(model, optimizer, audit):  # the second step() applies the same gradient again
    for x, y in batches():
        optimizer.zero_grad()
        CRITERION(model(x), y).backward()
        optimizer.step()
        optimizer.step()


def clipped(model, optimizer, audit):  # clipping at 0.05 binds: a uniformly scaled copy (different)
    for x, y in batches():
        optimizer.zero_grad()
        CRITERION(model(x), y).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        optimizer.step()


def undivided(model, optimizer, audit):  # 2 batches drawn per step, 2 undivided means summed: 2x the mean gradient
    drawn = iter(batches())
    for _ in range(3):
        optimizer.zero_grad()
        for _ in range(2):
            x, y = next(drawn)
            audit.batch()
            CRITERION(model(x), y).backward()
        optimizer.step()


def scaled(model, optimizer, audit):  # a GradScaler: backward of the scaled loss, unscale_, clip (not binding), step
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for x, y in batches():
        optimizer.zero_grad()
        scaler.scale(CRITERION(model(x), y)).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), 100.0)
        scaler.step(optimizer)
        scaler.update()


def gan(model, optimizer, audit):
    """Two optimizers: D's step consumes its real and fake backward passes; G's step its own. G's backward also
    reaches D's parameters, and `netD.zero_grad()` clears it before D's next backward pass: consistent."""
    netG, netD, bce = nn.Linear(4, 8), nn.Linear(8, 1), nn.BCEWithLogitsLoss()
    optG, optD = torch.optim.Adam(netG.parameters(), 1e-3), torch.optim.Adam(netD.parameters(), 1e-3)
    audit.watch(optG)
    audit.watch(optD)
    for x, _ in batches():
        netD.zero_grad()
        bce(netD(x), torch.ones(8, 1)).backward()
        fake = netG(torch.randn(8, 4))
        bce(netD(fake.detach()), torch.zeros(8, 1)).backward()
        optD.step()
        netG.zero_grad()
        bce(netD(fake), torch.ones(8, 1)).backward()
        optG.step()


def two_optimizers_one_backward(model, optimizer, audit):  # an encoder's and a head's optimizer after one backward
    first, second = torch.optim.SGD(model[0].parameters(), lr=0.1), torch.optim.SGD(model[2].parameters(), lr=0.1)
    audit.watch(first)
    audit.watch(second)
    for x, y in batches():
        first.zero_grad()
        second.zero_grad()
        CRITERION(model(x), y).backward()
        first.step()
        second.step()


def closure(forget_zero_grad: bool):
    def loop(model, optimizer, audit):
        """PyTorch Lightning's automatic optimization: `optimizer.step(closure)`, the closure zeroing the gradients,
        computing the loss and calling backward inside the step; judged after the step: consistent (broken without
        the closure's zero_grad)."""
        for x, y in batches():
            def step_closure(x=x, y=y):
                if not forget_zero_grad:
                    optimizer.zero_grad()
                loss = CRITERION(model(x), y)
                loss.backward()
                return loss
            optimizer.step(closure=step_closure)
    return loop


def accumulated_closure(model, optimizer, audit):
    """Lightning's accumulate_grad_batches=2: the first micro-batch's closure runs outside the step, the second inside
    `optimizer.step(closure)`; each loss / 2. The step consumes both: consistent."""
    for x, y in batches():
        optimizer.zero_grad()
        (CRITERION(model(x[:4]), y[:4]) / 2).backward()

        def second(x=x, y=y):
            loss = CRITERION(model(x[4:]), y[4:]) / 2
            loss.backward()
            return loss
        optimizer.step(closure=second)


def line_search(model, optimizer, audit):
    """LBFGS evaluates its closure several times a step, each zeroing and backpropagating: not judged."""
    lbfgs = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    audit.watch(lbfgs)
    for x, y in batches(2):
        def evaluate(x=x, y=y):
            lbfgs.zero_grad()
            loss = CRITERION(model(x), y)
            loss.backward()
            return loss
        lbfgs.step(evaluate)


@pytest.mark.parametrize(("loop", "expected", "reason"), [
    (accumulated_closure, "consistent", "each of 6 optimizer step(s)"),
    (line_search, "unverified", "a line search"),
    (closure(forget_zero_grad=False), "consistent", "each of 6 optimizer step(s)"),
    (closure(forget_zero_grad=True), "broken", "step 2 (SGD) consumed earlier steps' gradients too"),
    (correct, "consistent", "consumed exactly what its backward passes produced"),
    (missing_zero_grad, "broken", "step 2 (SGD) consumed earlier steps' gradients too"),
    (zeroed_before_step, "broken", "step 1 (SGD) consumed no gradient"),
    (accumulation(inner_zero_grad=False), "consistent", "consumed exactly"),
    (accumulation(inner_zero_grad=True), "broken", "its last backward pass of 2 alone"),
    (double_step, "broken", "step 2 (SGD) applied the same gradient a second time"),
    (clipped, "different", "clipping by norm that binds"),
    (undivided, "different", "not divided by 2): 2x their mean gradient"),
    (scaled, "consistent", "consumed exactly"),
    (gan, "consistent", "each of 12 optimizer step(s)"),
    (two_optimizers_one_backward, "consistent", "each of 12 optimizer step(s)"),
], ids=lambda v: getattr(v, "__name__", None))
def test_each_loop_gets_what_its_steps_consumed(loop, expected, reason):
    got, why, kinds = audited(loop)
    assert (got, reason in why) == (expected, True), (why, kinds)


def test_a_paused_audit_records_nothing_and_no_step_is_unverified():
    """Backward passes and steps made while paused are not the loop's (loopmark's own recomputations): nothing is
    recorded, and a verdict over no step says so."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Audit(paused=True) as audit:
        audit.watch(optimizer)
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
    assert audit.findings == []
    assert verdict(audit.findings)[0] == "unverified"


def test_a_loss_times_one_is_undivided_and_a_scaled_one_is_divided():
    """transformers 5.x leaves an undivided loss as `loss *= 1` then accelerate's `loss / 1`: still the loss times 1
    (2 batches per step: 2x the mean gradient); `scaler.scale(loss / 2)` is the loss times 0.5 (the scale undone)."""
    def times_one(model, optimizer, audit):
        drawn = iter(batches())
        for _ in range(3):
            optimizer.zero_grad()
            for _ in range(2):
                x, y = next(drawn)
                audit.batch()
                loss = CRITERION(model(x), y)
                loss *= torch.tensor(1.0)
                (loss / 1).backward()
            optimizer.step()

    def scaled_half(model, optimizer, audit):
        scaler, drawn = torch.amp.GradScaler("cpu", init_scale=256.0), iter(batches())
        for _ in range(3):
            optimizer.zero_grad()
            for _ in range(2):
                x, y = next(drawn)
                audit.batch()
                scaler.scale(CRITERION(model(x), y) / 2).backward()
            scaler.step(optimizer)
            scaler.update()

    got, why, _ = audited(times_one)
    assert got == "different" and "NllLossBackward0 times 1, not divided by 2" in why, why
    assert audited(scaled_half)[0] == "consistent", audited(scaled_half)


def test_a_leftover_micro_batch_cleared_by_the_next_epoch_is_not_a_dropped_one():
    """Accumulation over 2 batches with 3 batches per epoch: the third batch's backward pass is left over, and the next
    epoch's `zero_grad()` clears it. The next step consumes exactly its own 2 passes: consistent, not `broken`. The
    same loop with zero_grad before every micro-batch consumes its last pass alone: broken."""
    def leftover(inner_zero_grad: bool):
        def loop(model, optimizer, audit):
            drawn = batches(6)
            for epoch in range(2):
                optimizer.zero_grad()
                for i, (x, y) in enumerate(drawn[epoch * 3:(epoch + 1) * 3]):
                    if inner_zero_grad:
                        optimizer.zero_grad()
                    audit.batch()
                    (CRITERION(model(x), y) / 2).backward()
                    if (i + 1) % 2 == 0:
                        optimizer.step()
                        optimizer.zero_grad()
        return loop

    got, why, kinds = audited(leftover(inner_zero_grad=False))
    assert (got, kinds) == ("consistent", ["ok", "ok"]), why
    assert audited(leftover(inner_zero_grad=True))[0] == "broken"
