"""The images built and run by a real Docker engine, and the dev overlay's InferenceService run as declared.

- The serving image is built from a local base image (debootstrap + ``docker import``: no registry is
  reachable here), with the host's CA bundle and pip settings as build secrets.
- The containers of the ``dev`` overlay's InferenceService are started exactly as declared: image,
  command, args (plus what KServe's webhook adds), env, ports, probes, securityContext (non-root,
  read-only root filesystem, no capabilities), limits, emptyDir volumes, and the model bundle mounted
  read-only at /mnt/models as KServe's storage initializer leaves it. A relay container stands in for
  the predictor's Service (port 80 -> its first declared port). The declared readiness paths must
  answer, and a real X-ray over REST v2 and gRPC must get the local stack's answer (same engine and
  precision) within that engine's rounding bound (tests/numerics.py).
- A real nginx stands in for the cluster ingress: it routes by Host (HTTP/1.1 for REST, HTTP/2
  ``grpc_pass`` for gRPC) to the transformer's declared ports; ``pneumoscope predict --host`` and
  tritonclient work through it, and an unrouted host gets a one-line "not routed" answer.

The serving image holds no torch, so these tests also prove that the serving code imports and serves
without it. Needs root for the engine, debootstrap and nginx (``make test`` installs and starts them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import REPO
from serving_fixtures import XRAY_FULL, build_bundle, free_port_pair, register, require_data, xray_files
from webapp_fixtures import make_bucket, stop, wait_http

from deploy.manifests import MANIFESTS, kustomize

pytestmark = pytest.mark.integration

DOCKER = os.environ.get("DOCKER", "/usr/bin/docker")
TESTS = Path(__file__).resolve().parents[1]  # tests/, where the shared helper scripts live
DEV = MANIFESTS / "overlays" / "dev"
INGRESS_DOMAIN = "example.com"
# KServe's RawDeployment Service: port 80 -> the first declared container port, the others as themselves.
SERVICE_PORT = 80
RELAY = """
import asyncio, sys
async def pipe(r, w):
    try:
        while data := await r.read(65536):
            w.write(data); await w.drain()
    finally:
        w.close()
async def serve(listen, host, port):
    async def handle(r, w):
        tr, tw = await asyncio.open_connection(host, port)
        await asyncio.gather(pipe(r, tw), pipe(tr, w), return_exceptions=True)
    await (await asyncio.start_server(handle, "0.0.0.0", listen)).serve_forever()
async def main():
    await asyncio.gather(*(serve(int(a), h, int(p)) for a, h, p in (m.split(":") for m in sys.argv[1:])))
