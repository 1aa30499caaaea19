"""KD library: losses, teacher-output compression, gradient compression hooks."""

from .losses import KDLossOut, TeacherTarget, divergence, kd_loss

__all__ = ["KDLossOut", "TeacherTarget", "divergence", "kd_loss"]
