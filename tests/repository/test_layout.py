"""Model names and versions: the one check every name passes before it becomes a path."""

from __future__ import annotations

import pytest

from ladle.errors import InvalidInput
from ladle.repository.layout import check_model_name, model_dir, model_names, parse_version, version_numbers


@pytest.mark.parametrize("name", ["iris", "m-1", "a.b_c", "X" * 128, "0"])
def test_allowed_names(name: str) -> None:
    assert check_model_name(name) == name


@pytest.mark.parametrize("name", ["", "..", ".", "a..b", "../x", "/etc", "a/b", "a\\b", "a\x00b", ".hidden", "-x",
                                  "X" * 129, "a b", "é"])
def test_refused_names(name: str) -> None:
    with pytest.raises(InvalidInput, match="letters, digits"):
        check_model_name(name)


@pytest.mark.parametrize("raw", ["0", "-1", "01", "1.0", "\u0661", "1" * 19, "", " 1"])
def test_versions_are_positive_ascii_integers(raw: str) -> None:
    with pytest.raises(InvalidInput, match="positive integer"):
        parse_version(raw)


def test_listing_skips_bad_names_and_escaping_symlinks(tmp_path) -> None:
    repo, outside = tmp_path / "repo", tmp_path / "outside"
    for path in (repo / "good", repo / "bad name", repo / "inner", outside):
        path.mkdir(parents=True)
        (path / "config.yaml").write_text("backend: python\n")
    (repo / "escape").symlink_to(outside, target_is_directory=True)
    (repo / "alias").symlink_to(repo / "inner", target_is_directory=True)  # stays inside: allowed
    assert model_names(repo) == ["alias", "good", "inner"]
    assert model_dir(repo, "escape") is None and model_dir(repo, "nosuch") is None
    assert model_dir(repo, "good") == repo / "good"
    for version in ("1", "2", "0", "\u0661", "x"):
        (repo / "good" / version).mkdir()
    assert version_numbers(repo / "good") == [1, 2]
