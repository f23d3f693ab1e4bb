"""Teachers: the protocol, an analytic Gaussian mixture, the built-in UNet teachers and a diffusers adapter.

``DiffusersTeacher`` is imported lazily so that diffusers stays an optional extra.
"""

from carv.teachers.base import NonFiniteTeacherError, Teacher, check_finite
from carv.teachers.gaussian_mixture import GaussianMixtureTeacher
from carv.teachers.prompts import PromptEmbeddings
from carv.teachers.unet import CompactUNet, UNetTeacher, load_unet_teacher, save_unet_teacher

__all__ = [
    "CompactUNet",
    "DiffusersTeacher",
    "GaussianMixtureTeacher",
    "NonFiniteTeacherError",
    "PromptEmbeddings",
    "Teacher",
    "UNetTeacher",
    "check_finite",
    "load_unet_teacher",
    "save_unet_teacher",
]


def __getattr__(name):
    if name == "DiffusersTeacher":
        from carv.teachers.diffusers import DiffusersTeacher

        return DiffusersTeacher
    raise AttributeError(f"module 'carv.teachers' has no attribute {name!r}")
