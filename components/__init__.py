"""Thin KFP v2 components: ``preprocess``, ``train``, ``evaluate``, ``register``, each a call into ``model/``.

- ``components.steps``: the step functions (their source is what KFP embeds in the pipeline);
- ``components.factory``: ``build_components(image)``, the components bound to one container image;
- ``components.runtime``: what the steps call inside the image besides ``model/`` (KFP bookkeeping).

This file imports nothing: the steps import ``components.runtime`` inside the image, where kfp is
only partly initialised (``_KFP_RUNTIME``), so importing the package must not pull in kfp.dsl.
"""
