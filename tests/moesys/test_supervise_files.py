"""Issue 27: the files ranks leave for their supervising parent (errors, native stacks, pickled
results) live in a private directory (mode 0700, this user's), are read only from there, and go."""
import json
import os
import sys

import pytest

from moesys import supervise
from fault_helpers import where_my_files_are


@pytest.mark.multirank
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_the_ranks_files_are_in_a_private_directory_removed_at_the_end():
    seen = supervise.run_ranks(where_my_files_are, 2)
    assert [bool(s) for s in seen] == [True, True], seen
    assert seen[0]["dir"] == seen[1]["dir"]  # one directory for the job
    for s in seen:
        assert s["mode"] == 0o700 and s["uid"] == os.getuid(), s
    assert {"rank0.fault.txt", "rank1.fault.txt"} <= set(seen[1]["files"] + seen[0]["files"])
    assert not os.path.exists(seen[0]["dir"])


def test_a_directory_others_can_open_is_not_read(tmp_path):
    d = tmp_path / "ranks"
    d.mkdir()
    os.chmod(d, 0o700)
    supervise.check_private(str(d))
    for mode in (0o755, 0o770, 0o701):
        os.chmod(d, mode)
        with pytest.raises(PermissionError, match=f"not a private directory of this user \\(mode {mode:o}"):
            supervise.check_private(str(d))
    os.chmod(d, 0o700)
    link = tmp_path / "link"
    link.symlink_to(d)
    with pytest.raises(PermissionError, match="not a private directory"):
        supervise.check_private(str(link))
    plain = tmp_path / "file"  # this user's, mode 0600, but not a directory
    plain.write_text("")
    os.chmod(plain, 0o600)
    with pytest.raises(PermissionError, match=r"not a private directory of this user \(mode 600, owner uid \d+, "
                                              r"this user \d+\): the ranks' result files are not read from it$"):
        supervise.check_private(str(plain))
    if os.getuid() == 0:  # root can give the directory to another user: mode 0700, but not ours
        os.chown(d, 4242, -1)
        with pytest.raises(PermissionError, match="owner uid 4242, this user 0"):
            supervise.check_private(str(d))


def test_the_rank_named_is_one_without_an_error_file_else_the_earliest_error(tmp_path):
    """run_ranks names, of the ranks found dead in one look, a rank that left no error file (killed
    by a signal: its peers' errors are most likely about its absence), else the earliest recorded
    error; ties go to the lower rank."""
    work = str(tmp_path)
    for rank, t in ((0, 5.0), (1, 3.0), (4, 3.0)):
        with open(os.path.join(work, f"rank{rank}.error.json"), "w") as f:
            json.dump({"rank": rank, "time": t, "type": "ValueError", "message": "x", "traceback": ""}, f)
    assert supervise._first_failure(work, [(0, 1), (1, 1)]) == (1, 1)
    assert supervise._first_failure(work, [(1, 1), (0, 1)]) == (1, 1)
    assert supervise._first_failure(work, [(4, 1), (1, 1), (0, 1)]) == (1, 1)
    assert supervise._first_failure(work, [(0, 1), (1, 1), (3, -9)]) == (3, -9)
    assert supervise._first_failure(work, [(3, -9), (2, -6), (1, 1)]) == (2, -6)