asyncio.run(main())
"""


def docker(*args, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])} ...: {result.stderr.strip()[-1500:]}")
    return result


# -- images -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def engine():
    info = subprocess.run([DOCKER, "info"], capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, ("no Docker engine answers: `make test` installs docker.io and starts dockerd "
                                  f"(docker/engine.sh); {info.stderr.strip()[-300:]}")


@pytest.fixture(scope="session")
def base_image(engine) -> str:
    result = subprocess.run([str(REPO / "docker" / "base-image.sh")], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def build(name: str, ref: str, base_image: str) -> str:
    registry, _, tag = ref.rpartition(":")
    registry = registry.rpartition("/")[0]
    result = subprocess.run([str(REPO / "docker" / "build.sh"), "--registry", registry, "--tag", tag,
                             "--base-image", base_image, name], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return ref


def dev_objects() -> list[dict]:
    return kustomize(DEV)


def dev_inference_service() -> dict:
    return next(o for o in dev_objects() if o["kind"] == "InferenceService")


@pytest.fixture(scope="session")
def serving_image(base_image) -> str:
    """The image the dev overlay names, built from this tree."""
    images = {c["image"] for part in ("predictor", "transformer")
              for c in dev_inference_service()["spec"][part]["containers"]}
    assert len(images) == 1, f"transformer and predictor must share the serving image: {images}"
    return build("serving", images.pop(), base_image)


def test_serving_image_is_small_labelled_non_root_and_has_no_torch(serving_image):
    info = json.loads(docker("image", "inspect", serving_image).stdout)[0]
    config = info["Config"]
    assert config["User"] not in ("", "root", "0")
    assert config["Healthcheck"]["Test"][0] == "CMD"
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == serving_image.rpartition(":")[2]
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", labels["org.opencontainers.image.revision"])
    assert info["Size"] < 600_000_000, f"serving image is {info['Size'] / 1e6:.0f} MB (goal: under 600 MB)"
    # The build's secrets (CA bundle, pip settings) reach no layer and no history entry.
    history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", serving_image).stdout
    assert "BEGIN CERTIFICATE" not in history and "index-url" not in history
    probe = docker("run", "--rm", "--entrypoint", "sh", serving_image, "-c",
                   "test ! -e /run/secrets/hostca && test ! -e /etc/pip.conf && echo clean")
    assert probe.stdout.strip() == "clean"
    probe = docker("run", "--rm", "--entrypoint", "python3", serving_image, "-c",
                   "import importlib.util as u, serving.predictor_main, serving.transformer_main; "
                   "print([m for m in ('torch', 'torchvision', 'kfp') if u.find_spec(m)])")
    assert probe.stdout.strip() == "[]"


def test_a_rebuild_removes_the_image_that_it_untagged(serving_image, base_image):
    """Every change to the tree rebuilds the images under the same tag; the replaced ones (half a GB each) would
    otherwise pile up untagged on a developer's or CI machine's disk."""
    ref, ids = "pneumoscope-test/serving:rebuild", []
    try:
        for _ in range(2):  # another revision label each time: a new image on the cached layers
            result = subprocess.run([str(REPO / "docker" / "build.sh"), "--registry", "pneumoscope-test", "--tag",
                                     "rebuild", "--base-image", base_image, "--build-arg",
                                     f"GIT_COMMIT={uuid.uuid4().hex}", "serving"],
                                    capture_output=True, text=True, timeout=1800)
            assert result.returncode == 0, result.stderr[-3000:]
            ids.append(docker("image", "inspect", "-f", "{{.Id}}", ref).stdout.strip())
        assert ids[0] != ids[1]
        gone = docker("image", "inspect", ids[0], check=False)
        assert gone.returncode != 0, "the image that the rebuild untagged is still there"
        assert docker("image", "inspect", serving_image, check=False).returncode == 0  # others' images stay
    finally:
        docker("image", "rm", ref, check=False)


def test_make_images_without_a_docker_engine_says_so_in_one_line():
    env = dict(os.environ, DOCKER="/nonexistent/docker")
    result = subprocess.run(["make", "--no-print-directory", "images", "BASE_IMAGE=python:3.11.14-slim-bookworm"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if not line.startswith(("make: ", "make["))]
    assert len(ours) == 1 and "no working Docker engine" in ours[0], result.stderr


# -- the dev overlay's InferenceService, run as declared --------------------------------------------------------
def quantity(value) -> float:
    text = str(value)
    units = {"m": 1e-3, "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "k": 1e3, "M": 1e6, "G": 1e9}
    for unit, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if text.endswith(unit):
            return float(text[:-len(unit)]) * factor
    return float(text)


def expand(text: str, env: dict) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def kserve_transformer_args(isvc: dict, args: list[str]) -> list[str]:
    """What KServe's webhook appends to a custom transformer's args (CustomTransformer.GetContainer)."""
    name, namespace = isvc["metadata"]["name"], isvc["metadata"]["namespace"]
    added = []
    for flag, value in (("--model_name", name), ("--predictor_host", f"{name}-predictor.{namespace}"),
                        ("--http_port", "8080")):
        if not any(a.startswith(flag) for a in args):
            added += [flag, value]
    return args + added


def with_digest(args: list[str], bundle: Path) -> list[str]:
    """The declared args with the test bundle's digest in ``--sha256=``: the overlay pins the digest of the
    version its storageUri names, and the storage initializer's stand-in mounts this test's bundle there."""
    from model.bundle import Bundle

    declared = [a for a in args if a.startswith("--sha256=")]
    assert len(declared) == 1, f"the predictor must be given its bundle's expected digest: {args}"
    digest = Bundle.load(bundle, verify=False).sha256
    return [f"--sha256={digest}" if a.startswith("--sha256=") else a for a in args]


@dataclass
class Container:
    name: str
    id: str
    ports: dict[int, int] = field(default_factory=dict)  # container port -> 127.0.0.1 port
    started: float = 0.0

    def url(self, port: int) -> str:
        return f"http://127.0.0.1:{self.ports[port]}"


def probe_port(container_spec: dict, probe: dict) -> int:
    handler = probe.get("httpGet") or probe.get("tcpSocket")
    port = handler["port"]
    if isinstance(port, str):
        return next(p["containerPort"] for p in container_spec["ports"] if p["name"] == port)
    return int(port)


def run_declared(spec: dict, pod: dict, *, name: str, network: str, namespace: str, configmaps: dict,
                 bundle: Path, args: list[str], aliases=()) -> Container:
    """``docker run`` of one container exactly as its pod spec declares it."""
    env: dict[str, str] = {}
    for item in spec.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(str(item["value"]), env)
            continue
        source = item["valueFrom"]
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[item["name"]] = configmaps[ref["name"]][ref["key"]]
        elif "fieldRef" in source and source["fieldRef"]["fieldPath"] == "metadata.namespace":
            env[item["name"]] = namespace
        else:
            raise AssertionError(f"{name}: env {item['name']} needs {source}, which this test cannot provide")
    security = spec["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] != 0
    argv = ["run", "--detach", "--name", name, "--network", network, "--user",
            f"{security['runAsUser']}:{security.get('runAsGroup', security['runAsUser'])}"]
    for alias in aliases:
        argv += ["--network-alias", alias]
    if security.get("readOnlyRootFilesystem"):
        argv.append("--read-only")
    if "ALL" in security.get("capabilities", {}).get("drop", []):
        argv += ["--cap-drop", "ALL"]
    if security.get("allowPrivilegeEscalation") is False:
        argv += ["--security-opt", "no-new-privileges"]
    limits = spec["resources"]["limits"]
    argv += ["--cpus", str(quantity(limits["cpu"])), "--memory", str(int(quantity(limits["memory"])))]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in spec.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        assert "emptyDir" in volume, f"{name}: volume {mount['name']} is not an emptyDir"
        size = int(quantity(volume["emptyDir"].get("sizeLimit", "1Gi")))
        argv += ["--tmpfs", f"{mount['mountPath']}:rw,size={size},mode=1777"]
    if "STORAGE_URI" in env:  # KServe's storage initializer has copied the model here, read-only
        argv += ["--volume", f"{bundle}:/mnt/models:ro"]
    for key, value in env.items():
        argv += ["--env", f"{key}={value}"]
    published = {p["containerPort"] for p in spec.get("ports", [])}
    published |= {probe_port(spec, spec[p]) for p in ("readinessProbe", "livenessProbe") if p in spec}
    for port in sorted(published):
        argv += ["--publish", f"127.0.0.1::{port}"]
    command = [expand(c, env) for c in spec["command"]]
    argv += ["--entrypoint", command[0], spec["image"], *command[1:], *[expand(a, env) for a in args]]
    started = time.monotonic()
    container_id = docker(*argv).stdout.strip()
    ports = {}
    for port in published:
        mapping = docker("port", container_id, f"{port}/tcp").stdout.split()[0]
        ports[port] = int(mapping.rpartition(":")[2])
    return Container(name, container_id, ports, started)


def wait_ready(container: Container, spec: dict, timeout: float = 180) -> float:
    """Poll the declared readiness probe; seconds from `docker run` to ready."""
    probe = spec["readinessProbe"]["httpGet"]
    url = container.url(probe_port(spec, spec["readinessProbe"])) + probe["path"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - container.started
        except httpx.HTTPError:
            pass
        state = json.loads(docker("inspect", container.id).stdout)[0]["State"]
        assert state["Running"], f"{container.name} exited ({state['ExitCode']}): " \
                                 f"{docker('logs', container.id, check=False).stderr[-2000:]}"
        time.sleep(0.1)
    raise AssertionError(f"{container.name}: {url} not ready in {timeout:.0f} s: "
                         f"{docker('logs', container.id, check=False).stderr[-2000:]}")


def check_liveness(container: Container, spec: dict) -> None:
    probe = spec["livenessProbe"]
    port = container.ports[probe_port(spec, probe)]
    if "httpGet" in probe:
        assert httpx.get(f"http://127.0.0.1:{port}{probe['httpGet']['path']}", timeout=5).status_code == 200
    else:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


@dataclass
class Deployed:
    isvc: dict
    transformer: Container
    predictor: Container
    transformer_spec: dict
    predictor_spec: dict
    cold_start_s: float
    bundle: Path


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, object]:
    require_data()
    root = tmp_path_factory.mktemp("image-bundle")
    path, net = build_bundle(root / "bundle", int8_accepted=True)  # the int8 graph, as a served model would be
    for item in [root, *root.rglob("*")]:  # the containers' non-root user reads it
        item.chmod(0o755 if item.is_dir() else 0o644)
    return path, net


@pytest.fixture(scope="module")
def bundle(exported) -> Path:
    return exported[0]


@pytest.fixture(scope="module")
def deployed(serving_image, bundle, base_image):
    objects = dev_objects()
    isvc = next(o for o in objects if o["kind"] == "InferenceService")
    namespace = isvc["metadata"]["namespace"]
    configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    predictor_pod, transformer_pod = isvc["spec"]["predictor"], isvc["spec"]["transformer"]
    predictor_spec = next(c for c in predictor_pod["containers"] if c["name"] == "kserve-container")
    transformer_spec = transformer_pod["containers"][0]
    run = uuid.uuid4().hex[:8]
    network = f"pneumoscope-test-{run}"
    docker("network", "create", network)
    started: list[str] = []
    try:
        predictor = run_declared(predictor_spec, predictor_pod, name=f"pneumonia-predictor-{run}", network=network,
                                 namespace=namespace, configmaps=configmaps, bundle=bundle,
                                 args=with_digest(predictor_spec["args"], bundle))
        started.append(predictor.id)
        first, *others = [p["containerPort"] for p in predictor_spec["ports"]]
        service = f"{isvc['metadata']['name']}-predictor.{namespace}"
        relay = docker("run", "--detach", "--name", f"pneumonia-predictor-service-{run}", "--network", network,
                       "--network-alias", service, "--network-alias", f"{service}.svc.cluster.local",
                       "--entrypoint", "python3", base_image, "-c", RELAY,
                       *[f"{a}:{predictor.name}:{b}" for a, b in [(SERVICE_PORT, first)] + [(p, p) for p in others]])
        started.append(relay.stdout.strip())
        transformer = run_declared(transformer_spec, transformer_pod, name=f"pneumonia-transformer-{run}",
                                   network=network, namespace=namespace, configmaps=configmaps, bundle=bundle,
                                   args=kserve_transformer_args(isvc, transformer_spec["args"]))
        started.append(transformer.id)
        cold_start = wait_ready(predictor, predictor_spec)
        wait_ready(transformer, transformer_spec)
        yield Deployed(isvc, transformer, predictor, transformer_spec, predictor_spec, cold_start, bundle)
    finally:
        for container in started:
            docker("rm", "--force", container, check=False)
        docker("network", "rm", network, check=False)


@pytest.fixture(scope="module")
def reference(bundle, deployed):
    """The local stack (two processes on this machine) on the same bundle, with the engine and precision the
    container's predictor chose at load (auto: timed there): the answers to match."""
    from model.bundle import Bundle
    from serving.client import predict_v2
    from serving.settings import ServingSettings
    from serving.stack import LocalStack

    images = [f for f in xray_files(per_class=2)] + xray_files(1, XRAY_FULL)
    platform = httpx.get(f"{deployed.predictor.url(8080)}/v2/models/pneumonia", timeout=10).json()["platform"]
    engine, _, precision = platform.partition("/")
    settings = ServingSettings(threads=1, model_sha256=Bundle.load(bundle, verify=False).sha256,
                               engine=engine.removesuffix("_onnx"), precision=precision)
    with LocalStack(str(bundle), free_port_pair(), settings) as stack:
        answers = {str(f): predict_v2(stack.info["rest"], f.read_bytes()) for f in images}
    return answers


