"""The image is a build option, not a global: ``build_components(image)`` returns the steps as
lightweight Python components bound to that image, which runs them with NOTHING installed at run time.

    from components.factory import build_components
    steps = build_components("registry.example.com/pneumoscope/pipeline:1.2.3")
"""

from __future__ import annotations

from dataclasses import dataclass

from kfp import dsl
from kfp.dsl.python_component import PythonComponent

from components import steps
from components.image import DEFAULT_IMAGE, check_image


@dataclass(frozen=True)
class Components:
    lung_segmentation: PythonComponent
    preprocess: PythonComponent
    train: PythonComponent
    evaluate: PythonComponent
    register: PythonComponent


def build_components(image: str = DEFAULT_IMAGE) -> Components:
    """The steps as components that run in ``image`` (which must hold this project and kfp)."""
    check_image(image)

    def make(func) -> PythonComponent:
        return dsl.component(func, base_image=image, install_kfp_package=False)

    return Components(make(steps.lung_segmentation), make(steps.preprocess), make(steps.train), make(steps.evaluate),
                      make(steps.register))
