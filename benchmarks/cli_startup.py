"""Start-up time of the `ituning` command line: what a user waits for before anything happens.

    .venv/bin/python benchmarks/cli_startup.py [--runs 7]

Times, in fresh processes (the installed script, as a shell starts it), `ituning --help`,
`ituning --version` and `ituning catalog query` on a small catalog, beside the same query through
the duckdb Python package alone (the floor for a DuckDB query from Python). Also lists the slowest
imports of `ituning --help` from `python -X importtime`. Prints a Markdown table; the median of
`--runs` runs after one warm-up.
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ITUNING = Path(sys.executable).with_name("ituning")
QUERY = "SELECT split, count(*) AS images FROM images GROUP BY split ORDER BY split"


def median_wall(command: list, runs: int) -> float:
    subprocess.run(command, capture_output=True, check=True)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def small_catalog(folder: Path) -> Path:
    from storage.catalog import Catalog

    with Catalog(folder / "catalog.duckdb") as catalog:
        catalog.connection.execute(
            "INSERT INTO images (dataset, image_id, split, path, status) "
            "SELECT 'coco', i::TEXT, CASE WHEN i % 10 = 0 THEN 'test' ELSE 'train' END, 'x.jpg', 'ok' "
            "FROM range(5000) t(i)")
    return folder


def slowest_imports(args: list[str], count: int = 5) -> list[tuple[str, float]]:
    code = f"import sys; sys.argv = {['ituning', *args]!r}\nfrom cli.main import main\ntry: main()\nexcept SystemExit: pass"
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True)
    rows = []
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            _, cumulative, name = (part.strip() for part in line.removeprefix("import time:").split("|"))
            if not name.startswith(" ") and "." not in name:
                rows.append((name, int(cumulative) / 1e6))
    return sorted(rows, key=lambda row: -row[1])[:count]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        workspace = small_catalog(Path(folder))
        commands = {
            "ituning --help": [ITUNING, "--help"],
            "ituning --version": [ITUNING, "--version"],
            "ituning catalog query": [ITUNING, "catalog", "query", QUERY, "--workspace", str(workspace)],
            "python -c 'import duckdb; query'": [
                sys.executable, "-c", f"import duckdb; print(duckdb.connect({str(workspace / 'catalog.duckdb')!r}, "
                f"read_only=True).execute({QUERY!r}).fetchall())"],
        }
        print(f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, {date.today()}")
        print("| command | median wall (s) |\n|---|---|")
        for name, command in commands.items():
            print(f"| `{name}` | {median_wall(command, args.runs):.2f} |")
    print("\nslowest top-level imports of `ituning --help` (cumulative s):")
    for name, seconds in slowest_imports(["--help"]):
        print(f"  {name:<20} {seconds:.3f}")


if __name__ == "__main__":
    main()
