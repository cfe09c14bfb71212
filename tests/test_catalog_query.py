"""`ituning catalog query` reads the catalog and nothing else: no file written, no database attached,
no other file read, no extension fetched; SELECT-style queries (the README's) answer as before."""

import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from cli.main import app
from storage.catalog import Catalog

README = Path(__file__).parents[1] / "README.md"


@pytest.fixture
def workspace(tmp_path):
    """A catalog with a usable and a missing COCO image and NoCaps images in two domains."""
    root = tmp_path / "ws"
    with Catalog(root / "catalog.duckdb") as catalog:
        catalog.replace_dataset("coco", {
            "split": ["test", "test"], "image_id": ["1", "2"], "path": ["/d/1.jpg", "/d/2.jpg"],
            "width": [64, None], "height": [64, None], "domain": [None, None], "status": ["ok", "missing"],
            "reason": [None, "no such file"]},
            {"image_id": ["1", "1"], "split": ["test", "test"], "caption_id": [0, 1], "text": ["a cat", "a dog"]}, 0)
        catalog.replace_dataset("nocaps", {
            "split": ["val", "val"], "image_id": ["0", "1"], "path": ["/n/0.jpg", "/n/1.jpg"], "width": [64, 64],
            "height": [64, 64], "domain": ["in-domain", "out-domain"], "status": ["ok", "ok"], "reason": [None, None]},
            {"image_id": ["0"], "split": ["val"], "caption_id": [0], "text": ["a bird"]}, 0)
    return root


def query(root: Path, sql: str):
    return CliRunner().invoke(app, ["catalog", "query", "--workspace", str(root), sql])


def assert_refused(result, *fragments):
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_readme_queries_answer_through_the_command(workspace):
    block = README.read_text().split("```sql\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if not line.startswith("--")]  # comments
    statements = [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
    assert len(statements) >= 3
    for statement in statements:
        result = query(workspace, statement)
        assert result.exit_code == 0, result.output
        assert len(result.stdout.splitlines()) > 1, (statement, result.stdout)  # a header and rows
    command = README.read_text().split('ituning catalog query "', 1)[1].split('"\n', 1)[0]
    result = query(workspace, command)
    assert result.exit_code == 0 and "coco\ttest\t1" in result.stdout, result.output


@pytest.mark.parametrize("sql", ["DESCRIBE images", "SHOW TABLES", "FROM builds",
                                 "WITH n AS (SELECT count(*) AS k FROM captions) SELECT k FROM n",
                                 "PRAGMA table_info('images')", "EXPLAIN SELECT * FROM images"])
def test_other_read_only_statements_answer(workspace, sql):
    result = query(workspace, sql)
    assert result.exit_code == 0 and len(result.stdout.splitlines()) > 1, result.output


def test_copy_writes_no_file(workspace, tmp_path):
    out = tmp_path / "out.csv"
    assert_refused(query(workspace, f"COPY images TO '{out}'"), "read-only", "COPY")
    assert_refused(query(workspace, f"EXPORT DATABASE '{tmp_path / 'export'}'"), "read-only")
    assert not out.exists() and not (tmp_path / "export").exists()


def test_attach_creates_no_database(workspace, tmp_path):
    other = tmp_path / "other.db"
    sql = f"ATTACH '{other}' AS o (READ_WRITE); CREATE TABLE o.t AS SELECT * FROM images"
    assert_refused(query(workspace, sql), "exactly one SQL statement")
    assert_refused(query(workspace, f"ATTACH '{other}' AS o (READ_WRITE)"), "read-only", "ATTACH")
    assert not other.exists()


@pytest.mark.parametrize("reader", ["read_text('{path}')", "read_csv('{path}')", "'{path}'", "glob('{folder}/*')"])
def test_no_other_file_is_read(workspace, tmp_path, reader):
    secret = tmp_path / "secret.csv"
    secret.write_text("k,v\nsecret,value\n")
    result = query(workspace, "SELECT * FROM " + reader.format(path=secret, folder=tmp_path))
    assert_refused(result, "Permission Error", "disabled by configuration")
    assert "secret" not in result.stdout


def test_no_extension_is_installed_or_loaded(workspace):
    assert_refused(query(workspace, "INSTALL httpfs"), "read-only")
    assert_refused(query(workspace, "LOAD httpfs"), "read-only")
    result = query(workspace, "SELECT * FROM read_parquet('https://example.org/a.parquet')")
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.output


def test_settings_cannot_be_changed_back(workspace):
    assert_refused(query(workspace, "SET enable_external_access = true"), "read-only", "SET")
    result = query(workspace, "SELECT current_setting('enable_external_access'), "
                              "current_setting('lock_configuration'), current_setting('autoinstall_known_extensions')")
    assert result.exit_code == 0 and result.stdout.splitlines()[1] == "False\tTrue\tFalse", result.output


def test_writes_to_the_catalog_are_refused_and_it_is_unchanged(workspace):
    for sql in ("DELETE FROM images", "DROP TABLE captions", "CREATE TABLE t AS SELECT 1",
                "UPDATE images SET status = 'ok'"):
        assert_refused(query(workspace, sql), "read-only")
    with duckdb.connect(str(workspace / "catalog.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM images").fetchone() == (4,)


def test_syntax_error_is_one_line(workspace):
    assert_refused(query(workspace, "SELEC 1"), "syntax error", "LINE 1: SELEC 1")


def test_query_path_imports_nothing_heavy():
    """What the query runs (storage.catalog, storage.workspace, duckdb) imports no torch."""
    code = ("import sys; from storage.catalog import answer_query; import storage.workspace; "
            "print(sorted({'torch', 'transformers', 'prefect', 'mlflow'} & set(sys.modules)))")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parents[1]).stdout
    assert output.strip() == "[]"
