"""The teacher temperature schedule of DINO, iBOT and UDI (DINO's main_dino.py flags)."""
from ..checks import check_int, check_temperature


def check_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs, suffix=""):
    """The schedule's arguments (DINO's flag names, iBOT's with suffix '2'), checked, in this order."""
    return (check_temperature(warmup_teacher_temp, f"warmup_teacher_temp{suffix}"),
            check_temperature(teacher_temp, f"teacher_temp{suffix}"),
            check_int(warmup_teacher_temp_epochs, "warmup_teacher_temp_epochs", 0), check_int(nepochs, "nepochs", 1))


def teacher_temperature(epoch: int, warmup_teacher_temp: float, teacher_temp: float, warmup_teacher_temp_epochs: int,
                        nepochs: int) -> float:
    """DINO's schedule: linear warm-up over the first epochs (both ends included), then constant."""
    check_int(epoch, "epoch", 0)
    warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs = check_schedule(
        warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)
    if epoch >= warmup_teacher_temp_epochs or epoch >= nepochs:
        return float(teacher_temp)
    if warmup_teacher_temp_epochs == 1:
        return float(warmup_teacher_temp)
    step = (teacher_temp - warmup_teacher_temp) / (warmup_teacher_temp_epochs - 1)
    return float(warmup_teacher_temp + epoch * step)
