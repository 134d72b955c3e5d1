"""Builds the optional compiled paths: SSP's receive and send
(broker/ssp/_speedups*.c) and the registry's history append and row
encoding (broker/registry/_speedups.c); the project's metadata is in
setup.cfg. Without a compiler the build goes on and the broker runs the
pure-Python paths (broker/ssp/speedups.py, broker/registry/speedups.py)."""

import os
import tempfile

from setuptools import Extension, setup
from setuptools.errors import CompileError, LinkError
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    """No fused multiply-add where gcc or clang builds it: the RTT must round
    as Python's float arithmetic does. Two libraries linked into the SSP
    module where their headers are found, each said by a flag of the module
    (CI requires both: tests/ssp/test_speedups_paths.py):

    * zlib (Debian: zlib1g-dev, ``HAVE_ZLIB``): the usual small instruction
      is then inflated without a call to Python's zlib module;
    * OpenSSL's libcrypto (Debian: libssl-dev, ``HAVE_OPENSSL``): the
      module's ``OCBCipher`` seals and opens datagrams with contexts keyed
      once, where cryptography's AESOCB3 copies one for every call."""

    #: the extension that uses them
    LIBRARY_USER = "broker.ssp._speedups"
    #: (macro, library, a C file using it) for each optional library.
    OPTIONAL_LIBRARIES = (
        ("SP_HAVE_ZLIB", "z",
         "#include <zlib.h>\n"
         "const char *has_zlib(void) { return zlibVersion(); }\n"),
        # OpenSSL 3 (EVP_CIPHER_fetch): 1.1 headers fail here, not at import
        # (a shared object may link with an undefined symbol)
        ("SP_HAVE_OPENSSL", "crypto",
         "#include <openssl/evp.h>\n"
         "#include <openssl/opensslv.h>\n"
         "#if OPENSSL_VERSION_NUMBER < 0x30000000L\n"
         "#error OpenSSL 3 is needed\n"
         "#endif\n"
         "void *has_ocb(void) "
         "{ return EVP_CIPHER_fetch(NULL, \"AES-128-OCB\", NULL); }\n"),
    )

    def build_extensions(self):
        if self.compiler.compiler_type == "unix":
            for extension in self.extensions:
                extension.extra_compile_args.append("-ffp-contract=off")
        users = [extension for extension in self.extensions
                 if extension.name == self.LIBRARY_USER]
        for macro, library, probe in self.OPTIONAL_LIBRARIES:
            if users and self._links(library, probe):
                for extension in users:
                    extension.define_macros.append((macro, "1"))
                    extension.libraries.append(library)
        super().build_extensions()

    def _links(self, library: str, probe: str) -> bool:
        """Whether ``probe`` compiles and links with ``-l<library>``, built as
        the extension is (compiler and shared-object linker with the
        environment's CFLAGS, CPPFLAGS and LDFLAGS: linking a program
        would leave LDFLAGS and CFLAGS out, so e.g. --coverage would fail
        the check); in a temporary directory, so the work tree gains
        nothing."""
        with tempfile.TemporaryDirectory() as scratch:
            source = os.path.join(scratch, f"has_{library}.c")
            with open(source, "w") as file:
                file.write(probe)
            try:
                objects = self.compiler.compile([source], output_dir=scratch)
                self.compiler.link_shared_object(
                    objects, os.path.join(scratch, f"has_{library}.so"),
                    libraries=[library])
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
         "broker/ssp/_speedups_deflate.c", "broker/ssp/_speedups_values.c",
         "broker/ssp/_speedups_ocb.c"],
        depends=["broker/ssp/_speedups.h", "broker/ssp/_speedups_slots.h"], optional=True),
        Extension("broker.registry._speedups", ["broker/registry/_speedups.c"],
                  depends=["broker/ssp/_speedups_slots.h"], optional=True)],
    cmdclass={"build_ext": BuildExt},
)
