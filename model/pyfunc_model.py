"""The MLflow pyfunc model of a registered version: encoded image bytes in, calibrated probability and label out.

A generic MLflow entry point (``mlflow.pyfunc.load_model("models:/pneumonia/1").predict(...)``); the servers do
not use it, they read the bundle in the version's ``artifacts/bundle`` directly.

Logged as code (MLflow's "models from code"): ``model.registry.log_and_register`` passes this file's path as
``python_model``, MLflow stores the file and runs it at load, and ``set_model`` below names the model. A Python
object would be stored with CloudPickle, and loading a pickle can execute arbitrary code.

No ``from __future__ import annotations``: MLflow reads the type hint of ``predict`` (a list of bytes, one encoded
image each) to validate the input and to infer the model's signature.
"""

import mlflow
import numpy as np
from mlflow.models import set_model


class PneumoniaOnnxModel(mlflow.pyfunc.PythonModel):
    """The bundle's own graph (int8 when it passed the int8 export gate), preprocessing, calibration and threshold."""

    def load_context(self, context) -> None:
        from model.bundle import Bundle, make_session

        self.bundle = Bundle.load(context.artifacts["bundle"])
        self.session = make_session(self.bundle.onnx_path("auto"))

    def predict(self, context, model_input: list[bytes], params=None):
        from model.preprocessing import to_tensor

        x = np.concatenate([to_tensor(bytes(v), self.bundle.preprocess) for v in model_input])
        probs = self.bundle.probability(self.session.run(["logit"], {"image": x})[0])
        return [{"probability": float(p), "label": "PNEUMONIA" if p >= self.bundle.threshold else "NORMAL"}
                for p in probs]


set_model(PneumoniaOnnxModel())
