"""The README's catalog table is generated from experiments/catalog.py and names real code."""

import os

import pytest

from experiments import catalog

_README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def test_rows_cover_the_catalog_once():
  numbers = [r.number for r in catalog.rows()]
  assert numbers == list(range(1, len(numbers) + 1)), "catalog_rows.tsv must number rows 1..N"
  assert set(catalog.BUILT) <= set(numbers)


def test_readme_block_is_current():
  assert catalog.main(["--check", _README]) == 0, (
      "README's catalog table is stale: python -m experiments.catalog --write README.md")


def test_a_name_that_does_not_exist_is_refused(monkeypatch):
  monkeypatch.setitem(catalog.BUILT, 5, (catalog._mixer("no_such_mixer"),))
  with pytest.raises(KeyError, match="no_such_mixer"):
    catalog.table()
  monkeypatch.setitem(catalog.BUILT, 5, (catalog._option("mha", "no_such_field", "x"),))
  with pytest.raises(KeyError, match="no_such_field"):
    catalog.table()
