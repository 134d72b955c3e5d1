"""broker/files.py: private files replaced whole."""

import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from broker.files import make_private_dirs, replace_private_file


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


class ReplacePrivateFileTests(SynchronousTestCase):
    """The old file or the new one, never a part, never readable by others."""

    def setUp(self):
        self.directory = os.path.join(self.mktemp(), "state")
        self.path = os.path.join(self.directory, "ids.json")

    def test_new_file_and_directory_are_private(self):
        """A missing directory is made 0700 and the file is 0600, whatever the umask."""
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        replace_private_file(self.path, b"{}")
        self.assertEqual(stat.S_IMODE(os.stat(self.directory).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        with open(self.path, "rb") as handle:
            self.assertEqual(handle.read(), b"{}")

    def test_replaces_the_content_and_leaves_no_temporary_file(self):
        """A second write replaces the first whole; only the file itself is left."""
        replace_private_file(self.path, b"first, and longer")
        replace_private_file(self.path, b"second")
        with open(self.path, "rb") as handle:
            self.assertEqual(handle.read(), b"second")
        self.assertEqual(os.listdir(self.directory), ["ids.json"])

    def test_failed_write_keeps_the_old_file(self):
        """A write that fails midway leaves the old content and no temporary file."""
        replace_private_file(self.path, b"old")
        self.assertRaises(TypeError, replace_private_file, self.path, "not bytes")
        with open(self.path, "rb") as handle:
            self.assertEqual(handle.read(), b"old")
        self.assertEqual(os.listdir(self.directory), ["ids.json"])

    def test_a_planted_link_is_not_followed(self):
        """A link where an old writer put its temporary file is left alone."""
        os.makedirs(self.directory)
        victim = os.path.join(self.directory, "victim")
        with open(victim, "wb") as handle:
            handle.write(b"keep me")
        os.symlink(victim, self.path + ".tmp")
        replace_private_file(self.path, b"new")
        with open(victim, "rb") as handle:
            self.assertEqual(handle.read(), b"keep me")
        self.assertFalse(os.path.islink(self.path))


class MakePrivateDirsTests(SynchronousTestCase):
    """Every directory made on the way to a private one is private too."""

    def setUp(self):
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        self.top = self.mktemp()

    def test_missing_parents_are_private(self):
        """Parents made on the way are 0700 under umask 000 (os.makedirs made them 0777)."""
        target = os.path.join(self.top, "a", "b", "data")
        make_private_dirs(target)
        for path in (self.top, os.path.join(self.top, "a"), os.path.join(self.top, "a", "b"),
                     target):
            self.assertEqual(mode_of(path), 0o700, path)

    def test_existing_directories_are_left_alone(self):
        """A parent that exists keeps its mode (it may be shared, like /var/lib)."""
        os.makedirs(self.top)
        os.chmod(self.top, 0o755)
        make_private_dirs(os.path.join(self.top, "data"))
        make_private_dirs(os.path.join(self.top, "data"))
        self.assertEqual(mode_of(self.top), 0o755)
        self.assertEqual(mode_of(os.path.join(self.top, "data")), 0o700)

    def test_a_file_in_the_way_raises(self):
        """A file where a directory should be is an error, not silently kept."""
        os.makedirs(self.top)
        with open(os.path.join(self.top, "data"), "w"):
            pass
        self.assertRaises(OSError, make_private_dirs, os.path.join(self.top, "data", "x"))

    def test_state_file_parents_are_private(self):
        """replace_private_file makes the parents of its directory private as well."""
        replace_private_file(os.path.join(self.top, "x", "state", "ids.json"), b"{}")
        self.assertEqual(mode_of(os.path.join(self.top, "x")), 0o700)

    def test_dot_dot_after_a_link_is_followed_as_the_system_does(self):
        """``link/../data`` is made where every later open finds it: in the link
        target's parent, not beside the link."""
        os.makedirs(os.path.join(self.top, "real", "inner"))
        os.symlink(os.path.abspath(os.path.join(self.top, "real", "inner")),
                   os.path.join(self.top, "link"))
        make_private_dirs(os.path.join(self.top, "link", "..", "data"))
        self.assertTrue(os.path.isdir(os.path.join(self.top, "real", "data")))
        self.assertFalse(os.path.exists(os.path.join(self.top, "data")))

    def test_a_file_in_the_way_is_not_a_directory(self):
        """A regular file where a parent should be is ENOTDIR, naming that file."""
        os.makedirs(self.top)
        blocker = os.path.join(self.top, "f")
        with open(blocker, "w"):
            pass
        with self.assertRaises(NotADirectoryError) as caught:
            make_private_dirs(os.path.join(blocker, "data"))
        self.assertIn(caught.exception.filename, (blocker, os.path.join(blocker, "data")))
