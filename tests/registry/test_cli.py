"""Round trips through broker-admin as a real subprocess."""

import errno
import importlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from argparse import Namespace

from twisted.trial.unittest import SynchronousTestCase

from broker.config import parse_config
from broker.registry import cli, database
from broker.registry.admin import AdminDatabase
from broker.registry.secrets import parse_key

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: the user root drops to for tests of another user's files (root ignores file modes).
NOBODY = 65534


def admin_command(*args):
    """The argv of broker-admin from this work tree."""
    return [sys.executable, "-m", "broker.registry.cli", *args]


def admin_as_other_user(case, *argv):
    """broker-admin ``argv`` run by a user the files' modes apply to: (status, stdout,
    stderr). Not root, this user, in a subprocess. Root bypasses file modes, so
    then a forked child of this process drops to nobody and runs the command in
    process: it needs no access to the checkout or its virtual environment
    (which may sit in a directory only root may enter), as everything the
    command uses is imported before the privileges go."""
    if os.getuid() != 0:
        return run(admin_command(*argv))
    for late in ("broker.config", "broker.registry.sqlite_backup"):
        importlib.import_module(late)                  # what the commands import late
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:                                       # the child: never returns
        status = 70
        try:
            os.close(reader)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out, err = io.StringIO(), io.StringIO()
            try:
                status = cli.main(list(argv), out, err)
            except SystemExit as exit:
                status = exit.code
            os.write(writer, json.dumps([status, out.getvalue(), err.getvalue()]).encode())
        finally:
            os._exit(0 if status is not None else 70)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    if not answer:
        case.fail("the child running as nobody reported nothing")
    status, out, err = json.loads(answer)
    return status, out, err


