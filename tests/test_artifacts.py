"""Atomic folders: a crash between `replace_dir`'s two renames loses neither the old folder nor the new one."""

from mmcl.artifacts import replace_dir, restore_aside


def folder(path, text):
    path.mkdir(parents=True)
    (path / "weights").write_text(text)
    return path


def test_a_folder_set_aside_by_a_killed_replace_is_put_back(tmp_path):
    # killed after `best` was set aside and before the new one moved in
    folder(tmp_path / ".old-best", "old")
    folder(tmp_path / ".tmp-best", "new, maybe incomplete")
    restore_aside(tmp_path / "best")
    assert (tmp_path / "best" / "weights").read_text() == "old" and not (tmp_path / ".old-best").exists()
    # killed after the new one moved in, before the old copy was removed
    folder(tmp_path / ".old-best", "older")
    restore_aside(tmp_path / "best")
    assert (tmp_path / "best" / "weights").read_text() == "old" and not (tmp_path / ".old-best").exists()
    # the next replace starts from a clean state and completes
    replace_dir(folder(tmp_path / ".tmp-best-2", "new"), tmp_path / "best")
    assert (tmp_path / "best" / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == [
        ".tmp-best", "best"]
