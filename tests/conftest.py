import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers share the machine's cores: one compute thread each (and in the processes they start),
    # since threads that outnumber the cores spin against each other.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import ituning  # noqa: E402,F401  (makes torchvision importable before transformers is)
from ituning.model import ITuningCaptioner, ITuningConfig  # noqa: E402

pytest_plugins = ["tests.harness", "tests.flow_fixtures"]  # real services and the demo run, once per session

VISUAL_WIDTH = 24
VISUAL_TOKENS = 5
VOCAB = 120


@pytest.fixture(scope="session", autouse=True)
def nothing_tracked_in_the_working_directory():
    """Every test tracks into a workspace of its own; MLflow's defaults (./mlflow.db, ./mlartifacts,
    ./mlruns) appearing means some code lost its tracking URI."""
    defaults = [Path.cwd() / name for name in ("mlflow.db", "mlartifacts", "mlruns")]
    before = {path for path in defaults if path.exists()}
    yield
    appeared = [str(path) for path in defaults if path.exists() and path not in before]
    assert not appeared, f"MLflow wrote to its default store in the working directory: {appeared}"


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    return 0


@pytest.fixture(autouse=True)
def fast_paths_unchecked():
    """Each test meets the fast paths unchecked, as a new process does (ituning/fast_paths.py)."""
    from ituning.fast_paths import forget_outcomes

    forget_outcomes()
    yield
    forget_outcomes()


def tiny_language_model(n_layer: int = 3, vocab_size: int = VOCAB):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, vocab_size=vocab_size, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tiny_captioner(config: ITuningConfig = ITuningConfig(zero_init_output=False), n_layer: int = 3):
    return ITuningCaptioner(tiny_language_model(n_layer), VISUAL_WIDTH, config).eval()


def random_visual(images: int = 2) -> torch.Tensor:
    return torch.randn(images, VISUAL_TOKENS, VISUAL_WIDTH)


@pytest.fixture(scope="session")
def standin_backbones(tmp_path_factory):
    from tests.scene_images import scene_captions
    from ituning.standins import build_random_standins

    return build_random_standins(tmp_path_factory.mktemp("backbones"), scene_captions() * 10, seed=0)


@pytest.fixture(scope="session")
def standin_checkpoint(standin_backbones, tmp_path_factory):
    from ituning.captioner import Captioner

    torch.manual_seed(0)
    captioner = Captioner.from_backbones(standin_backbones, ITuningConfig(zero_init_output=False), device="cpu")
    return captioner.save(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="session", autouse=True)
def prefect_test_server_log(tmp_path_factory):
    """Prefect's test and ephemeral servers (prefect_test_harness, a flow run with no PREFECT_API_URL)
    inherit pytest's stdout and stderr, so their errors would land in whichever test's captured output
    is current, or nowhere. Here they write to one log instead, checked once the session is over."""
    import sys

    if "prefect" not in sys.modules:  # no test module uses Prefect: no server to watch
        yield None
        return
    from prefect.server.api.server import SubprocessASGIServer

    from tests.service_logs import assert_clean_log, output_to

    log = tmp_path_factory.getbasetemp() / "prefect-test-server.log"
    start_server = SubprocessASGIServer._run_uvicorn_command

    def start_server_logging(server):
        with output_to(log):
            return start_server(server)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SubprocessASGIServer, "_run_uvicorn_command", start_server_logging)
        yield log
    assert_clean_log(log)


# Prefect's test and ephemeral servers otherwise start their usage-report service, which logs an ERROR
# on every offline machine; `make test` exports the same.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


# Under `pytest -n` (pytest-xdist, --dist loadgroup) the tests that use the session's servers run on one
# worker, which starts each server once; so do the tests that read the session's demo run
# (tests/flow_fixtures.py). Every other test stays on one worker with the rest of its module, since they
# may share a module's fixture (a pipeline run, a web page).
SHARED = {"services": {"prefect_service", "prefect_api", "mlflow_service", "postgres", "s3_service"},
          "demo-run": {"demo_run", "demo_workspace_copy"}}


# Groups that take minutes (make test lists the slowest tests) are handed out first, so that none of them
# starts while the other workers are finishing and the suite waits on it alone (the Makefile's
# --no-loadscope-reorder keeps this order; pytest-xdist would otherwise hand out the largest groups first).
LONGEST_FIRST = ("tests/test_standins_training.py", "demo-run", "services", "tests/test_services.py",
                 "tests/test_stages.py", "tests/test_tracking_outage.py", "tests/test_collection.py")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    groups = {}
    for item in items:
        shared = [name for name, fixtures in SHARED.items() if fixtures.intersection(item.fixturenames)]
        groups[item.nodeid] = shared[0] if shared else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(groups[item.nodeid]))
    rank = {group: position for position, group in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(groups[item.nodeid], len(rank)))  # stable: the rest keep their order
