import os
import tempfile

# A compile cache of this run only: Inductor's on-disk caches outlive a process and would
# serve graphs compiled against another checkout's op schemas.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="deformconv-inductor-"))

import pytest
import torch

import deformconv


def pytest_generate_tests(metafunc):
    # Every test that takes ``backend`` runs once per backend available on the CPU.
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", deformconv.available_backends("cpu"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
