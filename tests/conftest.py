import sys
import types
from pathlib import Path
from typing import Any, Callable

import pytest

TESTS = Path(__file__).parent
# Tests import the shared helpers in tests/ (dist_utils) as top-level modules.
sys.path.insert(0, str(TESTS))

# What starts processes, gloo groups or torchx jobs from a test: spawned gloo ranks
# (dist_utils.run_on_ranks) and child processes (torchrun, the towerrec and torchx scripts, pip).
PROCESS_STARTERS = {"run_on_ranks", "subprocess"}


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small real synthetic data set (16,000 train / 4,000 eval rows, 3 uneven files each)
    with its ready config at ``synth_data / "config.yaml"``."""
    from towerrec.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("synth")
    write_synthetic(str(out), rows=20_000, files=3, seed=0, row_group_rows=2048)
    return out


@pytest.fixture
def quiet_torchrec():
    """TorchRec's planner logs at ERROR and no Python warnings for one test (restored after):
    tests that plan many tables would otherwise print pages of notices."""
    import logging
    import warnings

    logger = logging.getLogger("torchrec")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    logger.setLevel(level)


def starts_processes(fn: Callable[..., Any], seen: set[int] | None = None) -> bool:
    """Whether ``fn``, or a function of tests/ it calls (helpers and fixtures, transitively),
    names one of :data:`PROCESS_STARTERS`.

    Example::

        starts_processes(test_trains_for_real)   # True: it calls run_on_ranks
    """
    seen = set() if seen is None else seen
    fn = getattr(fn, "__wrapped__", fn)  # functools.lru_cache, fixtures
    code = getattr(fn, "__code__", None)
    if code is None or id(code) in seen:
        return False
    seen.add(id(code))
    names: set[str] = set()
    stack = [code]
    while stack:  # the function's own names and those of its lambdas, comprehensions, inner functions
        current = stack.pop()
        names.update(current.co_names)
        stack += [c for c in current.co_consts if isinstance(c, types.CodeType)]
    if names & PROCESS_STARTERS:
        return True
    scope = getattr(fn, "__globals__", {})
    return any(
        starts_processes(scope[name], seen)
        for name in names
        if isinstance(scope.get(name), types.FunctionType) or hasattr(scope.get(name), "__wrapped__")
        if _in_tests(scope[name])
    )


def _in_tests(fn: Any) -> bool:
    code = getattr(getattr(fn, "__wrapped__", fn), "__code__", None)
    return code is not None and Path(code.co_filename).is_relative_to(TESTS)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``multiprocess`` every test that starts processes itself or through its fixtures, so
    ``pytest -m "not multiprocess"`` runs the fast in-process tests only."""
    for item in items:
        if not isinstance(item, pytest.Function) or item.get_closest_marker("multiprocess"):
            continue
        fixtures = [d.func for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs]
        if any(starts_processes(fn) for fn in [item.function, *fixtures] if _in_tests(fn)):
            item.add_marker(pytest.mark.multiprocess)