@pytest.fixture(scope="module")
def allowed(exported, deployed, reference) -> dict[str, float]:
    """Per reference image: how far two runs of the container's engine and precision may put the probability
    apart (other threads and batches): the network's float32 rounding bound for fp32, the gate's bound for int8
    or bf16 (tests/numerics.py)."""
    from model.bundle import Bundle
    from model.engine_gate import GateSet
    from model.network import LogitAndCam
    from model.preprocessing import load_resized, normalize
    from numerics import engine_logit_bound, probability_bound

    path, net = exported
    bundle = Bundle.load(path)
    precision = httpx.get(f"{deployed.predictor.url(8080)}/v2/models/pneumonia", timeout=10).json()["platform"] \
        .partition("/")[2]
    x = normalize(np.stack([load_resized(Path(i).read_bytes(), bundle.preprocess).pixels for i in reference]),
                  bundle.preprocess)
    logit_bounds = engine_logit_bound(precision, GateSet.load(bundle).max_abs_logit_diff,
                                      LogitAndCam(net).eval() if precision == "fp32" else None, x)
    return {image: float(probability_bound(answer["probability"], bound, bundle.temperature))
            for (image, answer), bound in zip(reference.items(), logit_bounds)}


def port_named(spec: dict, name: str) -> int:
    return next(p["containerPort"] for p in spec["ports"] if p["name"] == name)