def run(command, **kwargs):
    """A subprocess from the work tree: (status, stdout, stderr)."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    done = subprocess.run(command, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                          stderr=subprocess.PIPE, text=True, timeout=60, **kwargs)
    return done.returncode, done.stdout, done.stderr


def shared_directory(case):
    """A new directory every user may reach (the other user's tests need that: the
    test's own temporary directory may be private)."""
    path = tempfile.mkdtemp()
    os.chmod(path, 0o755)
    case.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


class FullDisk(io.StringIO):
    """An stdout whose every write fails as on a full disk."""

    def write(self, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class CLITests(SynchronousTestCase):
    """broker-admin device and token commands."""

    def setUp(self):
        self.data_dir = os.path.abspath(os.path.join(self.mktemp(), "data"))

    def admin(self, *args, json_out=True, expect=0):
        argv = [sys.executable, "-m", "broker.registry.cli", "--data-dir", self.data_dir]
        argv += ["--json"] if json_out else []
        done = subprocess.run(argv + list(args), cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        self.assertEqual(done.returncode, expect, done.stderr)
        if expect:
            self.assertEqual(len(done.stderr.strip().splitlines()), 1)
            return done.stderr
        return json.loads(done.stdout) if json_out else done.stdout

    def test_device_round_trip(self):
        """add prints number and key once; list, show, rotate-key and remove agree."""
        added = self.admin("device", "add", "greenhouse-7")
        self.assertEqual(len(parse_key(added["key"])), 16)
        listed = self.admin("device", "list")
        self.assertEqual([(d["name"], d["device_number"]) for d in listed],
                         [("greenhouse-7", added["device_number"])])
        shown = self.admin("device", "show", "greenhouse-7")
        self.assertEqual((shown["name"], shown["reported"], shown["version"]), ("greenhouse-7", {}, 1))
        rotated = self.admin("device", "rotate-key", "greenhouse-7")
        self.assertNotEqual(rotated["key"], added["key"])
        self.assertEqual(rotated["device_number"], added["device_number"])
        self.admin("device", "remove", "greenhouse-7")
        self.assertEqual(self.admin("device", "list"), [])

    def test_human_output(self):
        """Without --json, output is for people and still carries the key."""
        text = self.admin("device", "add", "barn", json_out=False)
        self.assertIn("key", text)
        self.assertIn("barn", self.admin("device", "list", json_out=False))

    def test_token_round_trip(self):
        """token add prints the token once; list never shows it; revoke removes it."""
        made = self.admin("token", "add", "--role", "read")
        listed = self.admin("token", "list")
        self.assertEqual([(t["token_id"], t["role"]) for t in listed], [(made["token_id"], "read")])
        self.assertNotIn(made["token"], json.dumps(listed))
        self.admin("token", "revoke", made["token_id"])
        self.assertEqual(self.admin("token", "list"), [])

    def test_errors_are_one_line(self):
        """Errors give one clear line and a non-zero exit."""
        self.admin("device", "add", "d")
        self.assertIn("already exists", self.admin("device", "add", "d", json_out=False, expect=1))
        self.assertIn("unknown device", self.admin("device", "show", "x", json_out=False, expect=1))
        self.assertIn("unknown_token", self.admin("token", "revoke", "zz", expect=1))
        self.assertIn("invalid device name", self.admin("device", "add", "a b", json_out=False, expect=1))

    def test_missing_data_dir(self):
        """Reading a data directory that does not exist is an error, not a new database."""
        self.assertIn("no data directory", self.admin("device", "list", json_out=False, expect=1))
        self.assertFalse(os.path.exists(self.data_dir))

    def test_options_after_the_command(self):
        """--json, --data-dir and --config are accepted after the command too (broker-admin device list --json)."""
        self.admin("device", "add", "after")
        done = subprocess.run([sys.executable, "-m", "broker.registry.cli", "device", "list",
                               "--json", "--data-dir", self.data_dir],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual([d["name"] for d in json.loads(done.stdout)], ["after"])

    def test_new_store_is_announced(self):
        """add on a data directory with no database says on stderr where it created one; a second add does not."""
        done = subprocess.run([sys.executable, "-m", "broker.registry.cli", "--data-dir",
                               self.data_dir, "device", "add", "a"],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stderr, f"broker-admin: created a new registry database in "
                                      f"{self.data_dir} (is it the broker's data_dir?)\n")
        again = subprocess.run([sys.executable, "-m", "broker.registry.cli", "--data-dir",
                                self.data_dir, "device", "add", "c"],
                               cwd=ROOT, capture_output=True, text=True, timeout=60)
        self.assertEqual((again.returncode, again.stderr), (0, ""))


class CLIFailureTests(SynchronousTestCase):
    """Failures of the database itself are one line and exit status 1, never a traceback."""

    def run_failing(self, problem):
        def failing(*args, **kwargs):
            raise problem
        self.patch(cli, "AdminDatabase", failing)
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(["--data-dir", self.mktemp(), "device", "list"], out, err)
        return status, err.getvalue()

    def test_file_it_may_not_touch(self):
        """A database file owned by another user (chmod refused) names the file."""
        # Root may chmod any file: the refusal another user meets is raised here.
        status, message = self.run_failing(PermissionError(1, "Operation not permitted",
                                                           "data/registry.sqlite3"))
        self.assertEqual((status, message), (1, "broker-admin: cannot use 'data/registry.sqlite3': "
                                                "Operation not permitted\n"))

    def test_database_error(self):
        """An SQLite error (read-only or locked database) is one line naming the database."""
        status, message = self.run_failing(sqlite3.OperationalError("database is locked"))
        self.assertEqual((status, message),
                         (1, "broker-admin: the registry database: database is locked\n"))


class OutputFailureTests(SynchronousTestCase):
    """A key or token committed but not written out is told as such, with what to run."""

    def setUp(self):
        self.data_dir = os.path.abspath(os.path.join(self.mktemp(), "data"))
        admin = AdminDatabase(self.data_dir, create=True)
        admin.add_device("dev1")
        admin.close()

    def secret(self, name):
        conn = sqlite3.connect(database.database_path(self.data_dir))
        try:
            return bytes(conn.execute("SELECT secret FROM devices WHERE name = ?",
                                      (name,)).fetchone()[0])
        finally:
            conn.close()

    def failing(self, *argv):
        err = io.StringIO()
        status = cli.main(["--data-dir", self.data_dir, *argv], FullDisk(), err)
        return status, err.getvalue()

    def test_add_to_a_full_disk_says_the_device_exists(self):
        """device add whose stdout is /dev/full (a full disk, as `>> keys.jsonl`) exits 3
        with one JSON line saying the device was added and to rotate its key, and
        nothing else on stderr (no store error, no "Exception ignored" at exit)."""
        with open("/dev/full", "w") as full:
            status, _, err = run(admin_command("--json", "--data-dir", self.data_dir,
                                               "device", "add", "lost"), stdout=full)
        self.assertEqual(status, cli.OUTPUT_LOST, err)
        lines = err.splitlines()
        self.assertEqual(len(lines), 1, err)
        problem = json.loads(lines[0])
        self.assertEqual(problem["error"], "secret_not_written")
        self.assertIn("device lost was added (number ", problem["message"])
        self.assertIn("could not be written (No space left on device)", problem["message"])
        self.assertIn(f"run `broker-admin --data-dir {self.data_dir} device rotate-key lost`",
                      problem["message"])
        self.assertNotIn("None", problem["message"])
        self.assertEqual(len(self.secret("lost")), 16)

    def test_closed_pipe_after_rotate_key_says_the_old_key_is_gone(self):
        """rotate-key into a closed pipe (a reader that quit) says the key changed and
        the old one no longer works, exit 3, and the stored key did change."""
        before = self.secret("dev1")
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            status, _, err = run(admin_command("--data-dir", self.data_dir, "device",
                                               "rotate-key", "dev1"), stdout=write_end)
        finally:
            os.close(write_end)
        self.assertEqual(status, cli.OUTPUT_LOST, err)
        self.assertEqual(err, f"broker-admin: device dev1 got a new key (the old one no longer "
                              f"works) but it could not be written (Broken pipe): run "
                              f"`broker-admin --data-dir {self.data_dir} device rotate-key dev1`"
                              " again for another\n")
        self.assertNotEqual(self.secret("dev1"), before)

    def closed(self, *argv, close=(1,)):
        """broker-admin run with the descriptors ``close`` closed (``>&-``): (status, stderr)."""
        def closing():
            for fd in close:
                os.close(fd)
        done = subprocess.run(admin_command("--data-dir", self.data_dir, *argv), cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=ROOT), stdin=subprocess.DEVNULL,
                              stdout=None if 1 in close else subprocess.DEVNULL,
                              stderr=None if 2 in close else subprocess.PIPE,
                              preexec_fn=closing, timeout=60)
        return done.returncode, (done.stderr or b"").decode(errors="replace")

    def test_add_with_stdout_closed_says_the_device_exists(self):
        """device add with stdout closed (``>&-``, sys.stdout is None) adds the device and
        exits 3 with the line saying so and what to run, not a traceback and exit 1."""
        status, err = self.closed("--json", "device", "add", "unseen")
        self.assertEqual(status, cli.OUTPUT_LOST, err)
        self.assertNotIn("Traceback", err)
        problem = json.loads(err)
        self.assertEqual(problem["error"], "secret_not_written")
        self.assertIn("device unseen was added (number ", problem["message"])
        self.assertIn("(Bad file descriptor)", problem["message"])
        self.assertEqual(len(self.secret("unseen")), 16)

    def test_add_with_stdout_and_stderr_closed_still_exits_3(self):
        """With stderr closed too nothing can be said, but the device is added and the
        exit status is still 3 (its key was lost), not a crash."""
        status, err = self.closed("device", "add", "silent", close=(1, 2))
        self.assertEqual(status, cli.OUTPUT_LOST)
        self.assertEqual(len(self.secret("silent")), 16)

    def test_no_stdout_in_process_is_a_lost_output(self):
        """main() called with sys.stdout None (a closed stdout) answers exit 3 with
        output_not_written for a list, through the same path as any failed write."""
        err = io.StringIO()
        self.patch(sys, "stdout", None)
        status = cli.main(["--json", "--data-dir", self.data_dir, "device", "list"], None, err)
        self.assertEqual(status, cli.OUTPUT_LOST)
        self.assertEqual(json.loads(err.getvalue())["error"], "output_not_written")

    def test_token_not_written_says_to_revoke_it(self):
        """token add whose output fails names the token created and the commands to
        revoke it and make another."""
        status, err = self.failing("token", "add", "--role", "write")
        self.assertEqual(status, cli.OUTPUT_LOST)
        admin = AdminDatabase(self.data_dir)
        self.addCleanup(admin.close)
        (token,) = admin.tokens()
        self.assertEqual(err, f"broker-admin: token {token.token_id} (write) was created but its "
                              "text could not be written (No space left on device): revoke it "
                              f"with `broker-admin --data-dir {self.data_dir} token revoke "
                              f"{token.token_id}` and run `broker-admin --data-dir "
                              f"{self.data_dir} token add --role write` again\n")

    def test_other_output_failures_say_the_command_ran(self):
        """A list whose output fails exits 3 saying the output was lost, not a store error."""
        status, err = self.failing("--json", "device", "list")
        self.assertEqual(status, cli.OUTPUT_LOST)
        self.assertEqual(json.loads(err), {
            "error": "output_not_written",
            "message": "the command was carried out, but its output could not be written "
                       "(No space left on device)"})

    def test_error_without_a_file_names_none(self):
        """An OSError that names no file is told by its reason alone, never "cannot use None"."""
        def failing(*args, **kwargs):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self.patch(cli, "AdminDatabase", failing)
        err = io.StringIO()
        status = cli.main(["--data-dir", self.data_dir, "device", "list"], io.StringIO(), err)
        self.assertEqual((status, err.getvalue()), (1, "broker-admin: Input/output error\n"))


class UsageTests(SynchronousTestCase):
    """Usage mistakes are refused with exit status 2 before anything is touched."""

    def test_empty_data_dir_or_config_is_refused(self):
        """--data-dir "" or --config "" (an unset variable) is a usage error, and no
        ./broker-data is made."""
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        for option in ("--data-dir", "--config"):
            done = subprocess.run(admin_command(option, "", "device", "add", "x"), cwd=cwd,
                                  env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
                                  text=True, timeout=60)
            self.assertEqual(done.returncode, 2, done.stderr)
            self.assertIn(f"{option} must not be empty", done.stderr)
            self.assertEqual(os.listdir(cwd), [])

    def test_no_command_names_the_commands(self):
        """broker-admin alone (or `device` alone) lists the commands it needs, not "group"."""
        for argv, needed in (([], "{device,token,backup,restore,redis}"),
                             (["device"], "{add,show,remove,rotate-key,list}")):
            status, _, err = run(admin_command(*argv))
            self.assertEqual(status, 2)
            self.assertIn(f"the following arguments are required: {needed}", err)
            self.assertNotIn("group", err)


class MessageTests(SynchronousTestCase):
    """Notes and refusals name what they are about; with --json they are JSON."""

    def test_json_note_of_a_new_database(self):
        """With --json the new-database note on stderr is one JSON object."""
        data_dir = os.path.abspath(self.mktemp())
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(cli.main(["--json", "--data-dir", data_dir, "device", "add", "a"],
                                  out, err), 0)
        self.assertEqual(json.loads(err.getvalue()), {
            "note": "created_database", "data_dir": data_dir,
            "message": f"created a new registry database in {data_dir} (is it the broker's "
                       "data_dir?)"})

    def test_json_note_of_a_relative_redis_data_dir(self):
        """With --json the note about a relative Redis data_dir is one JSON object."""
        from broker.backend import redis_options
        config = parse_config({"registry": {"backend": "redis"},
                               "broker": {"data_dir": "relative-data"}}, source="broker.toml")
        err = io.StringIO()
        args = Namespace(json=True, data_dir=None, config="broker.toml")
        data_dir = cli.redis_data_dir(args, config, redis_options(config), err)
        note = json.loads(err.getvalue())
        self.assertEqual((note["note"], note["data_dir"]), ("relative_data_dir", data_dir))
        self.assertIn("broker.data_dir 'relative-data' is relative", note["message"])

    def test_locked_database_is_named_with_who_may_hold_it(self):
        """A write that waits out the busy timeout names the database and who may hold it."""
        data_dir = os.path.abspath(self.mktemp())
        AdminDatabase(data_dir, create=True).close()
        path = database.database_path(data_dir)
        holder = sqlite3.connect(path, isolation_level=None)
        self.addCleanup(holder.close)
        holder.execute("BEGIN IMMEDIATE")
        self.patch(database, "BUSY_TIMEOUT_MS", 0)
        err = io.StringIO()
        status = cli.main(["--data-dir", data_dir, "device", "add", "x"], io.StringIO(), err)
        self.assertEqual((status, err.getvalue()), (
            1, f"broker-admin: {path} is locked: another broker-admin (a backup or restore "
               "among them) or an sqlite3 shell holds it; a broker holds it only for a "
               "moment: try again once that is done\n"))

    def test_unsearchable_data_dir_is_not_a_missing_database(self):
        """A data directory this user may not search is "Permission denied" naming the
        database, not "no registry database"."""
        tmp = shared_directory(self)
        data_dir = os.path.join(tmp, "data")
        AdminDatabase(data_dir, create=True).close()
        os.chmod(data_dir, 0o600)
        self.addCleanup(os.chmod, data_dir, 0o700)
        status, _, err = admin_as_other_user(self, "--data-dir", data_dir, "device", "list")
        self.assertEqual((status, err), (
            1, f"broker-admin: cannot read {database.database_path(data_dir)}: Permission "
               "denied (run as the broker's user)\n"))

    def test_data_dir_behind_an_unsearchable_parent(self):
        """A data directory behind one this user may not search is "Permission denied",
        not "no data directory"."""
        tmp = shared_directory(self)
        data_dir = os.path.join(tmp, "private", "data")
        AdminDatabase(data_dir, create=True).close()
        os.chmod(os.path.dirname(data_dir), 0o600)
        self.addCleanup(os.chmod, os.path.dirname(data_dir), 0o700)
        status, _, err = admin_as_other_user(self, "--data-dir", data_dir, "device", "list")
        self.assertEqual((status, err), (
            1, f"broker-admin: cannot read {data_dir}: Permission denied (run as the broker's "
               "user)\n"))
