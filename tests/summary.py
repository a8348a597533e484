"""One closing line for a suite run in parts: ``python tests/summary.py A.xml B.xml ...`` reads the
JUnit XML files pytest wrote (``--junitxml``) and prints ``N passed, N failed, N skipped`` for all
of them together, exiting 1 when any test failed or errored (``make test`` runs the suite in two
parts: the parallel one, then the timed tests alone)."""
import sys
import xml.etree.ElementTree as ET


def main(paths: list[str]) -> int:
    tests = failures = errors = skipped = 0
    for path in paths:
        for suite in ET.parse(path).getroot().iter("testsuite"):
            tests += int(suite.get("tests", 0))
            failures += int(suite.get("failures", 0))
            errors += int(suite.get("errors", 0))
            skipped += int(suite.get("skipped", 0))
    failed = failures + errors
    print(f"{tests - failed - skipped} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
