"""The one runner of the notebooks' test files (`python notebooks/test_*.py`): runs every
`test_*` function of a module, reports each, and exits non-zero when any failed."""
import sys


def run_tests(namespace: dict) -> None:
    tests = [(n, f) for n, f in namespace.items() if n.startswith("test_") and callable(f)]
    failed = 0
    for name, f in tests:
        try:
            f()
            print(f"test {name} ... ok")
        except Exception as e:  # report every failure, not only the first
            failed += 1
            print(f"test {name} ... FAILED: {e!r}")
    print(f"{len(tests) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
