"""`python -m benchmarks [workload ...]`: run the workloads (default: all), print, save JSON."""

import argparse

from benchmarks import harness


def main() -> None:
    available = harness.workloads()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"workloads to run (of: {', '.join(available)})")
    names = parser.parse_args().names or available
    unknown = sorted(set(names) - set(available))
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(unknown)}")
    rows = harness.run(names)
    print(harness.table(rows))
    print(f"\nwritten to {harness.save(rows)}")


if __name__ == "__main__":
    main()
