"""Start less: the servers import kserve without pandas and the Kubernetes client, and what was deferred still
works for code that uses it. Each check runs in a fresh interpreter (imports are process-wide)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def test_the_server_entry_points_import_neither_pandas_nor_the_kubernetes_client():
    loaded = json.loads(_run(
        "import json, sys, serving.predictor_main, serving.transformer_main\n"
        "print(json.dumps(sorted(m for m in ('pandas', 'kubernetes', 'google.auth', 'kserve.api.kserve_client') "
        "if m in sys.modules)))"))
    assert loaded == []
    # and without the deferral they would be there (so the test above can fail)
    loaded = json.loads(_run("import json, sys, kserve\n"
                             "print(json.dumps(sorted(m for m in ('pandas', 'kubernetes') if m in sys.modules)))"))
    assert loaded == ["kubernetes", "pandas"]


def test_what_was_deferred_works_when_something_uses_it():
    out = _run(
        "import serving.kserve_imports, kserve, sys, numpy as np\n"
        "assert 'pandas' not in sys.modules\n"
        "import pandas\n"  # a later import gets the real package, submodules included
        "import pandas.core.frame\n"
        "assert isinstance(pandas.DataFrame({'a': [1]}), pandas.core.frame.DataFrame)\n"
        "from kserve.utils.utils import get_predict_response\n"  # kserve's own use of pandas, resolved on use
        "from kserve.protocol.infer_type import InferInput, InferRequest\n"
        "request = InferRequest('m', [InferInput('a', [1], 'INT64', [1])])\n"
        "response = get_predict_response(request, pandas.DataFrame({'x': [1.5]}), 'm')\n"
        "assert response.outputs[0].name == 'x'\n"
        "client = kserve.KServeClient\n"  # the Kubernetes-backed client: imported when called
        "assert 'kubernetes' not in sys.modules\n"
        "from kserve.api.kserve_client import KServeClient\n"
        "assert 'kubernetes' in sys.modules and client.resolve() is KServeClient\n"
        "print('ok')")
    assert out == "ok"


def test_the_predictor_and_transformer_still_parse_their_flags():
    for module in ("serving.predictor_main", "serving.transformer_main"):
        result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO,
                                timeout=180)
        assert result.returncode == 0 and "--http_port" in result.stdout and "--latency_budget_ms" in result.stdout
