"""Suite-wide set-up and the fixtures every rung can use.

Fixtures (request one by name, or for a whole module with
``pytestmark = pytest.mark.usefixtures("one_thread")``):

- ``one_thread`` (module scope): one intra-op thread while the module's tests run (the number before is
  restored after). Tiny models only lose from a second thread: on busy shared cores, OpenMP threads spin
  against each other and make small ops several times slower.
- ``served`` (module scope): the real inference server (``megatron/testing/server.py``) over the tiny
  random-weights model of ``megatron.testing.server.FLAGS`` (exits at layers 1 and 3), on a free loopback
  port in a thread of this process, with one intra-op thread; yields the started server (``.url``).
- ``projections``: counts the vocabulary projections the inference views run, ``{layer: count}`` (the final
  head under the model's ``num_layers``), for tests of what an exit check computes.

Shared helpers that are not fixtures (tiny configs, engines, oracles, argv builders) live in
``megatron/testing/``; ``tests/gpu/conftest.py`` adds the GPU rung's fixtures.

The CPU suite hides CUDA (``CUDA_VISIBLE_DEVICES=""``, before torch is imported) so that it runs the same
on a GPU machine: its multi-process tests fork gloo workers, which cannot use a GPU their parent has
initialised, and its runs leave ``--device`` at its default (cuda whenever one is visible).
``tests/gpu`` is the CUDA rung, run on its own with ``EE_MEGATRON_GPU_TESTS=1`` (``.ci/run`` does so
wherever ``nvidia-smi`` lists a GPU); ``EE_MEGATRON_GPU_TESTS=cpu`` runs it on the CPU instead, a dry
run that checks the rung itself (what ``bench/gpu_check.py --cpu-smoke`` does).

``torch.optim`` imports ``torch._dynamo`` lazily on the first step (1-5 s). Importing it once here means
the forked workers of every multi-process test inherit it instead of paying for it per process.
"""

import os

if os.environ.get("EE_MEGATRON_GPU_TESTS") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402
import torch._dynamo  # noqa: E402, F401


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module's tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def served(one_thread):
    """The tiny model's server (``megatron.testing.server.start_server()``), for the module's tests."""
    from megatron.testing.server import start_server

    srv, _ = start_server()
    yield srv
    srv.stop()


@pytest.fixture
def projections(monkeypatch):
    """Counts the vocabulary projections the inference views run, by layer (the final head counted under
    the model's ``num_layers``): ``{layer: count}``, filled as the test decodes."""
    from megatron.model import inference

    counts = {}
    real = inference.head_projection

    def counting(model, layer):
        project = real(model, layer)
        key = model.config.num_layers if layer is None else layer

        def run(h):
            counts[key] = counts.get(key, 0) + 1
            return project(h)

        return run

    monkeypatch.setattr(inference, "head_projection", counting)
    return counts
