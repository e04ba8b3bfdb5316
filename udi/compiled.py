"""--compile: torch.compile (inductor) of a training step's networks and loss, in place (udi.step.TrainingStep).

What runs compiled, with the custom ops in the graphs through their fake impls (udi_kernels.ops.registration):
- the networks, by GRANULARITY: "model" (udi.train's --compile) compiles the student's forward and the teacher's
  (UDIModel.teacher_bottleneck, DINOModel.teacher_targets) as one graph each; "blocks" compiles every backbone block
  of both on its own (regional compilation: one graph shared by the blocks), the rest eager. Which was faster and
  why "model" is the default: benchmarks/NOTES.md, "--compile";
- the loss's forward and its collapse diagnostics (teacher_entropies), the EMA centers' update included: the loss
  assigns new center tensors, which the graph replays as a side effect (the same centers as eager).
What stays eager, as it changes every step: the SRS draw (stratified_sample with the step's int seed), the
teacher's EMA (its momentum a float of the schedule), the optimizer and its schedules. The loss runs compiled once the
teacher temperature is constant (after --warmup_teacher_temp_epochs), eager during its warm-up
(ConstantTemperature). tests/test_compile.py counts the graphs, the graph breaks and the recompiles.

The parameters, buffers and state-dict keys stay the module's own (a compiled method is an instance attribute, not a
module): checkpoints are the same with and without --compile, and --compile may change on resume.
"""
import torch

GRANULARITIES = ("model", "blocks")
TEACHER_FORWARDS = {"udi": "teacher_bottleneck", "dino": "teacher_targets"}  # the teacher's method of each objective
LOSS_METHODS = {"forward": 2, "teacher_entropies": 1}  # the loss methods and the position of their epoch


def compile_step(step, granularity: str = "model"):
    """Compiles `step`'s networks (by `granularity`, one of GRANULARITIES) and its loss in place; returns step.
    ValueError for another granularity."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "blocks":
        for network in (step.student, step.teacher):
            for block in network.backbone.vit.blocks:
                block.compile()
    else:
        step.student_ddp = torch.compile(step.student_ddp)
        name = TEACHER_FORWARDS[getattr(step.args, "objective", "udi")]
        setattr(step.teacher, name, torch.compile(getattr(step.teacher, name)))
    for name, position in LOSS_METHODS.items():
        setattr(step.loss, name, ConstantTemperature(getattr(step.loss, name), position, step.loss.schedule))
    return step


class ConstantTemperature:
    """A loss method, its epoch the argument at `position`, compiled for the epochs of the schedule's constant
    teacher temperature, eager during its warm-up. The fused ops take the temperature as a float argument, which a
    graph holds as a constant: compiled through the warm-up, every epoch of it would be a graph of its own.

    schedule: the loss's (warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs), after
    udi_kernels.losses.teacher_temperature: the temperature is teacher_temp from epoch min(warmup epochs, nepochs)
    on. The compiled method is called with that epoch (the same temperature, the loss's only use of the epoch):
    one graph for all of them."""

    def __init__(self, method, position: int, schedule):
        self.eager, self.compiled = method, torch.compile(method, dynamic=False)
        self.position, self.constant_from = position, min(schedule[2], schedule[3])

    def __call__(self, *args, **kwargs):
        if args[self.position] < self.constant_from:
            return self.eager(*args, **kwargs)
        args = (*args[:self.position], self.constant_from, *args[self.position + 1:])
        return self.compiled(*args, **kwargs)