def cli_predict(image: str, url: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model.cli", "predict", image, "--url", url, "--json", *extra],
                          capture_output=True, text=True, timeout=120)


def test_declared_probes_answer_and_the_predictor_starts_quickly(deployed):
    for container, spec in ((deployed.predictor, deployed.predictor_spec),
                            (deployed.transformer, deployed.transformer_spec)):
        check_liveness(container, spec)
    print(f"\npredictor cold start (docker run -> declared readiness path answers): {deployed.cold_start_s:.2f} s")


def test_rest_and_grpc_answers_equal_the_local_stack(deployed, reference, allowed):
    from serving.client import predict_v2

    rest = deployed.transformer.url(port_named(deployed.transformer_spec, "http1"))
    grpc_target = f"127.0.0.1:{deployed.transformer.ports[port_named(deployed.transformer_spec, 'h2c')]}"
    for image, expected in reference.items():
        got = predict_v2(rest, Path(image).read_bytes())
        assert abs(got["probability"] - expected["probability"]) <= allowed[image], image
        assert (got["label"], got["threshold"]) == (expected["label"], expected["threshold"])
        grpc = cli_predict(image, grpc_target, "--protocol", "grpc")
        assert grpc.returncode == 0, grpc.stderr
        assert abs(json.loads(grpc.stdout)["probability"] - expected["probability"]) <= allowed[image], image


