"""Builds the optional compiled receive path (broker/ssp/_speedups*.c); the
project's metadata is in setup.cfg. Without a compiler the build goes on
and the broker runs the pure-Python path (broker/ssp/speedups.py)."""

import os
import tempfile

from setuptools import Extension, setup
from setuptools.errors import CompileError, LinkError
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    """No fused multiply-add where gcc or clang builds it: the RTT must round
    as Python's float arithmetic does. zlib linked where its header is found
    (Debian: zlib1g-dev): the usual small instruction is then inflated
    without a call to Python's zlib module, which it otherwise uses;
    ``broker.ssp._speedups.HAVE_ZLIB`` says whether it was (CI requires
    it: tests/ssp/test_speedups_paths.py)."""

    def build_extensions(self):
        if self.compiler.compiler_type == "unix":
            for extension in self.extensions:
                extension.extra_compile_args.append("-ffp-contract=off")
        if self._has_zlib():
            for extension in self.extensions:
                extension.define_macros.append(("SP_HAVE_ZLIB", "1"))
                extension.libraries.append("z")
        super().build_extensions()

    def _has_zlib(self) -> bool:
        """Whether code including zlib.h links with -lz, built as the
        extension is (compiler and shared-object linker with the
        environment's CFLAGS, CPPFLAGS and LDFLAGS: linking a program
        would leave LDFLAGS and CFLAGS out, so e.g. --coverage would fail
        the check); in a temporary directory, so the work tree gains
        nothing."""
        with tempfile.TemporaryDirectory() as scratch:
            source = os.path.join(scratch, "has_zlib.c")
            with open(source, "w") as file:
                file.write("#include <zlib.h>\n"
                           "const char *has_zlib(void) "
                           "{ return zlibVersion(); }\n")
            try:
                objects = self.compiler.compile([source], output_dir=scratch)
                self.compiler.link_shared_object(
                    objects, os.path.join(scratch, "has_zlib.so"),
                    libraries=["z"])
            except (CompileError, LinkError):
                return False
        return True


setup(
    ext_modules=[Extension(
        "broker.ssp._speedups",
        ["broker/ssp/_speedups.c", "broker/ssp/_speedups_wire.c",
         "broker/ssp/_speedups_cbor.c", "broker/ssp/_speedups_receiver.c",
         "broker/ssp/_speedups_sender.c", "broker/ssp/_speedups_send.c",
         "broker/ssp/_speedups_setup.c", "broker/ssp/_speedups_deadlines.c",
         "broker/ssp/_speedups_deflate.c", "broker/ssp/_speedups_values.c"],
        depends=["broker/ssp/_speedups.h"], optional=True)],
    cmdclass={"build_ext": BuildExt},
)