# -- nginx as the cluster ingress -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ingress(deployed, tmp_path_factory):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(nginx).exists(), "nginx is missing: `make test` installs Debian's nginx"
    root = tmp_path_factory.mktemp("ingress")
    root.chmod(0o777)  # nginx workers (not root) write request bodies here
    host = f"{deployed.isvc['metadata']['name']}.{deployed.isvc['metadata']['namespace']}.{INGRESS_DOMAIN}"
    spec = deployed.transformer_spec
    rest_upstream = deployed.transformer.ports[port_named(spec, "http1")]
    grpc_upstream = deployed.transformer.ports[port_named(spec, "h2c")]
    rest, grpc = free_port(), free_port()
    (root / "nginx.conf").write_text(f"""
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    client_max_body_size 25m;
    # Bodies stay in memory: the workers (nobody) could not write temp files under pytest's private tmp.
    client_body_buffer_size 25m;
    proxy_buffering off;
    server {{ listen 127.0.0.1:{rest} default_server; return 404; }}
    server {{
        listen 127.0.0.1:{rest};
        server_name {host};
        location / {{ proxy_pass http://127.0.0.1:{rest_upstream}; proxy_http_version 1.1; }}
    }}
    server {{ listen 127.0.0.1:{grpc} http2 default_server; return 404; }}
    server {{
        listen 127.0.0.1:{grpc} http2;
        server_name {host};
        location / {{ grpc_pass grpc://127.0.0.1:{grpc_upstream}; }}
    }}
}}
""")
    process = subprocess.Popen([nginx, "-p", str(root), "-c", str(root / "nginx.conf"), "-g", "daemon off;"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read().decode()
            try:
                socket.create_connection(("127.0.0.1", grpc), timeout=1).close()
                socket.create_connection(("127.0.0.1", rest), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield {"host": host, "rest": f"http://127.0.0.1:{rest}", "grpc": f"127.0.0.1:{grpc}"}
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_pneumoscope_predict_through_the_ingress_by_host(ingress, reference, allowed):
    image, expected = next(iter(reference.items()))
    for url, protocol in ((ingress["rest"], "v2"), (ingress["grpc"], "grpc")):
        result = cli_predict(image, url, "--protocol", protocol, "--host", ingress["host"])
        assert result.returncode == 0, result.stderr
        assert abs(json.loads(result.stdout)["probability"] - expected["probability"]) <= allowed[image]


def test_tritonclient_through_the_ingress_by_host(ingress, reference, allowed):
    images = list(reference)[:2]
    result = subprocess.run([sys.executable, str(TESTS / "serving_triton_client.py"), "--host", ingress["host"],
                             ingress["rest"].removeprefix("http://"), ingress["grpc"], *images],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout)
    expected = [reference[i]["probability"] for i in images]
    for protocol in ("http", "grpc"):
        assert all(abs(a - b) <= allowed[i] for a, b, i in zip(out[protocol]["probability"], expected, images)), \
            (protocol, out)


@pytest.mark.parametrize("protocol", ["v2", "grpc"])
def test_an_unrouted_host_is_named_in_one_line(ingress, reference, protocol):
    image = next(iter(reference))
    url = ingress["rest"] if protocol == "v2" else ingress["grpc"]
    result = cli_predict(image, url, "--protocol", protocol, "--host", "nobody.example.com")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nobody.example.com is not routed" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


# -- the web image --------------------------------------------------------------------------------------------
def test_web_image_runs_as_the_dev_overlay_declares(base_image, tmp_path):
    objects = dev_objects()
    deployment = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-web"))
    pod = deployment["spec"]["template"]["spec"]
    spec = pod["containers"][0]
    image = build("web", spec["image"], base_image)
    info = json.loads(docker("image", "inspect", image).stdout)[0]
    assert info["Config"]["User"] not in ("", "root", "0") and info["Size"] < 600_000_000
    namespace = deployment["metadata"]["namespace"]
    # The Secret's values (the manifests only reference it): a SQLite file under the emptyDir /tmp.
    secrets = {"database-url": "sqlite:////tmp/pneumoscope/web.db", "secret-key": uuid.uuid4().hex,
               "field-keys": "ZmllbGQta2V5cy1mb3ItdGhlLWltYWdlLXRlc3QtMDE="}  # a Fernet key (32 bytes, base64)
    spec = json.loads(json.dumps(spec))
    for item in spec["env"]:
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            item.pop("valueFrom")
            item["value"] = secrets.get(ref["key"], "test")
    network = f"pneumoscope-web-{uuid.uuid4().hex[:8]}"
    docker("network", "create", network)
    container = moto = None
    try:
        # The cluster's S3 (s3.endpointUrl, e.g. MinIO) is a moto server on the network's gateway here.
        store = next(item["value"] for item in spec["env"] if item["name"] == "PNEUMOSCOPE_IMAGE_STORE")
        gateway = docker("network", "inspect", "-f", "{{(index .IPAM.Config 0).Gateway}}", network).stdout.strip()
        moto_port = free_port()
        moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", gateway, "-p", str(moto_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        endpoint = f"http://{gateway}:{moto_port}"
        wait_http(f"{endpoint}/moto-api/", moto, timeout=60)
        make_bucket(endpoint, store.removeprefix("s3://").split("/")[0])
        spec["env"].append({"name": "AWS_ENDPOINT_URL_S3", "value": endpoint})
        container = run_declared(spec, pod, name=network, network=network, namespace=namespace, configmaps={},
                                 bundle=tmp_path, args=spec.get("args", []))
        wait_ready(container, spec)
        check_liveness(container, spec)
    finally:
        if container:
            docker("rm", "--force", container.id, check=False)
        if moto:
            stop(moto)
        docker("network", "rm", network, check=False)


# -- a Modelcar, as KServe runs it ------------------------------------------------------------------------------
def test_the_predictor_starts_from_a_modelcar_read_only(serving_image, base_image, bundle, tmp_path):
    """`pneumoscope export-modelcar` builds the registered version's bundle into an image; KServe's modelcar
    injection is reproduced with Docker: the modelcar-init check, the sidecar with KServe's own command in a
    volume at /mnt (the pod's emptyDir), and the predictor in the sidecar's process namespace reading
    /mnt/models -> /proc/<pid>/root/models, as the chart's non-root, read-only container. It starts, serves,
    and can change nothing in the model."""
    from model.bundle import Bundle

    digest = Bundle.load(bundle).sha256
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    version = register(bundle, tracking, alias=None)
    run = uuid.uuid4().hex[:8]
    ref = f"localhost/pneumoscope-test/pneumonia-modelcar:{version}-{run}"
    exported = subprocess.run([sys.executable, "-m", "model.cli", "export-modelcar", f"models:/pneumonia/{version}",
                               "--tag", ref, "--base-image", base_image, "--mlflow-uri", tracking],
                              capture_output=True, text=True, timeout=900)
    assert exported.returncode == 0, exported.stderr[-2000:]
    info = json.loads(exported.stdout)
    assert (info["storage_uri"], info["sha256"], info["model_version"]) == (f"oci://{ref}", digest, version)
    labels = json.loads(docker("image", "inspect", ref).stdout)[0]["Config"]["Labels"]
    assert labels["io.pneumoscope.bundle-sha256"] == digest and labels["io.pneumoscope.model.version"] == version
    volume, names = tmp_path / "mnt", [f"modelcar-{run}", f"modelcar-predictor-{run}"]
    volume.mkdir(mode=0o777)
    volume.chmod(0o777)  # the pod's emptyDir: world-writable
    try:
        # modelcar-init: KServe's pre-fetch check of the image
        docker("run", "--rm", "--user", "10001", ref, "sh", "-c", '[ -d /models ] && [ "$(ls -A /models)" ]')
        sidecar = docker("run", "--detach", "--name", names[0], "--user", "10001",
                         "--volume", f"{volume}:/mnt", ref,
                         "sh", "-c", "ln -sf /proc/$$/root/models /mnt/models && sleep infinity").stdout.strip()
        predictor = docker("run", "--detach", "--name", names[1], "--pid", f"container:{sidecar}",
                           "--user", "10001:0", "--read-only", "--cap-drop", "ALL", "--security-opt",
                           "no-new-privileges", "--tmpfs", "/tmp:rw,size=1073741824,mode=1777",
                           "--volume", f"{volume}:/mnt", "--env", "MODEL_INIT_MODE=async",
                           "--publish", "127.0.0.1::8080", "--entrypoint", "pneumoscope-predictor", serving_image,
                           "--model_name=pneumonia", "--model_uri=/mnt/models", f"--sha256={digest}",
                           "--http_port=8080", "--grpc_port=8081", "--threads=2",
                           "--engine_timing_s=0.2").stdout.strip()
        port = docker("port", predictor, "8080/tcp").stdout.split()[0].rpartition(":")[2]
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/v2/models/pneumonia/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert json.loads(docker("inspect", predictor).stdout)[0]["State"]["Running"], \
                docker("logs", predictor, check=False).stderr[-2000:]
            time.sleep(0.2)
        else:
            raise AssertionError(f"not ready: {docker('logs', predictor, check=False).stderr[-2000:]}")
        assert httpx.get(f"{url}/v2/models/pneumonia", timeout=10).json()["name"] == "pneumonia"
        link = docker("exec", predictor, "readlink", "/mnt/models").stdout.strip()
        assert re.fullmatch(r"/proc/\d+/root/models", link), link
        for attempt in ("echo x >> /mnt/models/pneumoscope.json", "touch /mnt/models/extra",
                        "rm -f /mnt/models/model.onnx"):
            changed = docker("exec", predictor, "sh", "-c", attempt, check=False)
            assert changed.returncode != 0, f"{attempt}: the predictor could change the model"
        assert docker("exec", predictor, "sha256sum", "/mnt/models/pneumoscope.json").returncode == 0
    finally:
        for name in reversed(names):
            docker("rm", "--force", name, check=False)
        docker("image", "rm", "--force", ref, check=False)
